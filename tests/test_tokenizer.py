"""Tokenizer: training, exact round trips, digit splitting, and Hugging Face compatibility."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gptlab.data import iter_documents
from gptlab.errors import UserError
from gptlab.tokenizer import SPECIAL_TOKENS, Tokenizer
from helpers import assert_one_line

WORDS = "the a river city born works at company year plus minus equals answer is Alice Bob café naïve 東京 🙂".split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [
            rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 99999)) for _ in range(rng.randint(3, 15))
        ]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", "\n", ""]))
    return lines


# Unicode ranges the round trip must survive: controls, Latin, combining marks, CJK, Hangul,
# emoji and other astral (non-BMP) planes. Surrogates (U+D800..DFFF) are not characters.
RANGES = [
    (0x00, 0x1F),
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x300, 0x36F),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x10FFFF),
    (0xE000, 0xFFFD),
]


def random_texts(count: int = 200, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(RANGES)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else rng.choice([" ", "\n", "\t", "  ", "7"]))
        texts.append("".join(chars))
    return texts + [" leading", "trailing ", "\n\nnewlines\n", "e\u0301 combining", "  ", "", "a  b\r\nc"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(directory, model_max_length=128)
    return directory


def test_special_tokens_have_the_first_ids(tok: Tokenizer):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400


def test_round_trip_is_exact_for_any_unicode(tok: Tokenizer):
    for text in random_texts():
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_digits_are_one_token_each(tok: Tokenizer):
    ids = tok.encode("year 2024 and 9876543210", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024") + list("9876543210")


def test_bos_is_added_by_the_post_processor(tok: Tokenizer):
    assert tok.encode("hello") == [tok.bos_id] + tok.encode("hello", add_special_tokens=False)
    assert tok.encode("") == [tok.bos_id]
    assert tok.bos_id not in tok.encode("hello", add_special_tokens=False)


def test_encode_batch_matches_encode(tok: Tokenizer):
    texts = random_texts(50)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [tok.encode(t, add_special_tokens=False) for t in texts]


def test_train_refuses_a_vocab_smaller_than_bytes_plus_specials():
    with pytest.raises(UserError) as e:
        Tokenizer.train(make_corpus(10), vocab_size=262)
    assert_one_line(e, "262", "263")


def test_train_refuses_an_empty_corpus_and_a_path():
    with pytest.raises(UserError) as e:
        Tokenizer.train(iter([]), vocab_size=300)
    assert_one_line(e, "no texts", "empty")
    with pytest.raises(TypeError, match="iter_documents"):
        Tokenizer.train("corpus.txt", vocab_size=300)


def test_train_on_a_folder_of_txt_jsonl_parquet(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("\n\n".join(make_corpus(50)))
    (tmp_path / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_corpus(50, seed=2)))
    # A word that only the parquet file holds, often enough to become one token.
    pq.write_table(pa.table({"text": ["zyzzyva " * 50] * 20}), tmp_path / "sub" / "c.parquet")
    tok = Tokenizer.train(iter_documents([tmp_path]), vocab_size=350)
    assert len(tok.encode("zyzzyva", add_special_tokens=False)) == 1
    assert len(tok.encode("river", add_special_tokens=False)) < len("river")


def test_transformers_autotokenizer_gives_identical_ids_and_text(tok: Tokenizer, saved: Path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.model_max_length == 128
    for text in random_texts(100) + make_corpus(30):
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True) == text


def test_from_pretrained_reloads_the_same_tokenizer(tok: Tokenizer, saved: Path, tmp_path: Path):
    loaded = Tokenizer.from_pretrained(saved)
    assert loaded.fingerprint == tok.fingerprint
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, tok.vocab_size)
    for text in make_corpus(20):
        assert loaded.encode(text) == tok.encode(text)
    # tokenizer.json alone: gptlab's special tokens are recognised by name.
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    assert Tokenizer.from_pretrained(tmp_path).bos_id == 0


def test_from_pretrained_reads_a_folder_saved_by_transformers(tok: Tokenizer, saved: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(saved).save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    for text in make_corpus(20):
        assert loaded.encode(text) == tok.encode(text)


def test_from_pretrained_reads_a_gpt2_style_folder(tmp_path: Path):
    """GPT-2's layout: byte-level BPE, no post-processor, one special token for BOS and EOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(make_corpus(50), trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    hf.save(str(tmp_path / "tokenizer.json"))

    bare = Tokenizer.from_pretrained(tmp_path)
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (None, None, None)
    config = {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    gpt2 = Tokenizer.from_pretrained(tmp_path)
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (0, 0, None)
    assert gpt2.encode("the river") == gpt2.encode("the river", add_special_tokens=False) != []
    assert gpt2.decode(gpt2.encode("the river 2024")) == "the river 2024"


def test_from_pretrained_errors_are_one_line(tmp_path: Path):
    with pytest.raises(UserError) as e:
        Tokenizer.from_pretrained(tmp_path / "nope")
    assert_one_line(e, "nope", "does not exist")
    with pytest.raises(UserError) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert_one_line(e, "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"')
    with pytest.raises(UserError) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert_one_line(e, "tokenizer.json", "corrupt")


def test_fingerprint_identifies_the_tokenizer(tok: Tokenizer):
    other = Tokenizer.train(make_corpus(seed=5), vocab_size=400)
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
    assert tok.fingerprint != other.fingerprint
    assert Tokenizer.train(make_corpus(), vocab_size=400).fingerprint == tok.fingerprint  # training is deterministic
