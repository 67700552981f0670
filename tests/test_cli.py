"""User mistakes end with one line on stderr and exit code 2, never a traceback, and nothing
written before is lost."""

import json
import random
from pathlib import Path

import pytest

from gptlab.data import iter_documents, prepare
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer
from helpers import ONE_THREAD, assert_user_error, gptlab, gptlab_in_process, snapshot

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> Path:
    """A corpus, its tokenizer and shards, and the tiny model saved without its tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "12", "345"]
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choices(words, k=30)) for _ in range(200)) + "\n")
    tok = Tokenizer.train(iter_documents([root / "corpus.txt"]), vocab_size=300)
    tok.save_pretrained(root / "tok")
    prepare(root / "tok", [root / "corpus.txt"], root / "shards", val_fraction=0.05, workers=1)
    GPT.from_pretrained(tiny_model).save_pretrained(root / "model_without_tokenizer")
    return root


@pytest.fixture
def cli(capfd):
    """`gptlab ARGS` run in this process (helpers.gptlab_in_process): for every command here but the first sample,
    which runs as a user runs it; a new interpreter would only import torch again."""
    return lambda *args: gptlab_in_process(capfd, *args)


def test_sample_prints_a_continuation(tiny_model, cli):
    """As a user runs it, then in this process: the seed alone decides the text."""
    args = ("sample", "--model", tiny_model, "--prompt", "alpha beta", "--max-new-tokens", "5", "--seed", "1")
    result = gptlab(*args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    again = cli(*args)
    assert again.stdout == result.stdout
    text = result.stdout.rstrip("\n")
    stop = text.strip()[1:3]
    cut = cli(*args, "--stop", "never", "--stop", stop)
    assert cut.stdout.rstrip("\n") == text[: text.find(stop)]


def test_sample_errors(world, tiny_model, tmp_path, cli):
    assert_user_error(
        cli("sample", "--model", tiny_model, "--prompt", "x", "--repetition-penalty", "0"), "repetition_penalty"
    )
    assert_user_error(cli("sample", "--model", tmp_path / "nope", "--prompt", "x"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("sample", "--model", tmp_path / "empty", "--prompt", "x"), "config.json")
    assert_user_error(cli("sample", "--model", world / "model_without_tokenizer", "--prompt", "x"), "tokenizer")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_model.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert_user_error(cli("sample", "--model", corrupt, "--prompt", "x"), "model.safetensors")
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    for f in tiny_model.iterdir():
        (mismatch / f.name).write_bytes(f.read_bytes())
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (mismatch / "config.json").write_text(json.dumps(config))
    assert_user_error(cli("sample", "--model", mismatch, "--prompt", "x"), "shape")


def test_tokenizer_and_prepare_errors(world, tmp_path, cli):
    assert_user_error(cli("tokenizer", "--input", tmp_path / "missing.txt", "--out", tmp_path / "t"), "does not exist")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(cli("tokenizer", "--input", tmp_path / "empty.txt", "--out", tmp_path / "t"), "empty")
    assert_user_error(
        cli("prepare", "--tokenizer", world / "tok", "--input", tmp_path / "empty.txt", "--out", tmp_path / "s"),
        "empty",
    )
    (tmp_path / "binary.txt").write_bytes(b"hello\x00\xff\xfe world")
    assert_user_error(
        cli("prepare", "--tokenizer", world / "tok", "--input", tmp_path / "binary.txt", "--out", tmp_path / "s2"),
        "binary.txt",
    )
    assert_user_error(
        cli("prepare", "--tokenizer", tmp_path / "no_tok", "--input", world / "corpus.txt", "--out", tmp_path / "s3"),
        "no_tok",
    )


def pretrain_args(world, out, *sets, flags=()) -> list:
    """`gptlab pretrain` arguments for a one-layer model on the world's shards, plus extra --set keys."""
    args = [
        "pretrain",
        *flags,
        "--out",
        out,
        "--set",
        f"data.shards={world / 'shards'}",
        "--set",
        "model.n_layer=1",
        "--set",
        "model.n_head=2",
        "--set",
        "model.n_embd=16",
        "--set",
        "model.block_size=32",
        "--set",
        "train.seq_len=16",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_batches=1",
    ]
    for s in sets:
        args += ["--set", s]
    return args


def test_pretrain_errors(world, tmp_path, cli):
    def error(out, *sets):
        return cli(*pretrain_args(world, out, *sets))

    assert_user_error(error(tmp_path / "a", "train.lr_max=1"), "train.lr_max", "did you mean")
    assert_user_error(error(tmp_path / "b", "model.vocab_size=100"), "vocab_size", "tokenizer")
    assert_user_error(error(tmp_path / "c", "train.seq_len=64"), "seq_len", "block_size")
    assert_user_error(error(tmp_path / "d", "data.shards=" + str(tmp_path / "none")), "does not exist")
    other = tmp_path / "other_tok"
    Tokenizer.train(["completely different text"] * 20, vocab_size=280).save_pretrained(other)
    assert_user_error(error(tmp_path / "e", f"data.tokenizer={other}"), "another tokenizer")
    result = cli("pretrain", "--out", tmp_path / "f", "--config", tmp_path / "missing.toml")
    assert_user_error(result, "missing.toml")


