"""The demo's RL measurements and report section (gptlab.demo): a tuned model against the SFT model
judged by the oracle (ties half), held-out arithmetic before and after GRPO scored by the arith
reward, and the section's rows, curves and [rl]'s targets, met or not, read from run folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab import demo
from gptlab.align.grpo import GrpoConfig
from gptlab.align.ppo import PpoConfig
from gptlab.config import to_dict
from gptlab.runs import RunFolder
from helpers import write_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


class ReplyOracle:
    """Prefers the reply that says "good" (the first argument on a tie of both), calls two replies
    without "good" both wrong, and scores a reply 1 if it says "good", else 0."""

    def judge(self, prompt, reply_a: str, reply_b: str) -> str:
        a, b = "good" in reply_a, "good" in reply_b
        if not (a or b):
            return "tie (bothbad)"
        return "tie" if a == b else ("model_a" if a else "model_b")

    def score(self, prompt, reply: str) -> float:
        return float("good" in reply)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_model_against_sft_wins_where_the_oracle_prefers_its_reply_and_ties_count_half():
    prompts = [user(f"question {i}") for i in range(4)]
    sft = ["bad", "good", "good", "bad"]
    model = ["good", "bad", "good too", "bad"]
    result = demo.against_sft(ReplyOracle(), prompts, sft, model)
    assert result["verdicts"] == {"model_a": 1, "model_b": 1, "tie": 1, "tie (bothbad)": 1}
    assert result["win_rate"][0] == pytest.approx(0.5)  # (1 + 0 + 0.5 + 0.5) / 4
    assert result["prompts"] == 4
    assert result["models"]["model"] == {"score": 0.5, "words": 1.25}
    assert result["models"]["sft"] == {"score": 0.5, "words": 1.0}
    assert result["example"] == (prompts[0], "bad", "good")
    winning = demo.against_sft(ReplyOracle(), prompts, ["bad"] * 4, ["good"] * 4)
    assert winning["win_rate"] == (1.0, 1.0, 1.0) and winning["example"] == (prompts[0], "bad", "good")


def test_held_out_arithmetic_is_exact_match_of_the_stated_number_before_and_after_grpo(tmp_path, monkeypatch):
    questions = [("What is 12+35?", 47), ("Subtract 5 from 9.", 4), ("Multiply 6 by 7.", 42), ("Add 2 and 2.", 4)]
    families = ["add", "subtract", "multiply", "add"]
    records = [
        {"messages": [*user(q), {"role": "assistant", "content": f"The answer is {a}."}], "family": f}
        for (q, a), f in zip(questions, families)
    ]
    records.append(
        {
            "messages": [*user("Reverse the letters of plomet."), {"role": "assistant", "content": "temolp"}],
            "family": "reverse",
        }
    )
    write_jsonl(tmp_path / "sft" / "test.jsonl", records)
    answers = dict(questions)
    learned = {"What is 12+35?", "Multiply 6 by 7."}  # what GRPO got right: half of the four

    def scripted(engine, prompts, max_new_tokens):  # here an "engine" is a function of the question
        return [engine(prompt[-1]["content"]) for prompt in prompts]

    def sft(question: str) -> str:
        return "The answer is 1110."

    def grpo(question: str) -> str:
        return f"The answer is {answers[question]}." if question in learned else "9"

    monkeypatch.setattr(demo, "chat_replies", scripted)
    result = demo.arithmetic_results(tmp_path, sft, grpo)
    assert result["problems"] == 4 and result["families"] == ["add", "multiply", "subtract"]
    assert result["exact_match"]["sft"] == (0.0, 0.0, 0.0)
    assert result["exact_match"]["grpo"][0] == pytest.approx(0.5)
    effect, lo, hi = result["effect"]
    assert effect == pytest.approx(0.5) and lo < effect < hi  # four items: an interval that reaches zero
    assert result["example"] == (user("What is 12+35?"), 47, "The answer is 1110.", "The answer is 47.")


def rl_runs(root: Path, ppo_kl: list[float], frac_zero_std: list[float]) -> tuple[RunFolder, RunFolder]:
    """A PPO and a GRPO run folder as the stages write them: run.json with the full config, and a
    metrics record per rollout (PPO: every 4 steps) or per 2 steps (GRPO)."""
    ppo, grpo = RunFolder(root / "ppo"), RunFolder(root / "grpo")
    ppo_config, grpo_config = to_dict(PpoConfig()), to_dict(GrpoConfig())
    ppo_config["train"].update(max_steps=4 * len(ppo_kl), batch_size=16)
    grpo_config["train"].update(max_steps=2 * len(frac_zero_std), batch_size=64)
    ppo.write_record("ppo", ppo_config)
    grpo.write_record("grpo", grpo_config)
    for i, kl in enumerate(ppo_kl):
        ppo.append_metrics({"step": 4 * (i + 1), "objective/scores": -1.0 + i, "objective/kl": kl, "loss": 0.1})
    for i, frac in enumerate(frac_zero_std):
        grpo.append_metrics({"step": 2 * (i + 1), "reward": 0.01 * i, "frac_reward_zero_std": frac, "loss": 0.0})
    return ppo, grpo


def rl_markdown(tmp_path: Path, win_rate, ppo_kl, effect) -> str:
    ppo, grpo = rl_runs(tmp_path, ppo_kl, frac_zero_std=[1.0, 0.5])
    comparison = demo.against_sft(ReplyOracle(), [user("q")], ["bad"], ["good"]) | {"win_rate": win_rate}
    arithmetic = {
        "problems": 150,
        "families": ["add", "multiply", "subtract"],
        "exact_match": {"sft": (0.0, 0.0, 0.0), "grpo": (effect[0], 0.0, 0.2)},
        "effect": effect,
        "example": (user("What is 12+35?"), 47, "The answer is 1110.", "The answer is 47."),
    }
    section = demo.rl_section(ppo, grpo, comparison, arithmetic, tmp_path / "ppo.png")
    assert section.plots == [tmp_path / "ppo.png"] and (tmp_path / "ppo.png").read_bytes()[:8] == PNG
    return section.markdown


def test_the_rl_section_shows_the_curves_the_rows_and_both_targets_met(tmp_path):
    text = rl_markdown(tmp_path, win_rate=(0.7, 0.62, 0.78), ppo_kl=[4.0, 6.0], effect=(0.1, 0.02, 0.18))
    assert "![PPO reward and KL](ppo.png)" in text
    assert "| objective/scores, first → last logged | -1.000 (step 4) → 0.000 (step 8) |" in text
    assert "| objective/kl, mean over the rollouts | 5.000 |" in text
    assert "8 steps of 16 answers, 4 passes over each rollout" in text
    assert "PPO wins **70.0%** [62.0, 78.0]" in text
    assert "4 steps of 8 questions x 8 answers" in text and "150 arithmetic questions" in text
    assert "| GRPO | 10.0 [0.0, 20.0] |" in text and "| GRPO - SFT (paired, points) | +10.0 [+2.0, +18.0] |" in text
    assert "mean over the run | 75.0% |" in text
    assert "| What is 12+35? | 47 | The answer is 1110. | The answer is 47. |" in text
    assert text.count("**met**") == 2 and "not met" not in text


@pytest.mark.parametrize(
    ("win_rate", "ppo_kl"),
    [((0.7, 0.62, 0.78), [9.0, 13.0]), ((0.65, 0.49, 0.8), [1.0, 1.0]), ((0.58, 0.52, 0.64), [1.0, 1.0])],
    ids=["kl-too-large", "interval-reaches-one-half", "below-60-percent"],
)
def test_the_ppo_target_is_not_met_with_too_much_kl_or_too_few_wins(tmp_path, win_rate, ppo_kl):
    text = rl_markdown(tmp_path, win_rate, ppo_kl, effect=(0.1, 0.02, 0.18))
    assert "mean KL below 10 nats: **not met**" in text and "zero: **met**" in text


def test_the_grpo_target_is_not_met_when_the_interval_reaches_zero(tmp_path):
    text = rl_markdown(tmp_path, win_rate=(0.7, 0.62, 0.78), ppo_kl=[4.0, 6.0], effect=(0.0, 0.0, 0.0))
    assert "zero: **not met**" in text and "10 nats: **met**" in text


def test_the_arena_asks_each_family_in_turn_and_no_prompt_twice():
    pairs = [{"family": f, "prompt": user(f"{f} {i}")} for f in ("facts", "words") for i in range(3)]
    pairs.append(dict(pairs[0]))  # the same prompt in a second pair
    assert demo.arena_prompts(pairs, 5) == [user(t) for t in ("facts 0", "words 0", "facts 1", "words 1", "facts 2")]
    assert len(demo.arena_prompts(pairs, 100)) == 6


def arena_result(winners: list[str], scores: list[tuple[float, float]]) -> dict:
    """``arena_results`` for battles of m0 against m1 (sides alternating) with these verdicts and scores."""
    from gptlab.arena.agreement import mean_scores, rank_agreement
    from gptlab.arena.battles import WINNERS, Battle
    from gptlab.arena.board import Board

    battles = [
        Battle(user("q"), *(("m0", "m1") if t % 2 else ("m1", "m0")), "x", "<b>y</b>", winner, "oracle", t)
        for t, winner in enumerate(winners)
    ]
    return {
        "board": Board(battles, rounds=20),
        "agreement": rank_agreement(battles, scores, rounds=20),
        "scores": mean_scores(battles, scores),
        "prompts": 1,
        "verdicts": {v: winners.count(v) for v in WINNERS},
    }


def test_the_arena_claim_holds_when_its_order_agrees_with_the_oracles_scores(tmp_path):
    # m1 wins every battle and scores higher: the two orders agree (tau = 1 on every resample)
    winners = ["model_a" if t % 2 == 0 else "model_b" for t in range(20)]
    scores = [(1.0, 0.0) if t % 2 == 0 else (0.0, 1.0) for t in range(20)]
    result = arena_result(winners, scores)
    claim = demo.arena_claim(result)
    assert (claim.effect, claim.lo, claim.hi, claim.reproduced, claim.note) == (1.0, 1.0, 1.0, True, "")
    section = demo.arena_section(result, tmp_path / "arena.png")
    assert (tmp_path / "arena.png").read_bytes().startswith(PNG)
    assert "| m1 | " in section.markdown and "**1.00** [1.00, 1.00]" in section.markdown
    assert "| 10 | 10 | 0 | 0 |" in section.markdown  # the verdict counts: A better, B better, tie, both wrong


def test_the_arena_claim_fails_when_the_arena_orders_the_models_against_their_scores():
    winners = ["model_a" if t % 2 == 0 else "model_b" for t in range(20)]  # m1 always wins...
    scores = [(0.0, 1.0) if t % 2 == 0 else (1.0, 0.0) for t in range(20)]  # ...but m0 scores higher
    claim = demo.arena_claim(arena_result(winners, scores))
    assert claim.effect == -1.0 and not claim.reproduced and "arena_rounds" in claim.note


def test_an_arena_of_ties_leaves_the_claim_unmeasured_and_says_why(tmp_path):
    result = arena_result(["tie (bothbad)"] * 6, [(0.2, 0.3)] * 6)
    claim = demo.arena_claim(result)
    assert claim.effect is None and "every battle a tie" in claim.note
    assert "undefined: every model is rated alike" in demo.arena_section(result, tmp_path / "arena.png").markdown
