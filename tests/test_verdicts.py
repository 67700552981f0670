"""The report's verdicts on synthetic ladders whose answers are known: a claim is "yes" only when its
95% interval excludes zero in the claimed direction; a gain straddling zero, a reversed one and a
claim with nothing to measure are not "yes"."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab.demo import alignment_claims
from gptlab.report import DPO, INSTRUCTION_TUNING, RLHF, Claim, Samples, ladder_claims
from helpers import write_jsonl

N_ITEMS = 60
ARITH = "arith_add_2"


def correct(*ranges: range) -> list[float]:
    """Per-item scores: 1 on the items in ``ranges``, 0 on the others."""
    return [float(any(i in r for r in ranges)) for i in range(N_ITEMS)]


def synthetic_ladder(root: Path, scores: dict[tuple[str, str], list[float]], alpha=(0.2, 0.1, 0.3)):
    """(ladder.json's dict, its Samples) for runs small and large whose arithmetic items scored ``scores``
    per (run, setting); the loss fit's exponent and interval are ``alpha`` (None: no interval)."""
    runs = []
    for name in ("small", "large"):
        records = [
            {"task": ARITH, "setting": setting, "doc_id": i, "correct": score}
            for (run, setting), values in scores.items()
            if run == name
            for i, score in enumerate(values)
        ]
        write_jsonl(root / "runs" / name / "samples.jsonl", records)
        runs.append({"name": name, "params": 1e5, "flops": 1e12, "metrics": {ARITH: {"standard": {}, "cot": {}}}})
    power_law = {"alpha": alpha[0]} if alpha[1] is None else {"alpha": alpha[0], "intervals": {"alpha": alpha[1:]}}
    ladder = {"runs": runs, "fit": {"power_law": power_law, "monotone": True}}
    return ladder, Samples(root, runs)


def claims_of(root: Path, scores: dict, **kwargs) -> dict[str, Claim]:
    ladder, samples = synthetic_ladder(root, scores, **kwargs)
    return {claim.claim: claim for claim in ladder_claims(ladder, samples, [])}


def verdict(claim: Claim) -> str:
    """The 'reproduced' column of the claim's row in the phenomena table."""
    return [cell.strip() for cell in claim.row().split("|")][4]


SCALE = "Arithmetic emerges with scale (exact match)"
COT = "Chain-of-thought prompting beats standard prompting"
COT_GROWTH = "The chain-of-thought gain grows with size"
LOSS = "Loss falls smoothly as a power law of compute (scaling laws)"


def test_a_clear_gain_is_reproduced(tmp_path):
    claims = claims_of(
        tmp_path,
        {
            ("small", "standard"): correct(range(12)),  # 20%
            ("large", "standard"): correct(range(48)),  # 80%
            ("small", "cot"): correct(range(12)),
            ("large", "cot"): correct(range(60)),  # CoT: +20 points for the large model, none for the small
        },
    )
    scale = claims[SCALE]
    assert scale.effect == pytest.approx(0.6) and 0 < scale.lo < 0.6 < scale.hi
    assert verdict(scale) == "yes" and scale.note == ""
    assert "+60.0 [" in scale.row()
    assert verdict(claims[COT]) == "yes" and claims[COT].effect == pytest.approx(0.2)
    assert verdict(claims[COT_GROWTH]) == "yes" and claims[COT_GROWTH].effect == pytest.approx(0.2)
    assert verdict(claims[LOSS]) == "yes"


def test_a_gain_straddling_zero_is_not_reproduced(tmp_path):
    claims = claims_of(
        tmp_path,
        {
            ("small", "standard"): correct(range(30)),  # both 50%, on different items
            ("large", "standard"): correct(range(15, 45)),
            ("small", "cot"): correct(range(30)),
            ("large", "cot"): correct(range(14, 45)),  # one item more
        },
        alpha=(0.05, -0.1, 0.2),
    )
    scale, cot = claims[SCALE], claims[COT]
    assert scale.effect == 0 and scale.lo < 0 < scale.hi
    assert verdict(scale) == "no" and scale.note.startswith("if no:")
    assert cot.effect > 0 and cot.lo <= 0  # a positive effect is not enough
    assert verdict(cot) == "no"
    assert verdict(claims[LOSS]) == "no"


def test_a_reversed_effect_is_not_reproduced(tmp_path):
    """An interval that excludes zero on the wrong side: the large model does worse."""
    claims = claims_of(
        tmp_path,
        {
            ("small", "standard"): correct(range(48)),
            ("large", "standard"): correct(range(12)),
            ("small", "cot"): correct(range(48)),
            ("large", "cot"): correct(range(0)),  # CoT hurts the large model
        },
        alpha=(-0.2, -0.3, -0.1),
    )
    for name in (SCALE, COT, LOSS):
        claim = claims[name]
        assert claim.effect < 0 and claim.hi < 0, name
        assert verdict(claim) == "no", name


def test_no_difference_at_all_is_not_reproduced(tmp_path):
    """A zero-width interval at zero does not exclude zero."""
    same = correct(range(30))
    claims = claims_of(
        tmp_path, {(run, setting): same for run in ("small", "large") for setting in ("standard", "cot")}
    )
    assert (claims[SCALE].effect, claims[SCALE].lo, claims[SCALE].hi) == (0, 0, 0)
    assert verdict(claims[SCALE]) == "no"


def test_a_claim_without_items_is_neither_yes_nor_no(tmp_path):
    claims = claims_of(tmp_path, {}, alpha=(0.2, None, None))  # the runs answered nothing; a 3-point fit
    for name in (SCALE, COT, COT_GROWTH, LOSS):
        claim = claims[name]
        assert claim.effect is None and claim.reproduced is None, name
        assert verdict(claim) == "—" and "not measured yet" in claim.row(), name
    assert claims[SCALE].note == "no items to compare"
    assert "exact fit" in claims[LOSS].note


def test_items_only_one_run_answered_are_not_compared(tmp_path):
    claims = claims_of(tmp_path, {("small", "standard"): correct(range(12)), ("large", "cot"): correct(range(60))})
    assert claims[SCALE].effect is None and verdict(claims[SCALE]) == "—"


DPO_CLAIM, PPO_CLAIM = DPO, RLHF
ARENA_RESULT = {"agreement": {"tau": 0.6, "ci": (0.2, 0.9)}}  # what ``arena_results`` gives the arena's claim


def comparison(win_rate: tuple[float, float, float], both_wrong: int) -> dict:
    """What ``against_sft`` gives the claims: a win rate and how many of 330 prompts both models answer wrong."""
    return {"win_rate": win_rate, "verdicts": {"tie (bothbad)": both_wrong}, "prompts": 330}


@pytest.mark.parametrize(("model", "claim"), [("dpo", DPO_CLAIM), ("ppo", PPO_CLAIM)])
@pytest.mark.parametrize(
    ("win_rate", "expected"),
    [((0.7, 0.6, 0.8), "yes"), ((0.55, 0.45, 0.65), "no"), ((0.3, 0.2, 0.4), "no"), ((0.6, 0.5, 0.7), "no")],
)
def test_dpo_and_ppo_are_reproduced_only_when_their_win_rate_interval_is_above_one_half(
    model, claim, win_rate, expected
):
    instruct = {"groups": {"held-out families": {"effect": (0.1, -0.05, 0.25)}}}
    other = "ppo" if model == "dpo" else "dpo"
    preferences = {
        model: comparison(win_rate, both_wrong=270),
        other: comparison((0.75, 0.7, 0.8), both_wrong=264),
        "reward_accuracy": {"wrong": (0.569, 0.448, 0.69), "all": (0.782, 0.741, 0.826)},
    }
    claims = alignment_claims(instruct, preferences, ARENA_RESULT)
    assert [c.claim for c in claims][:3] == [INSTRUCTION_TUNING, PPO_CLAIM, DPO_CLAIM]  # the lecture's order
    by_name = {c.claim: c for c in claims}
    measured = by_name[claim]
    assert measured.effect == pytest.approx(win_rate[0] - 0.5)
    assert verdict(measured) == expected
    assert (measured.note == "") == (expected == "yes")
    if expected == "no":
        assert f"both replies are wrong on 82% of prompts, and {model.upper()} wins only" in measured.note
    if expected == "no" and model == "ppo":
        assert "ranks a right answer above a wrong one in only 57% of held-out pairs" in measured.note
    assert verdict(by_name[PPO_CLAIM if model == "dpo" else DPO_CLAIM]) == "yes"
    assert verdict(by_name[INSTRUCTION_TUNING]) == "no"


MMLU_RISES = "MMLU-format accuracy rises with size"
MMLU_FEW_SHOT = "Few-shot prompting beats zero-shot on MMLU format"
MMLU_GROWTH = "The MMLU few-shot gain grows with size"


def mmlu_claims(root: Path, scores: dict[tuple[str, str], list[float]], cut: int = 0) -> dict[str, Claim]:
    """The claims of a ladder whose world_mmlu items scored ``scores`` per (run, setting); ``cut``: the
    2-shot requests each run had cut from the left to fit its window."""
    runs = []
    for name in ("small", "large"):
        records = [
            {"task": "world_mmlu", "subject": "birth years", "setting": setting, "doc_id": i, "correct": score}
            for (run, setting), values in scores.items()
            if run == name
            for i, score in enumerate(values)
        ]
        write_jsonl(root / "runs" / name / "samples.jsonl", records)
        settings = {"0-shot": {"truncated": 0}, "2-shot": {"truncated": cut}}
        runs.append({"name": name, "params": 1e5, "flops": 1e12, "metrics": {"world_mmlu": settings}})
    ladder = {"runs": runs, "fit": {"power_law": {"alpha": 0.2}, "monotone": True}}
    return {claim.claim: claim for claim in ladder_claims(ladder, Samples(root, runs), [])}


MMLU_SCORES = {
    ("small", "0-shot"): correct(range(15)),  # 25%: chance
    ("small", "2-shot"): correct(range(15)),
    ("large", "0-shot"): correct(range(30)),  # 50%
    ("large", "2-shot"): correct(range(45)),  # 75%: the examples help the large model only
}


def test_mmlu_accuracy_and_its_few_shot_gain_grow_with_size(tmp_path):
    claims = mmlu_claims(tmp_path, MMLU_SCORES)
    assert claims[MMLU_RISES].effect == pytest.approx(0.5) and verdict(claims[MMLU_RISES]) == "yes"
    assert "world_mmlu 2-shot accuracy, large (0.10M params, 1.0e+12 FLOPs) minus small" in claims[MMLU_RISES].measure
    assert claims[MMLU_FEW_SHOT].effect == pytest.approx(0.25) and verdict(claims[MMLU_FEW_SHOT]) == "yes"
    assert claims[MMLU_GROWTH].effect == pytest.approx(0.25) and verdict(claims[MMLU_GROWTH]) == "yes"


def test_mmlu_claims_on_prompts_cut_to_fit_the_window_are_not_measured(tmp_path):
    claims = mmlu_claims(tmp_path, MMLU_SCORES, cut=40)
    for name in (MMLU_RISES, MMLU_FEW_SHOT, MMLU_GROWTH):
        claim = claims[name]
        assert claim.effect is None and verdict(claim) == "—", name
        assert claim.note.startswith("prompts cut: 80 of its scoring requests (small and large"), claim.note


def test_pretraining_loss_claim_holds_only_when_the_loss_falls_on_the_same_windows(tmp_path):
    ladder, samples = synthetic_ladder(tmp_path, {})
    before = [5.6, 5.5, 5.7, 5.6]
    ladder["runs"][-1]["next_token"] = {"positions": 2048, "with_loss": 2048, "untrained": before, "trained": before}
    flat = ladder_claims(ladder, samples, [])[0]
    assert flat.claim.startswith("Pretraining is next-token prediction") and verdict(flat) == "no"
    ladder["runs"][-1]["next_token"]["trained"] = [2.1, 2.0, 2.3, 2.2]
    falls = ladder_claims(ladder, samples, [])[0]
    assert verdict(falls) == "yes" and falls.effect == pytest.approx(3.45)
    assert falls.note == "a loss on 100.0% of the 2,048 positions of 4 val windows; 5.60 → 2.15"
