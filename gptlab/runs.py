"""A run folder's one owner (torch-free): every stage, the report and the demo go through it.

A run folder holds ``run.json`` (the resolved config, the run's kind, versions, the command
line), ``metrics.jsonl`` (one record per logged step), ``checkpoints/step-NNNNNNN/`` (complete
checkpoints, oldest first), ``model/`` (the exported model), ``report.md`` and, for a DPO run,
``ref_logps.safetensors`` (its reference log-probs). The kind of run
(``KINDS``) is recorded in run.json when the run starts, so nothing has to guess it from the
files it finds.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from gptlab import __version__
from gptlab.errors import UserError
from gptlab.fileio import write_error, write_json_atomic, write_text_atomic

KINDS = ("pretrain", "sft", "ladder", "demo", "reward", "dpo", "ppo", "grpo", "arena")
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{7,})$")


class RunFolder:
    """Paths and records of one run folder; nothing is read or written until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def record_path(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def ref_logps_path(self) -> Path:
        """A DPO run's reference log-probs of its pairs, computed once before training."""
        return self.path / "ref_logps.safetensors"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    # ---- run.json ----------------------------------------------------------------------------

    def has_record(self) -> bool:
        return self.record_path.is_file()

    def read_record(self, fix: str = "restore it or remove it") -> dict:
        """run.json as ``write_record`` wrote it; one error line ending in ``fix`` when it is not."""
        path = self.record_path
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} does not exist: {self.path} is not a gptlab run folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} is not a run record (a JSON object); {fix}")
        return record

    def write_record(self, kind: str, config: dict, **info) -> None:
        """Write run.json (atomically): the kind of run, its resolved config, versions, git
        commit, command line and ``info`` (seed, device, parameters, ...)."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}; one of {', '.join(KINDS)}")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.record_path, {"kind": kind, **run_info(config), **info})

    def kind(self) -> str | None:
        """The kind run.json records; None when the folder holds no run.json."""
        if not self.has_record():
            return None
        kind = self.read_record().get("kind")
        if kind not in KINDS:
            raise UserError(
                f"{self.record_path} records no known kind of run ({kind!r}); it was not written by this "
                "version of gptlab: run the stage again into a new folder"
            )
        return kind

    # ---- metrics.jsonl -----------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl (none when it does not exist). Its last line may be torn, the
        tail of a killed run's last write (appends are not atomic): that line is left out. Any other
        line that is not a record was damaged or edited after it was written, and leaving it out would
        hide the records it held, so it is one error line naming the file and the line."""
        if not self.metrics_path.is_file():
            return []
        lines = [(n, line) for n, line in enumerate(self.metrics_path.read_bytes().split(b"\n"), 1) if line.strip()]
        records = []
        for n, line in lines:
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as e:  # not UTF-8, or not JSON
                if n == lines[-1][0]:
                    continue  # the torn tail
                if isinstance(e, json.JSONDecodeError):
                    raise self._damaged_metrics(n, f"not JSON: {e.msg} at column {e.colno}") from None
                raise self._damaged_metrics(n, "bytes that are not UTF-8") from None
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise self._damaged_metrics(n, 'not a JSON object with an integer "step"')
            records.append(record)
        return records

    def _damaged_metrics(self, line: int, reason: str) -> UserError:
        return UserError(
            f"{self.metrics_path}:{line} is not a metrics record ({reason}); only a killed run's last line may be "
            f"cut short, so the file was damaged or edited: restore it, or delete line {line} to keep the others"
        )

    def append_metrics(self, record: dict) -> None:
        try:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            error = write_error(e, self.metrics_path)  # a full disk: the failed write names no file
            if error is None:
                raise
            raise error from e

    def keep_metrics_until(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites what the killed one logged. A fresh run
        (step 0) keeps no record, so it does not read, nor stop at, what an earlier run left."""
        if self.metrics_path.exists():
            kept = [record for record in self.read_metrics() if record["step"] <= step] if step > 0 else []
            write_text_atomic(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))

    # ---- checkpoints/ and model/ -------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (atomic writes mean a folder with the final name is
        complete; temp folders never match the pattern)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:07d}"

    def holds_training(self) -> bool:
        """Whether an earlier training run left checkpoints or an exported model here."""
        return bool(self.checkpoints() or self.model_dir.exists())

    def checkpoints_to_resume(self) -> list[Path]:
        """The checkpoints ``--resume`` may continue from, oldest first. None is an error, never a
        fresh start: a mistyped ``--out`` would otherwise train from scratch under a resume's name."""
        found = self.checkpoints()
        if found:
            return found
        if not self.path.is_dir():
            where = f"{self.path} does not exist"
        elif self.has_record():
            where = f"{self.path} holds run.json but no checkpoint in {self.checkpoints_dir} (it stopped before one)"
        else:
            where = f"{self.path} holds no run (no checkpoint in {self.checkpoints_dir})"
        raise UserError(f"nothing to resume: {where}; check --out, or drop --resume to start a fresh run")


def run_info(config: dict) -> dict:
    """What every run.json records besides its kind: the resolved config, versions, git commit
    and the command line."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "config": config,
        "argv": sys.argv,
        "versions": {"gptlab": __version__, "torch": _torch_version(), "python": platform.python_version()},
        "git_commit": commit,
    }


def _torch_version() -> str | None:
    """torch's version without importing it (a report or an arena need not load torch)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
