"""Claims across seeds (`gptlab demo --seeds N`): the fixed-effect pooling of the seeds' estimates
(gptlab.stats), the verdict (pooled interval above zero and reproduced on 2 of 3 seeds), claims.json,
and the runner that keeps the seeds it finished and writes the table across them (gptlab.demo)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from gptlab import demo, stats
from gptlab.errors import UserError
from gptlab.report import (
    CLAIMS_FILE,
    Claim,
    ClaimAcrossSeeds,
    claims_across_seeds,
    read_claims,
    robustness_section,
    seeds_needed,
    write_claims,
)
from gptlab.runs import RunFolder
from helpers import assert_one_line, assert_user_error, gptlab_in_process, write_jsonl

Z = 1.96
COT = "Chain-of-thought prompting beats standard prompting"
LOSS = "Loss falls smoothly as a power law of compute (scaling laws)"


def estimate(effect: float, se: float) -> tuple[float, float, float]:
    return effect, effect - Z * se, effect + Z * se


def test_two_equal_estimates_pool_to_the_same_effect_with_an_interval_sqrt2_narrower():
    effect, lo, hi = stats.pooled_interval([estimate(0.3, 0.1), estimate(0.3, 0.1)])
    assert effect == pytest.approx(0.3)
    assert (hi - lo) == pytest.approx(2 * Z * 0.1 / math.sqrt(2))
    assert hi - effect == pytest.approx(effect - lo)


def test_the_pooled_effect_weighs_each_estimate_by_its_inverse_variance():
    # weights 1 / 1² and 1 / 2²: (1 * 0 + 0.25 * 3) / 1.25 = 0.6, standard error 1 / sqrt(1.25)
    effect, lo, hi = stats.pooled_interval([estimate(0.0, 1.0), estimate(3.0, 2.0)])
    assert effect == pytest.approx(0.6)
    assert (lo, hi) == pytest.approx((0.6 - Z / math.sqrt(1.25), 0.6 + Z / math.sqrt(1.25)))
    assert stats.pooled_interval([(0.2, 0.1, 0.5)]) == pytest.approx((0.2, 0.0, 0.4))  # one estimate: its width


def test_a_zero_width_interval_weighs_as_much_as_the_surest_other_estimate_not_infinitely():
    effect, lo, hi = stats.pooled_interval([(0.0, 0.0, 0.0), estimate(0.06, 0.02), estimate(0.06, 0.02)])
    assert effect == pytest.approx(0.04)  # three equal weights
    assert hi - lo == pytest.approx(2 * Z * 0.02 / math.sqrt(3))
    assert stats.pooled_interval([(1.0, 1.0, 1.0), (0.5, 0.5, 0.5)]) == (0.75, 0.75, 0.75)


@pytest.mark.parametrize("estimates", [[], [(0.1, 0.2)], [(0.1, 0.3, 0.2)], [(float("nan"), 0.0, 1.0)]])
def test_pooling_refuses_what_is_not_a_list_of_intervals(estimates):
    with pytest.raises(ValueError):
        stats.pooled_interval(estimates)


def points(effect: float, lo: float, hi: float, claim: str = COT) -> Claim:
    """A claim measured in points, given in points."""
    return Claim(claim, "CoT minus standard", effect / 100, lo / 100, hi / 100)


def test_a_claim_reproduced_on_one_seed_of_three_is_not_reproduced_even_when_the_pooled_interval_is():
    across = ClaimAcrossSeeds(COT, [0, 1, 2], {0: points(5, 1, 9), 1: points(3, -1, 7), 2: points(3, -1, 7)})
    assert across.pooled[1] > 0 and across.reproduced_on == 1
    assert across.reproduced is False
    assert across.row().endswith("| 1 of 3 | +3.7 [+1.4, +6.0] | no |")


def test_a_claim_reproduced_on_two_seeds_of_three_with_the_pooled_interval_above_zero_is_reproduced():
    across = ClaimAcrossSeeds(COT, [0, 1, 2], {0: points(5, 1, 9), 1: points(5, 1, 9), 2: points(-1, -5, 3)})
    assert across.reproduced_on == 2 and across.reproduced is True
    row = across.row()
    assert "seed 0: +5.0 [+1.0, +9.0]<br>seed 1: +5.0 [+1.0, +9.0]<br>seed 2: -1.0 [-5.0, +3.0]" in row
    assert row.endswith("| 2 of 3 | +3.0 [+0.7, +5.3] | yes |")


def test_two_reproducing_seeds_whose_pooled_interval_reaches_zero_are_not_enough():
    # reproduced on 2 of 3, but the third seed's confident reversal pulls the pooled interval below zero
    across = ClaimAcrossSeeds(COT, [0, 1, 2], {0: points(5, 1, 9), 1: points(5, 1, 9), 2: points(-10, -11, -9)})
    assert across.reproduced_on == 2 and across.pooled[1] < 0 and across.reproduced is False


def test_the_seeds_needed_are_two_thirds_rounded_up():
    assert [seeds_needed(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 2, 3, 4, 4]


def test_a_claim_some_seed_did_not_measure_is_pooled_over_the_others_and_says_so():
    unmeasured = Claim(LOSS, "exponent", unit="exponent", note="a fit with an interval needs at least 4 sizes")
    across = claims_across_seeds(
        {
            0: [Claim(LOSS, "exponent", 0.2, 0.1, 0.3, unit="exponent")],
            1: [unmeasured],
            2: [Claim(LOSS, "exponent", 0.2, 0.1, 0.3, unit="exponent")],
        }
    )
    (row,) = across
    assert row.seeds == [0, 1, 2] and set(row.measured) == {0, 2}
    text = row.row()
    assert "seed 1: not measured" in text and "(over seeds 0, 2; not measured on 1)" in text
    assert "| 2 of 3 | 0.200 [0.129, 0.271]" in text and text.endswith("| yes |")
    undefined = Claim(LOSS, "exponent", float("nan"), float("nan"), float("nan"), unit="exponent")
    nowhere = ClaimAcrossSeeds(LOSS, [0, 1], {0: unmeasured, 1: undefined})
    assert nowhere.reproduced is None and nowhere.row().endswith("| 0 of 2 | not measured | — |")


def test_claims_json_round_trips_every_field(tmp_path):
    claims = [
        points(5, 1, 9),
        Claim(LOSS, "exponent", unit="exponent", note="needs 4 sizes"),
        Claim("x", "y", -0.1, -0.3, 0.1, note="if no: more"),
    ]
    write_claims(tmp_path / CLAIMS_FILE, claims)
    assert read_claims(tmp_path / CLAIMS_FILE) == claims
    assert [c.row() for c in read_claims(tmp_path / CLAIMS_FILE)] == [c.row() for c in claims]


@pytest.mark.parametrize("text", ["{not json", '{"claim": "x"}', '[{"claim": "x", "colour": "red"}]', "[3]"])
def test_a_damaged_claims_json_is_one_error_line(tmp_path, text):
    (tmp_path / CLAIMS_FILE).write_text(text)
    with pytest.raises(UserError) as error:
        read_claims(tmp_path / CLAIMS_FILE)
    assert_one_line(error, str(tmp_path / CLAIMS_FILE), "delete it")


def test_demo_with_fewer_than_one_seed_is_refused_in_one_line(tmp_path, capfd):
    result = gptlab_in_process(capfd, "demo", "--seeds", "0", "--out", tmp_path / "demo")
    assert_user_error(result, "--seeds must be at least 1 (got 0)")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("preset", list(demo.PRESETS))
def test_the_seed_feeds_the_world_and_every_stage_that_draws_at_random(tmp_path, preset):
    """World, initialization and data order: the world's --seed, every training stage's train.seed (the
    last one set wins: no preset sets it after the seed), and the arena's --seed (pairs, sides, prompts)."""
    calls = []

    def command(args: list[str]) -> int:
        calls.append(args)
        if args[0] == "ladder":
            ladder = Path(args[args.index("--out") + 1])
            ladder.mkdir(parents=True)
            (ladder / "ladder.json").write_text(json.dumps({"runs": [{"name": "d1"}]}))
        return 0

    spec, timings = demo.PRESETS[preset], {}
    base, tuned = demo.run_stages(command, tmp_path, spec, 7, timings)
    demo.preference_stages(command, tmp_path, spec, tuned, 7, timings)
    demo.rl_stages(command, tmp_path, spec, tuned, RunFolder(tmp_path / "reward"), 7, timings)
    write_jsonl(tmp_path / "world" / "prefs" / "test.jsonl", [{"family": "f", "prompt": "q"}])
    demo.arena_stage(command, tmp_path, spec, {"d1": base, "sft": tuned}, 7, timings)
    by_stage = {args[0]: args for args in calls}
    assert list(by_stage) == ["world", "tokenizer", "prepare", "ladder", "sft", "reward", "dpo", "ppo", "grpo", "arena"]
    for name in ("world", "arena"):
        assert by_stage[name][by_stage[name].index("--seed") + 1] == "7"
    for name in ("ladder", "sft", "reward", "dpo", "ppo", "grpo"):
        assert [a for a in by_stage[name] if a.startswith("train.seed=")][-1] == "train.seed=7", name
    # tokenizer and prepare draw nothing at random: the same corpus gives the same tokenizer and shards


