"""The run folder (gptlab.runs) and the report chosen by the kind a run.json records."""

import json

import pytest

from gptlab import report
from gptlab.errors import UserError
from gptlab.report import Section, concatenate, write_reports
from gptlab.runs import RunFolder
from helpers import assert_one_line, run_python


def test_a_record_round_trips_with_its_kind(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.kind() is None and not run.has_record()
    run.write_record("sft", {"train": {"lr": 0.1}}, seed=3, device="cpu")
    record = run.read_record()
    assert record["kind"] == "sft" and record["config"] == {"train": {"lr": 0.1}}
    assert record["seed"] == 3 and record["device"] == "cpu"
    assert {"gptlab", "python"} <= set(record["versions"]) and isinstance(record["argv"], list)
    assert run.kind() == "sft"
    with pytest.raises(ValueError, match="unknown run kind"):
        run.write_record("finetune", {})
    assert run.kind() == "sft"  # the refused write left the record as it was


def test_a_broken_or_foreign_record_is_one_line(tmp_path):
    run = RunFolder(tmp_path)
    run.record_path.write_text('{"config": ')
    with pytest.raises(UserError, match="not valid JSON.*resume with --config"):
        run.read_record(fix="resume with --config")
    run.record_path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a run record"):
        run.read_record()
    run.record_path.write_text('{"kind": "finetune"}')
    with pytest.raises(UserError, match="no known kind"):
        run.kind()
    with pytest.raises(UserError, match="not a gptlab run folder"):
        RunFolder(tmp_path / "missing").read_record()


def test_metrics_leave_out_a_torn_tail_and_keep_until_a_step(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_metrics() == []
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "lo')  # a killed run's last write
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3]
    run.keep_metrics_until(2)
    assert [m["step"] for m in run.read_metrics()] == [1, 2]
    assert run.metrics_path.read_text().endswith("\n")  # the torn line is gone, appends start on a new line


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"step": 2, "lo', "not JSON: Unterminated string"),
        (b'{"step": 2, "loss": 0.5}\xff', "not UTF-8"),
        (b"[2, 0.5]", 'not a JSON object with an integer "step"'),
        (b'{"loss": 0.5}', 'not a JSON object with an integer "step"'),
        (b'{"step": "2", "loss": 0.5}', 'not a JSON object with an integer "step"'),
    ],
    ids=["cut", "not_utf8", "list", "no_step", "text_step"],
)
def test_a_damaged_line_before_the_last_is_one_error_naming_it(tmp_path, line, reason):
    run = RunFolder(tmp_path)
    run.metrics_path.write_bytes(b'{"step": 1, "loss": 1.0}\n' + line + b'\n{"step": 3, "loss": 0.3}\n')
    before = run.metrics_path.read_bytes()
    for read in (run.read_metrics, lambda: run.keep_metrics_until(3)):  # a report, and a resume
        with pytest.raises(UserError) as e:
            read()
        assert_one_line(e, f"{run.metrics_path}:2 is not a metrics record", reason, "delete line 2")
    assert run.metrics_path.read_bytes() == before  # nothing dropped


def test_only_a_last_line_that_does_not_parse_counts_as_torn(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_path.write_bytes(b'{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss": 0.5}\r\n{"step": 3, "lo\xc3\n\n')
    assert run.read_metrics() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]  # blank lines hold nothing
    run.metrics_path.write_bytes(b'{"step": 1, "loss": 1.0}\n[1, 2]\n')  # complete, but no record
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a metrics record"):
        run.read_metrics()
    run.metrics_path.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')  # whole, but no newline
    assert [m["step"] for m in run.read_metrics()] == [1, 2]


def test_a_fresh_run_empties_the_metrics_an_earlier_run_left_however_damaged(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_path.write_bytes(b'{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n')
    run.keep_metrics_until(0)
    assert run.metrics_path.read_text() == "" and run.read_metrics() == []


def test_checkpoints_are_listed_oldest_first_without_temp_folders(tmp_path):
    run = RunFolder(tmp_path)
    assert run.checkpoints() == [] and not run.holds_training()
    for step in (100, 2, 10):
        run.checkpoint_dir(step).mkdir(parents=True)
    (run.checkpoints_dir / ".step-0000200.tmp-123").mkdir()  # an interrupted atomic write
    (run.checkpoints_dir / "step-0000300.tmp").mkdir()
    (run.checkpoints_dir / "step-0000400").write_text("a file, not a checkpoint")
    assert [p.name for p in run.checkpoints()] == ["step-0000002", "step-0000010", "step-0000100"]
    assert run.holds_training()


def test_runs_and_the_report_do_not_import_torch():
    code = "import sys, gptlab.runs, gptlab.report; print('torch' in sys.modules)"
    result = run_python("-c", code, check=True)
    assert result.stdout.strip() == "False"


@pytest.fixture
def writers(monkeypatch):
    """Each report writer replaced by one that notes (kind, folder name): which report a folder gets."""
    calls = []
    for kind in report.REPORTS:
        monkeypatch.setitem(report.REPORTS, kind, lambda folder, kind=kind: calls.append((kind, folder.name)) or folder)
    return calls


def _record(folder, kind=None, files=()):
    folder.mkdir(parents=True)
    record = {"config": {}} if kind is None else {"kind": kind, "config": {}}
    (folder / "run.json").write_text(json.dumps(record))
    for name in files:
        (folder / name).write_text("{}\n")
    return folder


def test_the_report_follows_the_recorded_kind_not_the_files(tmp_path, writers):
    write_reports(_record(tmp_path / "a", "ladder", files=["metrics.jsonl"]))
    write_reports(_record(tmp_path / "b", "sft", files=["ladder.json"]))
    assert writers == [("ladder", "a"), ("sft", "b")]
    with pytest.raises(UserError, match="kind 'arena'"):
        write_reports(_record(tmp_path / "c", "arena", files=["metrics.jsonl"]))


def test_a_demo_or_a_folder_without_record_reports_each_run_inside(tmp_path, writers):
    demo = _record(tmp_path / "demo", "demo", files=["metrics.jsonl"])
    _record(demo / "sft", "sft")
    _record(demo / "ladder", "ladder")
    (demo / "world").mkdir()
    assert write_reports(demo) == [demo / "ladder", demo / "sft"]
    assert writers == [("ladder", "ladder"), ("sft", "sft")]
    writers.clear()
    runs = tmp_path / "runs"
    _record(runs / "base", "pretrain")
    write_reports(runs)
    assert writers == [("pretrain", "base")]
    with pytest.raises(UserError, match="holds no run"):
        write_reports(demo / "world")


def test_a_record_from_before_kinds_reports_as_its_files_say(tmp_path, writers):
    write_reports(_record(tmp_path / "ladder", files=["ladder.json", "metrics.jsonl"]))
    write_reports(_record(tmp_path / "run", files=["metrics.jsonl"]))
    assert writers == [("ladder", "ladder"), ("pretrain", "run")]
    with pytest.raises(UserError, match="holds no run"):
        write_reports(_record(tmp_path / "killed_before_logging"))


def test_a_report_is_its_sections_in_order():
    sections = [Section("# Demo"), Section("## Data\n\n| a |", []), Section("## Timings")]
    assert concatenate(sections) == "# Demo\n\n## Data\n\n| a |\n\n## Timings\n"
