"""A two-size ladder end to end on tiny settings: training, evaluation, ladder.json, report and plots;
and the world_mmlu requests of the presets, which must fit the window they are evaluated in."""

import json
from pathlib import Path

import pytest

from gptlab.cli import main as gptlab
from gptlab.ladder import load_config, mmlu_request_lengths, run_folder
from gptlab.report import ladder_section
from gptlab.runs import RunFolder
from gptlab.tokenizer import Tokenizer
from gptlab.world import write_world

pytestmark = pytest.mark.usefixtures("on_one_thread")  # conftest: tiny models run fastest on one thread

TINY = [
    "sizes.depths=[1, 2]",
    "sizes.aspect=16",
    "sizes.head_dim=16",
    "sizes.block_size=384",  # the longest 1-shot world_mmlu request is 280 tokens
    "sizes.tokens_per_param=0.5",
    "sizes.min_steps=15",
    "data.vocab_size=300",
    "train.batch_size=4",
    "train.seq_len=64",
    "train.save_every=0",
    "train.eval_batches=2",
    "eval.limit=4",
    "eval.batch_size=8",
    "eval.mmlu_shots=[0, 1]",
    "eval.word_tasks=['reverse', 'double_first']",
    "eval.word_shots=[0, 2]",
    "eval.arith_tasks=['add_2']",
]


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ladder") / "ladder"
    assert gptlab(["ladder", "--preset", "quick", "--out", str(out), *sum((["--set", s] for s in TINY), [])]) == 0
    return out


def test_two_size_ladder_writes_runs_fits_report_and_plots(ladder_dir):
    ladder = json.loads((ladder_dir / "ladder.json").read_text())
    runs = ladder["runs"]
    assert [r["name"] for r in runs] == ["d1", "d2"]
    assert runs[0]["params"] < runs[1]["params"] and runs[0]["flops"] < runs[1]["flops"]
    for run in runs:
        assert {"name", "params", "flops", "tokens", "val_loss", "metrics"} <= set(run)
        assert set(run["metrics"]) == {"world_mmlu", "words_reverse", "words_double_first", "arith_add_2"}
        assert set(run["metrics"]["arith_add_2"]) == {"standard", "cot"}
        assert set(run["metrics"]["words_reverse"]) == {"0-shot", "2-shot"}
    # Two sizes cannot support a three-parameter law: the fit says why instead of inventing one.
    assert "unsupported" in ladder["fit"]["power_law"]
    report = (ladder_dir / "report.md").read_text()
    assert "| claim | measure |" in report and "not measured yet" in report
    assert "cut from the left to fit the window, all runs: 0-shot 0, 1-shot 0." in report
    assert ladder["mmlu_requests"]["window"] == 384 and ladder["mmlu_requests"]["longest"]["1-shot"] <= 384
    for plot in ("loss_vs_compute.png", "emergence.png", "cot.png", "fewshot.png"):
        assert (ladder_dir / plot).stat().st_size > 1000, plot
        assert f"({plot})" in report


