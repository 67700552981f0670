"""User text that is not UTF-8, a full disk, killed writers and the settings that used to end in a
traceback or a misleading line: each ends in one clear line, and nothing is left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import gptlab.data.shards as shards_module
from gptlab.align.dpo import save_reference
from gptlab.chat import ChatSession, typed_lines
from gptlab.checkpoint import atomic_folder
from gptlab.config import read_raw
from gptlab.data import prepare
from gptlab.data.chat import read_records
from gptlab.data.prefs import load_pref_data
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.fileio import write_error, write_text_atomic
from gptlab.model import GPT, ModelConfig
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from helpers import WORDS, assert_one_line, assert_user_error, gptlab_in_process, run_python, write_jsonl

NOT_UTF8 = b"\xff\xfe"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def user_error(capfd, args, *words: str) -> str:
    """`gptlab ARGS`, in this process, ends as a user mistake naming every word: its one line."""
    result = gptlab_in_process(capfd, *args)
    assert_user_error(result, *words)
    return result.stderr.strip()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The id of a process that has finished."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model) -> Path:
    """A corpus of the tiny model's words and its shards (the tiny model's tokenizer)."""
    root = tmp_path_factory.mktemp("harden_io")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choices(WORDS, k=40)) for _ in range(300)) + "\n")
    prepare(tiny_model, [root / "corpus.txt"], root / "shards", val_fraction=0.1, workers=1)
    return root


def small_block_model(tiny_model: Path, folder: Path, block_size: int) -> Path:
    """The tiny model's tokenizer with a fresh model of a small block size."""
    tokenizer = Tokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    GPT(config).save_pretrained(folder, tokenizer=tokenizer)
    return folder


# --------------------------------------------------------------------------- text that is not UTF-8


def test_chat_stdin_that_is_not_utf8_ends_in_one_line_naming_the_line(capfd, monkeypatch, tiny_model):
    piped = io.TextIOWrapper(io.BytesIO(b"alpha beta\ngamma " + NOT_UTF8 + b" delta\nnever read\n"))
    monkeypatch.setattr(sys, "stdin", piped)
    result = gptlab_in_process(capfd, "chat", "--model", tiny_model, "--max-new-tokens", "2", "--seed", "0")
    assert_user_error(result, "stdin:2", "UTF-8")
    assert len(result.stdout.splitlines()) == 1  # the first line was answered before the bad one


def test_a_line_typed_in_another_encoding_is_not_sent_and_the_chat_goes_on(monkeypatch):
    typed = iter(["alpha", "gamma \udcff", "beta"])

    def fake_input(prompt: str) -> str:
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    notices: list[str] = []
    assert list(typed_lines("> ", notices.append)) == ["alpha", "beta"]
    assert len(notices) == 1 and "UTF-8" in notices[0] and "not sent" in notices[0]


def test_text_arguments_that_are_not_utf8_are_one_line_naming_the_flag(capfd, tiny_model):
    bad = os.fsdecode(b"alpha " + NOT_UTF8)  # what Python makes of such bytes in argv
    user_error(capfd, ["sample", "--model", tiny_model, "--prompt", bad], "--prompt", "UTF-8")
    user_error(capfd, ["sample", "--model", tiny_model, "--prompt", "alpha", "--stop", bad], "--stop")
    user_error(capfd, ["chat", "--model", tiny_model, "--system", bad], "--system", "UTF-8")


def write_mmlu(root: Path, test_rows: bytes) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "test" / "logic_test.csv").write_bytes(test_rows)
    return root


def test_an_mmlu_csv_that_is_not_utf8_names_the_file_and_line(capfd, tiny_model, tmp_path):
    data = write_mmlu(tmp_path / "mmlu", b"alpha,a,b,c,d,A\nbeta " + NOT_UTF8 + b",a,b,c,d,B\n")
    line = user_error(capfd, ["eval", "--model", tiny_model, "--tasks", "mmlu", "--data", data], "UTF-8")
    assert f"{data / 'test' / 'logic_test.csv'}:2" in line


def test_a_task_file_that_is_not_utf8_names_the_file_and_line(capfd, tiny_model, tmp_path):
    task = tmp_path / "task.toml"
    task.write_bytes(b'test = "t.jsonl"\ndoc_to_text = "{q}"\ndoc_to_target = "' + NOT_UTF8 + b'"\n')
    user_error(capfd, ["eval", "--model", tiny_model, "--tasks", task], f"{task}:3", "UTF-8")