# ---------------------------------------------------------------------------------------------
# The runner, with each seed's demo replaced by one that writes a finished demo folder at once


FAKE_CLAIMS = {  # seed -> (CoT in points, the loss exponent's interval or None)
    3: (points(5, 1, 9), (0.2, 0.1, 0.3)),
    4: (points(5, 1, 9), None),
    5: (points(-1, -5, 3), (0.25, 0.15, 0.35)),
}


class FakeDemo:
    """``run_demo`` as far as the runner sees it: run.json, claims.json and report.md in ``out``."""

    def __init__(self):
        self.ran: list[int] = []

    def __call__(self, out: Path, gptlab, preset: str = "quick", seed: int = 0) -> Path:
        self.ran.append(seed)
        cot, alpha = FAKE_CLAIMS[seed]
        loss = Claim(LOSS, "exponent", *(alpha or ()), unit="exponent")
        RunFolder(out).write_record("demo", {"preset": preset, **asdict(demo.PRESETS[preset])}, seed=seed)
        write_claims(out / CLAIMS_FILE, [loss, cot])
        (out / "report.md").write_text(f"seed {seed}\n")
        return out / "report.md"


@pytest.fixture
def fake_demo(monkeypatch) -> FakeDemo:
    fake = FakeDemo()
    monkeypatch.setattr(demo, "run_demo", fake)
    return fake