def test_resume_with_every_checkpoint_corrupt_stops_clearly_and_keeps_them(world, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*pretrain_args(world, out, "train.max_steps=4", "train.save_every=2")).returncode == 0
    for folder in (out / "checkpoints").iterdir():
        (folder / "model.safetensors").write_bytes(b"garbage")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = cli("pretrain", "--out", out, "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gptlab: error: ")
    assert "no checkpoint" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_training_into_an_earlier_run_needs_resume_or_overwrite(world, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*pretrain_args(world, out, "train.max_steps=4", "train.save_every=2")).returncode == 0
    assert cli("report", out).returncode == 0
    before = snapshot(out)
    assert_user_error(
        cli(*pretrain_args(world, out, "train.max_steps=2")), "already holds a training run", "--resume", "--overwrite"
    )
    assert snapshot(out) == before
    both = cli("pretrain", "--out", out, "--resume", "--overwrite")
    assert both.returncode == 2 and "not allowed with" in both.stderr and "Traceback" not in both.stderr

    replaced = cli(*pretrain_args(world, out, "train.max_steps=2", "train.seed=7", flags=["--overwrite"]))
    assert replaced.returncode == 0, replaced.stderr
    # Only the new run's checkpoint is left, and the exported model is its weights, not step 4's.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    final = out / "checkpoints" / "step-0000002" / "model.safetensors"
    assert (out / "model" / "model.safetensors").read_bytes() == final.read_bytes()
    assert final.read_bytes() != before["model/model.safetensors"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 2
    assert not (out / "report.md").exists() and not (out / "loss.png").exists()  # they described the old run


def test_an_output_path_that_cannot_be_written_is_one_line(world, tiny_model, tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    assert_user_error(cli("tokenizer", "--input", world / "corpus.txt", "--out", blocker / "tok"), str(blocker))
    assert_user_error(
        cli("prepare", "--tokenizer", world / "tok", "--input", world / "corpus.txt", "--out", blocker / "shards"),
        str(blocker),
    )
    assert_user_error(cli(*pretrain_args(world, blocker / "run")), f"needs {blocker} to be a folder, but it is a file")
    assert_user_error(
        cli(
            "eval",
            "--model",
            tiny_model,
            "--tasks",
            "ppl",
            "--data",
            world / "corpus.txt",
            "--limit",
            "2",
            "--out",
            blocker / "results.json",
        ),
        f"{blocker} is a file where a folder is needed",
    )
    (tmp_path / "a_folder").mkdir()
    assert_user_error(
        cli(
            "eval",
            "--model",
            tiny_model,
            "--tasks",
            "ppl",
            "--data",
            world / "corpus.txt",
            "--limit",
            "2",
            "--out",
            tmp_path / "a_folder",
        ),
        f"{tmp_path / 'a_folder'} is a folder where a file is needed",
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    assert blocker.read_text() == "mine"


def test_resume_with_a_broken_run_record_is_one_line(world, tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*pretrain_args(world, out, "train.max_steps=2")).returncode == 0
    for broken in ('{"config": {"model"', '{"config": null}'):
        (out / "run.json").write_text(broken)
        assert_user_error(cli("pretrain", "--out", out, "--resume"), "run.json", "--config")


def test_report_writes_a_training_runs_card_from_its_records(world, tmp_path, cli):
    out = tmp_path / "runs" / "base"
    assert (
        cli(*pretrain_args(world, out, "train.max_steps=4", "train.log_every=2", "train.eval_every=2")).returncode == 0
    )
    result = cli("report", tmp_path / "runs")  # a folder holding runs, as a demo's does
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"report -> {out / 'report.md'}"]
    text = (out / "report.md").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    params = GPT.from_pretrained(out / "model").num_params()
    assert f"| parameters | {params:,} |" in text
    assert "| steps | 4 of 4 |" in text and f"| tokens | {metrics[-1]['tokens']:,} (to step 4) |" in text
    assert f"| train loss, last logged | {metrics[-1]['loss']:.4f} (step 4) |" in text
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 2 and f"{val[-1]:.4f} (step 4) / {min(val):.4f}" in text
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A killed run: its last record evaluation only, then the torn tail of a write.
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "val_loss": 0.5}) + '\n{"step": 6, "lo')
    assert cli("report", out).returncode == 0
    again = (out / "report.md").read_text()
    assert f"| tokens | {metrics[-1]['tokens']:,} (to step 4) |" in again and "0.5000 (step 5)" in again
    # A line before the last that does not parse was not torn by a kill: it is named, not skipped.
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join([lines[0], '{"step": 2, "lo\n', *lines[2:]]))
    assert_user_error(cli("report", out), f"{out / 'metrics.jsonl'}:2 is not a metrics record", "delete line 2")
    assert (out / "report.md").read_text() == again
    (tmp_path / "nothing").mkdir()
    assert_user_error(cli("report", tmp_path / "nothing"), "holds no run")
    (out / "run.json").write_text('{"config": ')
    assert_user_error(cli("report", out), "run.json", "not valid JSON")


def test_world_and_demo_errors(tmp_path, cli):
    assert_user_error(cli("world", "--out", tmp_path / "w", "--preset", "huge"), "huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_user_error(cli("world", "--out", tmp_path / "busy"), "--force")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert_user_error(cli("demo", "--preset", "nope", "--out", tmp_path / "d"), "nope")