def test_preference_and_chat_records_that_are_not_utf8_name_the_file_and_line(tiny_model, tmp_path):
    pair = {"prompt": "alpha", "chosen": "beta", "rejected": "gamma"}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes(json.dumps(pair).encode() + b'\n{"prompt": "' + NOT_UTF8 + b'"}\n')
    with pytest.raises(UserError) as e:
        load_pref_data(prefs, Tokenizer.from_pretrained(tiny_model), max_length=64)
    assert_one_line(e, f"{prefs}:2", "UTF-8")
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(b'{"messages": []}\n\n{"messages": "' + NOT_UTF8 + b'"}\n')
    with pytest.raises(UserError) as e:
        list(read_records(chat))
    assert_one_line(e, f"{chat}:3", "UTF-8")


def test_model_folder_text_files_that_are_not_utf8_are_one_line(capfd, tiny_model, tmp_path):
    for name, content in (
        ("chat_template.jinja", b"{{ '" + NOT_UTF8 + b"' }}"),
        ("tokenizer_config.json", b'{"bos_token": "' + NOT_UTF8 + b'"}'),
        ("config.json", b'{\n"model_type": "' + NOT_UTF8 + b'"}'),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_model.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / name).write_bytes(content)
        line = 2 if name == "config.json" else 1
        user_error(capfd, ["sample", "--model", folder, "--prompt", "alpha"], f"{name}:{line}", "UTF-8")


# --------------------------------------------------------------------------- a full disk, killed writers