def test_three_seeds_run_into_their_folders_and_the_report_holds_each_claim_across_them(tmp_path, fake_demo):
    report = demo.run_demo_seeds(tmp_path / "out", print, seed=3, seeds=3)
    assert fake_demo.ran == [3, 4, 5]
    assert report == tmp_path / "out" / "report.md"
    assert [(tmp_path / "out" / f"seed-{s}" / "report.md").read_text() for s in (3, 4, 5)] == [
        "seed 3\n",
        "seed 4\n",
        "seed 5\n",
    ]
    text = report.read_text()
    assert text.startswith("# gptlab demo report: 3 seeds\n\nPreset `quick`, seeds [3](seed-3/report.md), ")
    assert "| claim | per seed: effect [95% CI] | seeds reproduced | pooled effect [95% CI] | reproduced |" in text
    lines = text.splitlines()
    loss = next(line for line in lines if line.startswith(f"| {LOSS} |"))
    assert "seed 4: not measured" in loss and "(over seeds 3, 5; not measured on 4)" in loss
    assert loss.endswith("| 2 of 3 | 0.225 [0.154, 0.296] (over seeds 3, 5; not measured on 4) | yes |")
    cot = next(line for line in lines if line.startswith(f"| {COT} |"))
    assert cot.endswith("| 2 of 3 | +3.0 [+0.7, +5.3] | yes |")
    assert lines.index(loss) < lines.index(cot)  # in the order the seeds' tables list them
    assert "at least 2 of the 3 seeds" in text and "Reproduced across seeds: **2 of 2** claims." in text


def test_finished_seeds_are_kept_and_an_unfinished_one_runs_again(tmp_path, fake_demo):
    out = tmp_path / "out"
    demo.run_demo_seeds(out, print, seed=3, seeds=3)
    first = (out / "report.md").read_text()
    (out / "seed-4" / CLAIMS_FILE).unlink()  # seed 4 stopped before it finished
    fake_demo.ran.clear()
    demo.run_demo_seeds(out, print, seed=3, seeds=3)
    assert fake_demo.ran == [4]
    assert (out / "report.md").read_text() == first  # rebuilt from the folders: the same table
    fake_demo.ran.clear()
    demo.run_demo_seeds(out, print, seed=3, seeds=3)
    assert fake_demo.ran == []


def test_a_finished_seed_of_other_settings_is_refused_before_any_seed_runs(tmp_path, fake_demo):
    out = tmp_path / "out"
    demo.run_demo_seeds(out, print, seed=3, seeds=2)
    record = RunFolder(out / "seed-4").read_record()
    record["config"]["instruct_limit"] += 1  # a preset changed since that seed ran
    (out / "seed-4" / "run.json").write_text(json.dumps(record))
    (out / "seed-3" / CLAIMS_FILE).unlink()
    fake_demo.ran.clear()
    with pytest.raises(UserError) as error:
        demo.run_demo_seeds(out, print, seed=3, seeds=2)
    assert_one_line(error, str(out / "seed-4"), "other settings", "delete")
    assert fake_demo.ran == []


def test_one_seed_is_the_demo_itself_in_out(tmp_path, fake_demo):
    assert demo.run_demo_seeds(tmp_path / "out", print, seed=4, seeds=1) == tmp_path / "out" / "report.md"
    assert fake_demo.ran == [4] and not list((tmp_path / "out").glob("seed-*"))


def test_seeds_are_not_run_into_a_folder_that_holds_another_run(tmp_path, fake_demo):
    demo.run_demo_seeds(tmp_path / "out", print, seed=3, seeds=1)
    with pytest.raises(UserError) as error:
        demo.run_demo_seeds(tmp_path / "out", print, seed=3, seeds=2)
    assert_one_line(error, "holds a gptlab run", "new --out")
    assert fake_demo.ran == [3]


def test_robustness_section_counts_the_claims_reproduced_across_seeds():
    unmeasured = Claim(LOSS, "exponent", unit="exponent")
    section = robustness_section({0: [points(5, 1, 9), unmeasured], 1: [points(-1, -5, 3), unmeasured]})
    assert "at least 2 of the 2 seeds" in section.markdown
    assert "Reproduced across seeds: **0 of 2** claims (1 measured on no seed)." in section.markdown
    assert section.markdown.startswith("## Claims across seeds")
