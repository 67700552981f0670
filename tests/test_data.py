"""Data path: reading documents, preparing shards, and the memory-mapped loader."""

from __future__ import annotations

import json
import random
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import (
    TokenLoader,
    iter_documents,
    open_shard,
    permute,
    prepare,
    read_meta,
    require_documents,
    write_shard,
)
from gptlab.data.shards import HEADER_BYTES, _ShardWriter, is_val, token_dtype
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from helpers import assert_one_line

WORDS = "the a river city born works at company year plus equals answer is Alice Bob café 東京".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 9999)) for _ in range(rng.randint(5, 60))
        )
        for _ in range(n)
    ]


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")


# ----------------------------------------------------------------------------- documents


def test_txt_documents_are_separated_by_blank_lines(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\ntwo lines\n\n\n  three  \n \t\nfour\r\nfive\r\n".encode())
    assert list(iter_documents(path)) == ["one\ntwo lines", "  three  ", "four\r\nfive"]


def test_jsonl_documents_read_the_text_field(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "sec\\nond"}\n{"text": ""}\n')
    assert list(iter_documents([path])) == ["first", "sec\nond"]


def test_parquet_documents_read_the_text_column(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["α", None, "γ δ"]}), tmp_path / "a.parquet")
    assert list(iter_documents(tmp_path / "a.parquet")) == ["α", "γ δ"]


def test_folders_are_walked_recursively_in_sorted_order(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "z").mkdir(parents=True)
    (tmp_path / "c.txt").write_text("c1\n\nc2")
    write_jsonl(tmp_path / "b" / "x.jsonl", ["b1"])
    (tmp_path / "a" / "z" / "y.txt").write_text("a1")
    (tmp_path / "README.md").write_text("not a document")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert list(iter_documents(tmp_path)) == ["a1", "b1", "c1", "c2"]
    assert list(iter_documents([tmp_path / "c.txt", tmp_path / "b"])) == ["c1", "c2", "b1"]


def test_missing_path_and_unsupported_extension(tmp_path: Path):
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "missing.txt"))
    assert_one_line(e, "missing.txt", "does not exist")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "data.csv"))
    assert_one_line(e, "data.csv", ".csv", ".jsonl")


def test_binary_and_invalid_utf8_files_name_the_byte_offset(tmp_path: Path):
    (tmp_path / "nul.txt").write_bytes(b"fine\nab\x00cd")
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "nul.txt"))
    assert_one_line(e, "nul.txt", "NUL", "offset 7")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "latin1.jsonl"))
    assert_one_line(e, "latin1.jsonl", "UTF-8", "offset 28")


def test_bad_jsonl_lines_name_the_line_number(tmp_path: Path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "no end\n')
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "bad.jsonl"))
    assert_one_line(e, "bad.jsonl:2", "not valid JSON")
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "notext.jsonl"))
    assert_one_line(e, "notext.jsonl:3", "'text'")


