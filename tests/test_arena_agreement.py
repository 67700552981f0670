"""Kendall's tau between the arena's order and a mean-score order, and its bootstrap interval."""

import random

import pytest

from gptlab.arena.agreement import mean_scores, rank_agreement
from gptlab.arena.battles import Battle

MODELS = ("m0", "m1", "m2", "m3", "m4")


def simulated(judge_by_score: bool, n: int = 400, seed: int = 0) -> tuple[list[Battle], list[tuple[float, float]]]:
    """Battles between models whose answers score their index / 5 plus noise; the verdict follows the
    scores when ``judge_by_score``, else a coin."""
    rng = random.Random(seed)
    battles, scores = [], []
    for t in range(n):
        a, b = rng.sample(range(len(MODELS)), 2)
        score_a, score_b = a / 5 + rng.gauss(0, 0.3), b / 5 + rng.gauss(0, 0.3)
        a_wins = score_a > score_b if judge_by_score else rng.random() < 0.5
        winner = "model_a" if a_wins else "model_b"
        battles.append(Battle([{"role": "user", "content": "q"}], MODELS[a], MODELS[b], "x", "y", winner, "t", t))
        scores.append((score_a, score_b))
    return battles, scores


def test_mean_scores_average_each_models_own_answers():
    prompt = [{"role": "user", "content": "q"}]
    battles = [Battle(prompt, "a", "b", "", "", "tie", "t", 0), Battle(prompt, "b", "c", "", "", "tie", "t", 1)]
    assert mean_scores(battles, [(1.0, 0.0), (0.5, 0.25)]) == {"a": 1.0, "b": 0.25, "c": 0.25}


def test_a_judge_that_follows_the_scores_orders_the_models_as_the_scores_do():
    result = rank_agreement(*simulated(judge_by_score=True), rounds=50)
    assert result["tau"] == pytest.approx(1.0)
    assert result["ci"][0] > 0.5 and result["ci"][0] <= result["tau"] <= result["ci"][1] + 1e-12
    assert result["rounds"] == 50


def test_a_coin_for_a_judge_gives_an_interval_around_zero():
    result = rank_agreement(*simulated(judge_by_score=False), rounds=50)
    assert result["ci"][0] < 0 < result["ci"][1]


def test_the_interval_is_seeded():
    battles, scores = simulated(judge_by_score=False, n=120)
    assert rank_agreement(battles, scores, rounds=20, seed=3) == rank_agreement(battles, scores, rounds=20, seed=3)


def test_one_score_pair_per_battle():
    battles, scores = simulated(judge_by_score=True, n=10)
    with pytest.raises(ValueError, match="one .score_a, score_b. per battle"):
        rank_agreement(battles, scores[:-1])