def test_a_finished_ladder_resumes_without_retraining(ladder_dir, capsys):
    before = (ladder_dir / "ladder.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (ladder_dir / "runs").glob("*/result.json")}
    assert (
        gptlab(["ladder", "--preset", "quick", "--out", str(ladder_dir), *sum((["--set", s] for s in TINY), [])]) == 0
    )
    assert "done before; kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (ladder_dir / "ladder.json").read_text() == before


def test_pretraining_is_measured_as_a_loss_on_every_position_that_falls(ladder_dir):
    """Each run records its val windows' losses before and after training; the report's first claim
    pairs them for the largest run."""
    for run in json.loads((ladder_dir / "ladder.json").read_text())["runs"]:
        measured = run["next_token"]
        assert measured["with_loss"] == measured["positions"] == 64 * len(measured["trained"])  # 64 = train.seq_len
        assert sum(measured["untrained"]) > sum(measured["trained"])
    row = next(line for line in (ladder_dir / "report.md").read_text().splitlines() if "next-token prediction" in line)
    assert "| d2: val loss per window before minus after pretraining" in row and "| yes |" in row
    assert "a loss on 100.0% of the" in row


def test_the_presets_world_mmlu_requests_fit_the_window_and_the_trained_windows(tmp_path, quick_world):
    """Every request of every shot count the CPU presets evaluate, on their worlds and their tokenizer
    (263 tokens: the bytes and the special tokens, so no merges and any training text gives the same one),
    fits the models' window and the windows they train on: none is cut, none reaches untrained positions."""
    write_world(tmp_path / "world", seed=0, preset="default")
    tokenizer = Tokenizer.train(["world_mmlu"], vocab_size=263)
    for preset, world in (("default", tmp_path / "world"), ("quick", quick_world)):
        cfg = load_config(preset, None, [])
        assert cfg.data.vocab_size == 263 and cfg.data.world_preset == preset
        longest = mmlu_request_lengths(cfg.eval, world, tokenizer)
        assert sorted(longest) == sorted(cfg.eval.mmlu_shots) and max(cfg.eval.mmlu_shots) > 0
        assert max(longest.values()) <= min(cfg.sizes.block_size, cfg.train.seq_len), (preset, longest)
        assert longest[max(longest)] > 400  # a few-shot prompt, not a bare question


def test_a_shot_count_whose_requests_would_be_cut_is_refused_before_training(ladder_dir, tmp_path, capsys):
    reuse = [f"data.world={ladder_dir / 'world'}", f"data.shards={ladder_dir / 'shards'}"]
    settings = [s for s in TINY if not s.startswith("sizes.block_size")] + ["sizes.block_size=256", *reuse]
    out = tmp_path / "cut"
    assert gptlab(["ladder", "--preset", "quick", "--out", str(out), *sum((["--set", s] for s in settings), [])]) == 2
    err = capsys.readouterr().err
    assert "world_mmlu's 1-shot requests reach 280 tokens, longer than the models' 256-token window" in err
    assert "ask eval.mmlu_shots of at most 0" in err and len(err.strip().splitlines()) == 1
    assert not (out / "runs").exists()  # refused before any model trained


def test_unknown_ladder_preset_is_a_user_error(tmp_path, capsys):
    assert gptlab(["ladder", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown ladder preset 'huge'" in capsys.readouterr().err


def test_report_renders_a_ladder_folder_again_without_training(ladder_dir, tmp_path, capsys):
    before = (ladder_dir / "report.md").read_text()
    (ladder_dir / "report.md").unlink()
    (ladder_dir / "fewshot.png").unlink()
    assert gptlab(["report", str(ladder_dir)]) == 0
    assert (ladder_dir / "report.md").read_text() == before
    assert (ladder_dir / "fewshot.png").stat().st_size > 1000
    assert gptlab(["report", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_a_ladder_with_other_settings_refuses_the_kept_runs(ladder_dir, capsys):
    run_json = (ladder_dir / "run.json").read_text()
    changed = [s for s in TINY if not s.startswith("eval.limit")] + ["eval.limit=3"]
    assert (
        gptlab(["ladder", "--preset", "quick", "--out", str(ladder_dir), *sum((["--set", s] for s in changed), [])])
        == 2
    )
    assert "other settings" in capsys.readouterr().err
    assert (ladder_dir / "run.json").read_text() == run_json  # nothing written is lost


def test_the_ladder_records_its_kind_and_its_runs_folders(ladder_dir):
    assert RunFolder(ladder_dir).kind() == "ladder"
    for name in ("d1", "d2"):
        run = run_folder(ladder_dir, name)
        assert run.kind() == "pretrain" and (run.model_dir / "config.json").is_file()


def test_the_ladder_section_links_the_plots_it_wrote(ladder_dir):
    for plot in ladder_dir.glob("*.png"):
        plot.unlink()
    section = ladder_section(ladder_dir, heading="##", link_prefix="ladder/")
    assert [p.name for p in section.plots] == ["loss_vs_compute.png", "emergence.png", "cot.png", "fewshot.png"]
    for plot in section.plots:
        assert plot.parent == ladder_dir and plot.stat().st_size > 1000
        assert f"(ladder/{plot.name})" in section.markdown
    assert section.markdown.startswith("## Scaling ladder")
