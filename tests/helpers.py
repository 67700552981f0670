"""Helpers the test files share: running gptlab in a subprocess or in this process, and checking one-line errors.

Fixtures live in conftest.py; these are plain functions and constants, imported as `from helpers import ...`
(pytest puts tests/ on sys.path, and importing from conftest.py is discouraged by its docs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.runs import RunFolder
from gptlab.world import WorldSize

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 600  # long enough for the torchrun tests on 2 cores; a hung child fails instead of stalling CI

# The words the tiny model's tokenizer is trained on; tests that score text with that model write it from these words.
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TINY_MODEL_BLOCK = 384  # the eval tests' 5-shot prompts are 330-420 tokens: some fit, some are cut from the left
# A TinyWorld of every kind of file in well under a second (the quick preset takes tens of seconds).
TINY_WORLD = WorldSize(
    n_countries=4,
    n_cities=9,
    n_companies=6,
    n_universities=4,
    n_jobs=6,
    n_people=60,
    test_fraction=0.25,
    val_fraction=0.4,
    bios_per_person=3,
    corpus_mb=0.15,
    max_digits=3,
    max_mul_digits=2,
    arith_test=20,
    arith_fewshot=4,
    n_words=200,
    word_test=20,
    word_fewshot=8,
    sft_train=300,
    sft_test_per_family=6,
    prefs_train=150,
    prefs_test_per_family=4,
)

TORCHRUN_TWO_RANKS = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# For subprocesses: tiny models train fastest on one thread, two ranks on two cores. Both variables: torch built
# with MKL takes its thread count from MKL_NUM_THREADS when that is set, over OMP_NUM_THREADS.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# `run_python("-c", KILL_AFTER_FIRST_SAVE, COMMAND, ...)` runs a training command that is SIGKILLed right after
# its first checkpoint is written (under torchrun, each rank once rank 0 has written it: run it as a script file).
KILL_AFTER_FIRST_SAVE = """
import os, signal, sys
import torch.distributed as dist
import gptlab.train.loop as loop
original = loop.Trainer.save_checkpoint
def save_then_die(self):
    original(self)
    if dist.is_initialized():
        dist.barrier()  # under torchrun, no rank dies before rank 0 has written the checkpoint
    os.kill(os.getpid(), signal.SIGKILL)
loop.Trainer.save_checkpoint = save_then_die
from gptlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextmanager
def one_thread():
    """torch on one thread in this process, as ONE_THREAD sets it for a subprocess: tiny models train fastest so
    (several threads mostly wait on each other), and a run here equals, bit for bit, one in a ONE_THREAD subprocess
    whatever thread count the environment or an earlier test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_python(
    *args,
    stdin: str | None = None,
    check: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = SUBPROCESS_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root with this checkout importable; `env` adds to os.environ.

    With `check`, a non-zero exit fails the test with the child's stderr (subprocess's own error hides it)."""
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        input=stdin,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"python {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def gptlab(
    *args,
    stdin: str | None = None,
    check: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = SUBPROCESS_TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """`python -m gptlab ARGS` as a user runs it (see run_python)."""
    return run_python("-m", "gptlab", *args, stdin=stdin, check=check, env=env, timeout=timeout)


def gptlab_in_process(capfd: pytest.CaptureFixture, *args) -> subprocess.CompletedProcess:
    """`gptlab ARGS` through gptlab.cli.main in this process, its exit code and output as gptlab() returns them,
    Python's warnings (under its default filters) on stderr: for a test that reads an error line, with no kill
    or torchrun involved, this spares a new interpreter importing torch. A traceback is raised, failing the test."""
    from gptlab.cli import main

    capfd.readouterr()  # what came before is not this command's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(["gptlab", *map(str, args)], code, out, err)


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A user mistake: exit code 2 and one `gptlab: error: ` line on stderr naming every word, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptlab: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """An exception raised in this process carries a non-empty one-line message naming every fragment."""
    message = str(error.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to show that a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, records) -> Path:
    """One JSON object per line; a string record is written as it is (a malformed line, for instance).
    Missing parent folders are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


VOLATILE_METRICS = ("tok_per_s", "mfu", "peak_mem_mb")  # wall-clock figures: never equal between two runs


def straight_and_resumed(command: str, sets: list[str], tmp_path: Path, checkpoint: str) -> tuple[Path, Path]:
    """``gptlab COMMAND --set ...`` run to its end in ``tmp_path/straight``, and again in
    ``tmp_path/killed``, SIGKILLed after its first save (which must be ``checkpoint``) and resumed
    there; both on one thread. Returns the two run folders, for the caller to compare."""
    args = [a for s in sets for a in ("--set", s)]
    straight = gptlab(command, "--out", tmp_path / "straight", *args, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    killed = run_python("-c", KILL_AFTER_FIRST_SAVE, command, "--out", out, *args, env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in RunFolder(out).checkpoints()] == [checkpoint] and not (out / "model").exists()
    resumed = gptlab(command, "--out", out, "--resume", env=ONE_THREAD)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    return tmp_path / "straight", out


def assert_same_tensors(*files: Path) -> None:
    first, second = (load_file(f) for f in files)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def logged_metrics(run: Path) -> list[dict]:
    """A run's metrics records without the wall-clock figures."""
    return [{k: v for k, v in m.items() if k not in VOLATILE_METRICS} for m in RunFolder(run).read_metrics()]