def test_world_on_a_full_disk_is_one_line_and_leaves_no_staging(capfd, monkeypatch, tmp_path):
    stale = tmp_path / f".world.staging-{dead_pid()}"  # what a killed `gptlab world` left
    stale.mkdir()
    running = tmp_path / f".world.staging-{os.getppid()}"  # a run still writing
    running.mkdir()

    def full_disk(self, *args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(Path, "write_text", full_disk)
    user_error(
        capfd, ["world", "--out", tmp_path / "world", "--preset", "quick"], str(tmp_path / "world"), "No space left"
    )
    assert hidden(tmp_path) == [running.name] and not (tmp_path / "world").exists()


class FullDiskFile:
    """A shard file on a full disk: writes fail, and so does closing, which flushes what is buffered."""

    def __init__(self, *args):
        pass

    def write(self, data):
        raise ENOSPC

    def close(self):
        raise ENOSPC


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_staging(capfd, monkeypatch, corpus, tiny_model, tmp_path):
    def open_on_full_disk(self):
        self._file = FullDiskFile()

    monkeypatch.setattr(shards_module._ShardWriter, "_open", open_on_full_disk)
    out = tmp_path / "shards"
    args = ["prepare", "--tokenizer", tiny_model, "--input", corpus / "corpus.txt", "--out", out, "--workers", "1"]
    user_error(capfd, args, f"cannot write {out}", "No space left on device")
    assert not out.exists()  # made by this run, so removed with its staging folder
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(capfd, args, str(out), "No space left on device")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_prepare_removes_the_staging_folders_of_killed_runs_only(corpus, tiny_model, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    killed = out / f".prepare-{dead_pid()}-0123456789ab"
    running = out / f".prepare-{os.getppid()}-0123456789ab"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "train_000000.bin").write_bytes(b"half")
    prepare(tiny_model, [corpus / "corpus.txt"], out, workers=1)
    assert hidden(out) == [running.name]


KILLED_DURING_A_CHECKPOINT = """
import os, signal, sys
from gptlab.checkpoint import atomic_folder
with atomic_folder(sys.argv[1]) as folder:
    (folder / "model.safetensors").write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_checkpoint_write_killed_midway_is_removed_by_the_next_write(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    killed = run_python("-c", KILLED_DURING_A_CHECKPOINT, checkpoints / "step-0000004")
    assert killed.returncode == -signal.SIGKILL
    assert len(hidden(checkpoints)) == 1 and not (checkpoints / "step-0000004").exists()
    (checkpoints / ".step-0000002.tmp-0123456789ab").mkdir()  # named as gptlab did before process ids
    running = checkpoints / f".step-0000006.tmp-{os.getppid()}-0123456789ab"
    running.mkdir()
    with atomic_folder(checkpoints / "step-0000008") as folder:
        (folder / "model.safetensors").write_bytes(b"whole")
    assert hidden(checkpoints) == [running.name]


def test_a_text_file_write_killed_midway_is_removed_by_the_next_write(tmp_path):
    (tmp_path / f".run.json.tmp-{dead_pid()}").write_text("{half")
    write_text_atomic(tmp_path / "run.json", "{}")
    assert hidden(tmp_path) == [] and (tmp_path / "run.json").read_text() == "{}"


def pretrain_args(out: Path, shards: Path) -> list:
    sets = [
        f"data.shards={shards}",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=32",
        "train.seq_len=16",
        "train.batch_size=4",
        "train.eval_batches=1",
        "train.max_steps=2",
        "train.save_every=2",
        "train.eval_every=2",
        "train.warmup_steps=1",
    ]
    return ["pretrain", "--out", out, *[arg for s in sets for arg in ("--set", s)]]


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_it(capfd, monkeypatch, corpus, tmp_path):
    def full_disk(*args, **kwargs):  # how safetensors reports it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("gptlab.checkpoint.save_file", full_disk)
    out = tmp_path / "run"
    result = gptlab_in_process(capfd, *pretrain_args(out, corpus / "shards"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"gptlab: error: cannot write {out / 'checkpoints' / 'step-0000002'}: No space"
    )
    assert hidden(out / "checkpoints") == [] and list((out / "checkpoints").iterdir()) == []


def test_a_write_error_without_a_path_is_given_its_target(monkeypatch, tmp_path):
    staged = tmp_path / ".model.tmp-1-0123456789ab"
    staged.mkdir()
    target = tmp_path / "model"
    error = write_error(ENOSPC, target, staged)
    assert (error.errno, error.filename) == (errno.ENOSPC, str(target))
    inside = write_error(
        PermissionError(errno.EACCES, "Permission denied", str(staged / "config.json")), target, staged
    )
    assert (inside.errno, inside.filename) == (errno.EACCES, str(target / "config.json"))
    assert write_error(FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere"), target, staged) is None
    assert write_error(KeyboardInterrupt(), target, staged) is None
    # torch.save reports a full disk as a RuntimeError that names neither: the free space tells.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert write_error(torch_error, target, staged) is None
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    assert write_error(torch_error, target, staged).errno == errno.ENOSPC


def test_saved_files_keep_the_umasks_permissions(tiny_model, tmp_path):
    previous = os.umask(0o027)
    try:
        GPT.from_pretrained(tiny_model).save_pretrained(
            tmp_path / "model", tokenizer=Tokenizer.from_pretrained(tiny_model)
        )
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes


def test_dpos_reference_file_keeps_the_umasks_permissions_and_a_killed_writes_leftover_goes(tmp_path):
    path = tmp_path / "ref_logps.safetensors"
    leftover = tmp_path / f".{path.name}.tmp-{2**22 + 7}"  # a process id no running process has
    leftover.write_bytes(b"half a file")
    previous = os.umask(0o027)
    try:
        save_reference(path, {"train": torch.zeros(3, 2)}, {"ref": "m"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_bytes(b'init = "a"\n# caf\xe9\n')
    with pytest.raises(UserError) as error:
        read_raw(config)
    assert_one_line(error, str(config), ":2", "UTF-8")


# --------------------------------------------------------------------------- settings that used to mislead


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(capfd, tiny_model, temperature):
    common = ["--model", tiny_model, "--temperature", temperature]
    user_error(capfd, ["sample", *common, "--prompt", "alpha"], "temperature", temperature.lstrip("-"))
    user_error(capfd, ["chat", *common], "temperature")
    engine = Engine.from_pretrained(tiny_model)
    with pytest.raises(UserError, match="temperature"):
        ChatSession(engine, temperature=float(temperature))
    with pytest.raises(UserError, match="temperature"):
        engine.generate([[1, 2]], max_new_tokens=1, temperature=float(temperature))


def test_eval_on_a_device_that_does_not_exist_is_one_line(capfd, tiny_model, tmp_path):
    data = write_mmlu(tmp_path / "mmlu", b"alpha,a,b,c,d,A\n")
    for device in ("nonsense", "cuda:99", "meta"):
        args = ["eval", "--model", tiny_model, "--tasks", "mmlu", "--data", data, "--device", device]
        user_error(capfd, args, f"--device {device}" if device != "nonsense" else "'nonsense'")


def write_ladder(folder: Path, ladder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"kind": "ladder"}))
    (folder / "ladder.json").write_text(ladder if isinstance(ladder, str) else json.dumps(ladder))
    return folder


def test_report_on_a_garbage_ladder_json_is_one_line(capfd, tmp_path):
    run = {"name": "d1", "params": 10, "tokens": 20, "flops": 3.0, "val_loss": 2.0, "train_seconds": 1.0, "metrics": {}}
    for i, garbage in enumerate(
        [
            "not json",
            [1],
            {"runs": []},
            {"runs": [1]},
            {"runs": [{"name": "d1"}]},
            {"runs": [run]},
            {"runs": [run], "fit": {"power_law": {}, "chinchilla": {}}},
        ]
    ):
        folder = write_ladder(tmp_path / str(i), garbage)
        user_error(capfd, ["report", folder], str(folder / "ladder.json"), "gptlab ladder --out")
    folder = write_ladder(tmp_path / "bytes", "")
    (folder / "ladder.json").write_bytes(b'{"runs": "' + NOT_UTF8 + b'"}')
    user_error(capfd, ["report", folder], f"{folder / 'ladder.json'}:1", "UTF-8")
    folder = write_ladder(
        tmp_path / "samples", {"runs": [run], "fit": {"monotone": True, "power_law": {}, "chinchilla": {}}}
    )
    write_jsonl(folder / "runs" / "d1" / "samples.jsonl", [{"task": "arith_add_2"}])
    user_error(capfd, ["report", folder], "samples.jsonl:1", "doc_id")


def test_a_long_system_message_is_named_as_what_is_too_long(capfd, tiny_model):
    long_system = " ".join(WORDS * 40)  # over the tiny model's 384 tokens
    line = user_error(capfd, ["chat", "--model", tiny_model, "--system", long_system, "--max-new-tokens", "1"])
    assert "system message" in line and "shorten --system" in line and "max-new-tokens" not in line
    some_system = " ".join(WORDS * 15)  # fits, but not with the default reply length
    line = user_error(capfd, ["chat", "--model", tiny_model, "--system", some_system])
    shortest = int(line.split("take ")[1].split(")")[0])
    assert f"use --max-new-tokens {384 - shortest} or less" in line


def test_an_empty_mmlu_test_file_is_refused_naming_it(capfd, tiny_model, tmp_path):
    data = write_mmlu(tmp_path / "mmlu", b"")
    args = ["eval", "--model", tiny_model, "--tasks", "mmlu", "--data", data]
    user_error(capfd, args, str(data / "test" / "logic_test.csv"), "no questions")


def test_cot_on_a_task_without_a_chain_of_thought_form_is_refused(capfd, tiny_model, tmp_path):
    data = write_mmlu(tmp_path / "mmlu", b"alpha,a,b,c,d,A\n")
    args = ["eval", "--model", tiny_model, "--tasks", "mmlu", "--data", data, "--cot"]
    user_error(capfd, args, "--cot", "arith", "mmlu")


def test_sample_fits_its_default_length_to_the_models_window(capfd, tiny_model, tmp_path):
    model = small_block_model(tiny_model, tmp_path / "model", block_size=8)
    assert len(Tokenizer.from_pretrained(model).encode("alpha beta")) + 64 > 8  # the old fixed default overflowed
    result = gptlab_in_process(capfd, "sample", "--model", model, "--prompt", "alpha beta", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    long_prompt = " ".join(WORDS)
    user_error(capfd, ["sample", "--model", model, "--prompt", long_prompt], "--prompt is", "block_size 8")


def test_the_loss_takes_a_shifted_slice_as_targets():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (3, 9))
    assert not x[:, 1:].is_contiguous()
    torch.testing.assert_close(model(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:].contiguous()))


def test_metrics_with_bytes_that_are_not_utf8_keep_their_readable_records(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_path.write_bytes(b'{"step": 1, "loss": 2.5}\n{"step": 2, "lo' + NOT_UTF8 + b"\n")
    assert run.read_metrics() == [{"step": 1, "loss": 2.5}]


def test_huge_numbers_and_records_without_their_fields_are_one_line(capfd, corpus, tiny_model, tmp_path):
    huge = str(10**30)
    text = corpus / "corpus.txt"
    user_error(capfd, ["tokenizer", "--input", text, "--vocab-size", huge, "--out", tmp_path / "tok"], "vocab_size")
    args = ["prepare", "--tokenizer", tiny_model, "--input", text, "--out", tmp_path / "shards", "--workers", huge]
    user_error(capfd, args, "workers", huge)
    user_error(capfd, ["sample", "--model", tiny_model, "--prompt", "alpha", "--seed", huge], "seed", huge)
    gsm8k = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1+1?", "answer": "#### 2"}, {"q": 1}])
    args = ["eval", "--model", tiny_model, "--tasks", "gsm8k", "--data", gsm8k]
    user_error(capfd, args, f"{gsm8k}:2", "'question'")


def test_a_full_disk_while_logging_metrics_names_the_file(monkeypatch, tmp_path):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise ENOSPC

    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: FullDisk())
    run = RunFolder(tmp_path)
    with pytest.raises(OSError) as e:
        run.append_metrics({"step": 1, "loss": 2.5})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(run.metrics_path))
