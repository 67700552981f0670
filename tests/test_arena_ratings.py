"""The arena's ratings: online Elo, Bradley-Terry, bootstrap intervals, the board and the win matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gptlab.arena.battles import Battle
from gptlab.arena.ratings import (
    bootstrap_intervals,
    bradley_terry,
    expected_score,
    leaderboard,
    online_elo,
    win_matrix,
)
from gptlab.errors import UserError
from helpers import assert_one_line

TRUE_RATINGS = {"ace": 1250.0, "bishop": 1120.0, "castle": 1000.0, "dame": 930.0, "ember": 800.0}
TIE_CHANCE = 0.15


def fight(model_a: str, model_b: str, winner: str, tstamp: float = 0.0) -> Battle:
    return Battle([{"role": "user", "content": "?"}], model_a, model_b, "a", "b", winner, "oracle", tstamp=tstamp)


def simulated_battles(n: int = 3000, seed: int = 1) -> list[Battle]:
    """Battles between random pairs, decided by the Bradley-Terry model of TRUE_RATINGS, with some random ties."""
    rng = np.random.default_rng(seed)
    models = list(TRUE_RATINGS)
    battles = []
    for t in range(n):
        a, b = rng.choice(len(models), size=2, replace=False)
        p_a = expected_score(TRUE_RATINGS[models[a]], TRUE_RATINGS[models[b]])
        draw = rng.random()
        winner = "tie" if draw < TIE_CHANCE else "model_a" if rng.random() < p_a else "model_b"
        battles.append(fight(models[a], models[b], winner, tstamp=float(t)))
    return battles


def logistic_regression_ratings(battles: list[Battle]) -> dict[str, float]:
    """An independent fit: unpenalized logistic regression by Newton's method (IRLS) on one row per battle, a tie
    written as a win row and a loss row of weight 1/2 each, the first model's coefficient fixed at 0 (no
    regularization: it only identifies the ratings), then scaled by 400/ln 10 and centred on 1000."""
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    rows, labels, weights = [], [], []
    for b in battles:
        row = np.zeros(len(models))
        row[models.index(b.model_a)], row[models.index(b.model_b)] = 1.0, -1.0
        outcomes = (
            [(1.0, 1.0)] if b.winner == "model_a" else [(0.0, 1.0)] if b.winner == "model_b" else [(1, 0.5), (0, 0.5)]
        )
        for label, weight in outcomes:
            rows.append(row[1:])
            labels.append(label)
            weights.append(weight)
    x, y, w = np.array(rows) * math.log(10), np.array(labels), np.array(weights)
    beta = np.zeros(len(models) - 1)
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ beta))
        step = np.linalg.solve(x.T @ (x * (w * p * (1 - p))[:, None]), x.T @ (w * (y - p)))
        beta += step
        if np.abs(step).max() < 1e-12:
            break
    ratings = 400 * np.concatenate([[0.0], beta])
    return dict(zip(models, ratings - ratings.mean() + 1000, strict=True))


# --------------------------------------------------------------------------- Elo


def test_expected_score_follows_the_elo_curve():
    assert expected_score(1400, 1000) == pytest.approx(1 / 1.1) == pytest.approx(0.909, abs=5e-4)
    assert expected_score(1000, 1400) == pytest.approx(1 - 1 / 1.1)
    assert expected_score(1234, 1234) == 0.5


def test_online_elo_one_win_between_two_new_models_gives_1002_and_998():
    assert online_elo([fight("alpha", "beta", "model_a")]) == {"alpha": 1002.0, "beta": 998.0}
    assert online_elo([fight("alpha", "beta", "model_b")]) == {"alpha": 998.0, "beta": 1002.0}
    assert online_elo([fight("alpha", "beta", "tie (bothbad)")]) == {"alpha": 1000.0, "beta": 1000.0}


def test_online_elo_replays_battles_in_time_order():
    # beta wins first (t=1), then alpha (t=2), whatever order the list is in
    battles = [fight("alpha", "beta", "model_a", tstamp=2.0), fight("alpha", "beta", "model_b", tstamp=1.0)]
    gain = 4 * (1 - expected_score(998, 1002))
    assert online_elo(battles) == pytest.approx({"alpha": 998 + gain, "beta": 1002 - gain})
    # a tie moves the lower-rated model up: it scores 0.5 where less was expected
    with_tie = [fight("alpha", "beta", "model_a", tstamp=1.0), fight("alpha", "beta", "tie", tstamp=2.0)]
    step = 4 * (0.5 - expected_score(1002, 998))
    assert online_elo(with_tie) == pytest.approx({"alpha": 1002 + step, "beta": 998 - step})
    assert step < 0


# --------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_equals_an_independent_logistic_regression_and_recovers_the_true_order():
    battles = simulated_battles()
    ratings = bradley_terry(battles)
    reference = logistic_regression_ratings(battles)
    assert ratings.keys() == reference.keys()
    for model in ratings:
        assert abs(ratings[model] - reference[model]) < 0.5, (model, ratings[model], reference[model])
    assert sorted(ratings, key=ratings.get, reverse=True) == list(TRUE_RATINGS)
    assert np.mean(list(ratings.values())) == pytest.approx(1000)


def test_bradley_terry_anchored_to_a_model_keeps_the_differences():
    battles = simulated_battles(600)
    centred, anchored = bradley_terry(battles), bradley_terry(battles, anchor=("castle", 1114.0))
    assert anchored["castle"] == 1114.0
    for model in centred:
        assert anchored[model] - anchored["castle"] == pytest.approx(centred[model] - centred["castle"])
    with pytest.raises(UserError) as error:
        bradley_terry(battles, anchor=("gpt-4", 1200.0))
    assert_one_line(error, "'gpt-4'", "castle")


def test_ties_count_as_half_a_win_and_half_a_loss():
    all_ties = [fight("alpha", "beta", "tie"), fight("beta", "gamma", "tie (bothbad)"), fight("gamma", "alpha", "tie")]
    assert bradley_terry(all_ties) == pytest.approx({"alpha": 1000, "beta": 1000, "gamma": 1000}, abs=1e-6)
    context = [fight("alpha", "gamma", "model_a"), fight("beta", "gamma", "model_a"), fight("gamma", "beta", "tie")]
    win_and_loss = [*context, fight("alpha", "beta", "model_a"), fight("alpha", "beta", "model_b")]
    two_ties = [*context, fight("alpha", "beta", "tie"), fight("beta", "alpha", "tie (bothbad)")]
    assert bradley_terry(win_and_loss) == pytest.approx(bradley_terry(two_ties), abs=1e-6)
    assert bradley_terry(two_ties) != pytest.approx(bradley_terry(context), abs=1e-3)


def test_a_model_that_only_wins_or_only_loses_gets_a_finite_rating():
    battles = [fight("champ", "middle", "model_a")] * 5 + [fight("middle", "loser", "model_a")] * 5
    battles += [fight("middle", "loser", "model_b"), fight("champ", "loser", "model_a")]
    ratings = bradley_terry(battles)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["champ"] > ratings["middle"] > ratings["loser"]
    assert ratings["champ"] - ratings["loser"] < 4000  # bounded by the regularization, not running off
    lone = bradley_terry([fight("alpha", "beta", "model_a")])
    assert 1000 < lone["alpha"] < 2000 and lone["alpha"] + lone["beta"] == pytest.approx(2000)


# --------------------------------------------------------------------------- intervals and the board


def test_bootstrap_intervals_contain_the_estimate_and_repeat_with_the_seed():
    battles = simulated_battles(800)
    ratings = bradley_terry(battles)
    intervals = bootstrap_intervals(battles, seed=3)
    for model, (low, high) in intervals.items():
        assert low < ratings[model] < high, (model, low, ratings[model], high)
    assert bootstrap_intervals(battles, seed=3) == intervals
    assert bootstrap_intervals(battles, seed=4) != intervals
    anchored = bootstrap_intervals(battles, rounds=20, anchor=("castle", 1114.0))
    assert anchored["castle"] == pytest.approx((1114.0, 1114.0))
    with pytest.raises(UserError) as error:
        bootstrap_intervals(battles, rounds=0)
    assert_one_line(error, "at least 1 round")


def test_the_leaderboard_ranks_by_upper_bound_and_counts_battles():
    battles = simulated_battles(400)
    battles += [fight("ace", "newcomer", "model_a"), fight("newcomer", "ember", "tie (bothbad)")]
    rows = leaderboard(battles, rounds=50)
    assert [list(row) for row in rows] == [
        ["model", "bt", "elo", "ci_low", "ci_high", "rank_ub", "battles", "wins", "ties"]
    ] * len(rows)
    assert [row["bt"] for row in rows] == sorted((row["bt"] for row in rows), reverse=True)
    assert [row["model"] for row in rows if row["model"] != "newcomer"] == list(TRUE_RATINGS)
    for row in rows:
        assert row["rank_ub"] == 1 + sum(other["ci_low"] > row["ci_high"] for other in rows)
    ranks = [row["rank_ub"] for row in rows]
    assert ranks[0] == 1 and ranks == sorted(ranks) and ranks[-1] > 1  # the clearly best and worst are told apart
    newcomer = next(row for row in rows if row["model"] == "newcomer")
    assert (newcomer["battles"], newcomer["wins"], newcomer["ties"]) == (2, 0, 1)
    assert newcomer["ci_high"] - newcomer["ci_low"] > rows[0]["ci_high"] - rows[0]["ci_low"]  # 2 battles: unsure
    ace = next(row for row in rows if row["model"] == "ace")
    ace_battles = [b for b in battles if "ace" in (b.model_a, b.model_b)]
    assert ace["battles"] == len(ace_battles)
    assert ace["wins"] == sum(b.winner == ("model_a" if b.model_a == "ace" else "model_b") for b in ace_battles)
    assert ace["elo"] == online_elo(battles)["ace"]


def test_the_win_matrix_scores_each_pair_either_side():
    battles = [
        fight("alpha", "beta", "model_a"),
        fight("beta", "alpha", "model_a"),
        fight("alpha", "beta", "tie"),
        fight("gamma", "alpha", "model_b"),
        fight("gamma", "alpha", "model_b"),
    ]
    models, matrix = win_matrix(battles)
    assert models == ["alpha", "beta", "gamma"] == [row["model"] for row in leaderboard(battles, rounds=5)]
    assert matrix == [[None, 0.5, 1.0], [0.5, None, None], [0.0, None, None]]


def test_no_battles_give_an_empty_board():
    assert online_elo([]) == bradley_terry([]) == bootstrap_intervals([]) == {}
    assert leaderboard([]) == []
    assert win_matrix([]) == ([], [])