def test_parquet_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "a.parquet"))
    assert_one_line(e, "a.parquet", "'text' column", "body")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "b.parquet"))
    assert_one_line(e, "b.parquet", "Parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError) as e:
        list(iter_documents(tmp_path / "a.parquet"))
    assert_one_line(e, "pip install gptlab[parquet]")


def test_require_documents_refuses_an_empty_corpus(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError) as e:
        list(require_documents(iter_documents(tmp_path), tmp_path))
    assert_one_line(e, "no documents", str(tmp_path))
    assert list(require_documents(["a", "b"], "x")) == ["a", "b"]


# ----------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    Tokenizer.train(make_docs(300, seed=9), vocab_size=400).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder whose documents, in reading order, are ``docs``."""
    directory = tmp_path_factory.mktemp("corpus")
    docs = make_docs(400)
    write_jsonl(directory / "a.jsonl", docs[:250])
    (directory / "b.txt").write_text("\n\n".join(docs[250:]), encoding="utf-8")
    return directory, docs


@pytest.fixture(scope="module")
def shards(tok_dir: Path, corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare(tok_dir, [corpus[0]], out, val_fraction=0.05, shard_tokens=3000, workers=1)
    return out


@pytest.fixture
def finished_shards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the shards `prepare` completes, in order. Chunks shrink to ~2000 characters so that its
    read-ahead (two chunks per worker) is a small part of a test corpus: shards are written while input is
    still being read, and an input failing late fails after some were written."""
    monkeypatch.setattr("gptlab.data.shards.CHUNK_CHARS", 2000)
    finished: list[str] = []
    finish = _ShardWriter._finish

    def finish_and_record(self: _ShardWriter) -> None:
        finish(self)
        finished.append(self.names[-1])

    monkeypatch.setattr(_ShardWriter, "_finish", finish_and_record)
    return finished


def read_split(directory: Path, split: str) -> np.ndarray:
    names = read_meta(directory)["splits"][split]["shards"]
    return np.concatenate([np.asarray(open_shard(directory / n)) for n in names])


def test_prepare_writes_exactly_the_tokenizers_tokens(tok_dir: Path, corpus: tuple[Path, list[str]], shards: Path):
    tok = Tokenizer.from_pretrained(tok_dir)
    docs = corpus[1]
    meta = read_meta(shards)
    val = is_val(np.arange(len(docs)), 0.05)
    assert not val[0] and val[1] and 0 < val.sum() < len(docs) / 5
    for split, chosen in (("train", ~val), ("val", val)):
        expected = [t for i in np.flatnonzero(chosen) for t in tok.encode(docs[i])]
        assert read_split(shards, split).tolist() == expected
        assert meta["splits"][split]["tokens"] == len(expected)
        assert meta["splits"][split]["documents"] == int(chosen.sum())
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(len(tok.encode(d)) for d in docs)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16"
    assert meta["separator"] == {"token": "<|bos|>", "id": 0, "position": "start"}
    names = meta["splits"]["train"]["shards"]
    assert names[:2] == ["train_000000.bin", "train_000001.bin"]
    assert [len(open_shard(shards / n)) for n in names[:-1]] == [3000] * (len(names) - 1)
    assert open_shard(shards / names[0]).dtype == np.uint16
    assert sorted(p.name for p in shards.glob("*.bin")) == sorted(names + meta["splits"]["val"]["shards"])
    assert not list(shards.glob(".*.tmp"))


def test_prepare_does_not_depend_on_the_number_of_workers(
    tok_dir: Path, corpus: tuple[Path, list[str]], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("gptlab.data.shards.CHUNK_CHARS", 2000)  # many chunks in flight, returned in order
    meta = prepare(tok_dir, [corpus[0]], tmp_path, val_fraction=0.05, shard_tokens=3000, workers=2)
    assert meta == read_meta(shards)
    for name in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes()


def test_prepare_uses_eos_when_the_tokenizer_has_no_bos(tok_dir: Path, tmp_path: Path):
    no_bos = tmp_path / "tok"
    no_bos.mkdir()
    (no_bos / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (no_bos / "tokenizer_config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "c.jsonl", ["the river", "a city"])
    meta = prepare(no_bos, tmp_path / "c.jsonl", tmp_path / "out", val_fraction=0.0, workers=1)
    tok = Tokenizer.from_pretrained(no_bos)
    assert meta["separator"]["position"] == "end"
    expected = (
        tok.encode("the river", add_special_tokens=False) + [1] + tok.encode("a city", add_special_tokens=False) + [1]
    )
    assert read_split(tmp_path / "out", "train").tolist() == expected
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}


def test_a_hub_dataset_by_name_streams_its_text_column_into_the_same_shards(
    tok_dir: Path, corpus: tuple[Path, list[str]], shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """No network in tests: datasets.load_dataset is replaced by the corpus served as hub rows."""
    datasets = pytest.importorskip("datasets")
    docs = corpus[1]
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter(
            [{"text": d, "id": i} for i, d in enumerate(docs[:2])]
            + [{"text": ""}, {"text": None}]
            + [{"text": d, "id": i} for i, d in enumerate(docs[2:])]
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(iter_documents("hf:owner/corpus")) == docs
    assert list(iter_documents(["hf:wikitext:wikitext-2-raw-v1:validation", "hf:owner/corpus::test"])) == docs + docs
    assert calls == [
        ("owner/corpus", None, "train", True),
        ("wikitext", "wikitext-2-raw-v1", "validation", True),
        ("owner/corpus", None, "test", True),
    ]
    prepare(tok_dir, ["hf:owner/corpus"], tmp_path / "hub", val_fraction=0.05, shard_tokens=3000, workers=1)
    for name in sorted(p.name for p in shards.glob("*.bin")):  # the same tokens as from the files
        assert np.array_equal(open_shard(tmp_path / "hub" / name), open_shard(shards / name)), name

    for spec in ("hf:", "hf:a:b:c:d", "hf::config"):
        with pytest.raises(UserError) as e:
            list(iter_documents(spec))
        assert_one_line(e, spec, "hf:PATH[:CONFIG[:SPLIT]]")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"body": "x"}]))
    with pytest.raises(UserError) as e:
        list(iter_documents("hf:owner/other"))
    assert_one_line(e, "hf:owner/other has no 'text' column", "body")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"text": "a"}, {"text": 7}]))
    with pytest.raises(UserError) as e:
        list(iter_documents("hf:owner/other"))
    assert_one_line(e, "hf:owner/other row 1", "int, not a string")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/missing' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as e:
        list(iter_documents("hf:owner/missing"))
    assert_one_line(e, "cannot read hf:owner/missing (", "Couldn't reach", "network")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as e:
        list(iter_documents("hf:owner/corpus"))
    assert_one_line(e, "needs the datasets package", "gptlab[hf]")


def test_prepare_refuses_to_mix_with_old_shards(tok_dir: Path, tmp_path: Path, finished_shards: list[str]):
    write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    prepare(tok_dir, tmp_path / "c.jsonl", tmp_path / "out", workers=1)
    before = (tmp_path / "out" / "meta.json").read_text()
    with pytest.raises(UserError) as e:
        prepare(tok_dir, tmp_path / "c.jsonl", tmp_path / "out", workers=1)
    assert_one_line(e, "already holds shards", "--overwrite")
    assert (tmp_path / "out" / "meta.json").read_text() == before
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')

    def shard_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}

    shards_before = shard_files()
    write_jsonl(tmp_path / "big.jsonl", make_docs(200))  # many chunks: shards are written before bad.jsonl is read
    late = [tmp_path / "big.jsonl", tmp_path / "bad.jsonl"]
    for inputs in ([tmp_path / "missing.jsonl"], [tmp_path / "empty.txt"], late):
        # --overwrite, and an input fails: at once, or after shards were written
        finished_shards.clear()
        with pytest.raises(UserError):
            prepare(tok_dir, inputs, tmp_path / "out", workers=1, overwrite=True, shard_tokens=50)
        assert (len(finished_shards) > 10) == (inputs is late), finished_shards
        assert shard_files() == shards_before
        assert not list((tmp_path / "out").glob(".prepare-*"))
    write_jsonl(tmp_path / "c.jsonl", make_docs(3, seed=4))
    meta = prepare(tok_dir, tmp_path / "c.jsonl", tmp_path / "out", workers=1, overwrite=True)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3


def test_prepare_errors_leave_no_shards(tok_dir: Path, tmp_path: Path, finished_shards: list[str]):
    with pytest.raises(UserError) as e:
        prepare(tmp_path / "no_tok", tmp_path, tmp_path / "out", workers=1)
    assert_one_line(e, "no_tok")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError) as e:
        prepare(tok_dir, tmp_path / "empty.jsonl", tmp_path / "out", workers=1)
    assert_one_line(e, "no documents")
    # A bad line after the first shards were written: they are removed, no meta.json appears.
    write_jsonl(tmp_path / "c.jsonl", make_docs(300))
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write("{broken\n")
    with pytest.raises(UserError) as e:
        prepare(tok_dir, tmp_path / "c.jsonl", tmp_path / "out", shard_tokens=500, workers=1)
    assert_one_line(e, "c.jsonl:301")
    assert len(finished_shards) > 10
    assert list(tmp_path.glob("out/*")) == []  # nothing left inside (or no folder at all)


def test_shard_dtype_follows_the_vocabulary(tmp_path: Path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    write_shard(tmp_path / "big.bin", [0, 70_000, 5], vocab_size=100_000)
    shard = open_shard(tmp_path / "big.bin")
    assert shard.dtype == np.uint32 and shard.tolist() == [0, 70_000, 5]
    assert (tmp_path / "big.bin").stat().st_size == HEADER_BYTES + 12
    with pytest.raises(ValueError):
        write_shard(tmp_path / "small.bin", [70_000], vocab_size=1000)


def test_corrupt_or_truncated_shards_raise_user_error(tmp_path: Path):
    path = tmp_path / "s.bin"
    write_shard(path, list(range(100)), vocab_size=1000)
    good = path.read_bytes()
    for _name, data in [
        ("magic", b"XXXXXXXX" + good[8:]),
        ("version", good[:8] + (99).to_bytes(4, "little") + good[12:]),
        ("dtype", good[:12] + (3).to_bytes(4, "little") + good[16:]),
        ("count", good[:16] + (101).to_bytes(8, "little") + good[24:]),
        ("truncated", good[:-2]),
        ("header", good[:10]),
    ]:
        path.write_bytes(data)
        with pytest.raises(UserError) as e:
            open_shard(path)
        assert_one_line(e, "s.bin")


# ----------------------------------------------------------------------------- loader


def test_permutation_is_a_bijection_and_constant_memory():
    for n in (1, 2, 3, 5, 16, 17, 255, 1000, 4099):
        for seed, epoch in ((0, 0), (1, 0), (0, 1), (-3, 7)):
            assert sorted(permute(np.arange(n), n, seed, epoch).tolist()) == list(range(n))
    assert permute(np.arange(100), 100, 0).tolist() != list(range(100))
    assert permute(np.arange(100), 100, 0).tolist() != permute(np.arange(100), 100, 1).tolist()
    assert permute(np.arange(100), 100, 0, 0).tolist() != permute(np.arange(100), 100, 0, 1).tolist()
    n = 10**12
    tracemalloc.start()
    values = permute(np.arange(n - 1000, n), n, seed=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000 and len(set(values.tolist())) == 1000 and values.min() >= 0 and values.max() < n


def windows_of(shards: Path, split: str, seq_len: int) -> dict[bytes, int]:
    stream = read_split(shards, split).astype(np.int64)
    span = seq_len + 1
    return {stream[w * span : (w + 1) * span].tobytes(): w for w in range(len(stream) // span)}


def test_batches_are_shifted_windows_and_an_epoch_covers_each_once(shards: Path):
    loader = TokenLoader(shards, seq_len=16, batch_size=5, seed=1)
    index = windows_of(shards, "train", 16)
    assert len(index) == loader.num_windows  # no repeated windows, so rows identify windows
    seen = []
    for _ in range(loader.num_windows // 5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen += [index[torch.cat([row_x, row_y[-1:]]).numpy().tobytes()] for row_x, row_y in zip(x, y)]
    assert len(set(seen)) == len(seen) == loader.num_windows // 5 * 5
    assert seen != sorted(seen)
    assert loader.epoch == 0


def test_same_seed_same_batches_other_seed_other_batches(shards: Path):
    a, b, c = (TokenLoader(shards, seq_len=32, batch_size=4, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, c.next_batch()[0])


def test_restored_loader_continues_the_same_sequence(shards: Path):
    """Run past an epoch boundary so the restored state must also carry the epoch."""
    full = TokenLoader(shards, seq_len=32, batch_size=6, seed=3)
    resumed = TokenLoader(shards, seq_len=32, batch_size=6, seed=0)
    steps = full.num_windows // 6 + 3
    for _ in range(steps):
        full.next_batch()
    state = json.loads(json.dumps(full.state_dict()))  # it must survive serialisation
    resumed.load_state_dict(state)
    assert resumed.epoch == full.epoch == 1
    for _ in range(5):
        assert torch.equal(full.next_batch()[0], resumed.next_batch()[0])
    with pytest.raises(UserError) as e:
        TokenLoader(shards, seq_len=16, batch_size=6).load_state_dict(state)
    assert_one_line(e, "seq_len")


def test_ranks_partition_the_single_process_batch(shards: Path):
    single = TokenLoader(shards, seq_len=32, batch_size=8, seed=5)
    ranks = [TokenLoader(shards, seq_len=32, batch_size=4, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(single.num_windows // 8 + 4):  # across an epoch boundary
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_val_batches_spread_evenly_over_the_split_and_are_rank_aware(shards: Path):
    loader = TokenLoader(shards, "val", seq_len=8, batch_size=2)
    stream = torch.from_numpy(read_split(shards, "val").astype(np.int64))
    batches = list(loader.val_batches(max_batches=3))
    assert len(batches) == 3
    chosen = [w * loader.num_windows // 6 for w in range(6)]  # six windows spread over the split
    assert chosen[-1] >= loader.num_windows // 2
    for k, (x, y) in enumerate(batches):
        for j in range(2):
            w = chosen[2 * k + j]
            assert torch.equal(x[j], stream[w * 9 : w * 9 + 8]) and torch.equal(y[j], stream[w * 9 + 1 : w * 9 + 9])
    every = list(loader.val_batches())
    assert len(every) == loader.num_windows // 2
    assert torch.equal(every[1][0][0], stream[2 * 9 : 2 * 9 + 8])  # all batches: consecutive windows
    rank1 = TokenLoader(shards, "val", seq_len=8, batch_size=1, rank=1, world_size=2)
    assert torch.equal(next(rank1.val_batches(max_batches=3))[0][0], batches[0][0][1])
    assert loader.position == 0


def test_loader_errors(shards: Path, tmp_path: Path):
    tokens = read_meta(shards)["splits"]["val"]["tokens"]
    with pytest.raises(UserError) as e:
        TokenLoader(shards, "val", seq_len=tokens, batch_size=1)
    assert_one_line(e, f"holds {tokens} tokens", f"seq_len+1 = {tokens + 1}")
    with pytest.raises(UserError) as e:
        TokenLoader(tmp_path, seq_len=8, batch_size=1)
    assert_one_line(e, "meta.json")
    with pytest.raises(UserError) as e:
        TokenLoader(shards, "test", seq_len=8, batch_size=1)
    assert_one_line(e, "'test'")
