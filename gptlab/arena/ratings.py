"""Ratings from battles, by the Chatbot Arena's conventions (FastChat's rating code is the reference),
so that gptlab's boards read like the Arena's and can be compared with them.

- Online Elo (``compute_online_elo``): battles replayed in time order, each moving both ratings by
  ``k * (actual - expected)``; a tie scores 0.5. It depends on the order, so it is shown beside
  Bradley-Terry, not instead of it.
- Bradley-Terry (``compute_bt``): the maximum-likelihood ratings under
  ``P(a beats b) = 1 / (1 + base ** ((r_b - r_a) / scale))``, a tie counting as half a win and half
  a loss. It uses every battle at once and not their order: the board ranks by it. scipy's
  ``trust-exact`` Newton method fits it (the loss is convex and the models few, so the exact
  Hessian is cheap).
- Regularization: with no penalty, a model that only wins (or only loses) has no finite maximum
  (its rating runs off to infinity). An L2 penalty ``L2 / 2 * sum(r ** 2)`` on the ratings in
  units of ``scale`` (a Gaussian prior of standard deviation ``1 / sqrt(L2)`` = 10 units = 4000
  points) bounds such a model, yet moves a model with a hundred battles both ways by well under
  0.1 point.
- Intervals: FastChat's bootstrap, battles resampled with replacement (as multinomial counts of
  the distinct outcomes), seeded; the percentile interval of each model's refitted rating.
  ``rank_ub`` is the Arena's rank: 1 + the number of models whose interval lies wholly above.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from gptlab.arena.battles import SCORE_A
from gptlab.errors import UserError
from gptlab.stats import percentile_interval

K, SCALE, BASE, INITIAL = 4.0, 400.0, 10.0, 1000.0  # the Arena's Elo constants, Bradley-Terry's scale too
L2 = 0.01  # see the module's docstring


def expected_score(rating_a: float, rating_b: float, scale: float = SCALE, base: float = BASE) -> float:
    """What a is expected to score against b (a win 1, a tie 0.5): 0.909 for a 400-point lead."""
    return 1.0 / (1.0 + base ** ((rating_b - rating_a) / scale))


def online_elo(
    battles, k: float = K, scale: float = SCALE, base: float = BASE, initial: float = INITIAL
) -> dict[str, float]:
    """FastChat's online Elo: battles replayed in tstamp order (a stable sort keeps the given order
    among equal times); two 1000-rated models and one win give 1002 / 998."""
    ratings: dict[str, float] = {}
    for battle in sorted(battles, key=lambda b: b.tstamp):
        rating_a, rating_b = ratings.get(battle.model_a, initial), ratings.get(battle.model_b, initial)
        change = k * (SCORE_A[battle.winner] - expected_score(rating_a, rating_b, scale, base))
        ratings[battle.model_a], ratings[battle.model_b] = rating_a + change, rating_b - change
    return ratings


def bradley_terry(
    battles, scale: float = SCALE, base: float = BASE, initial: float = INITIAL, anchor: tuple[str, float] | None = None
) -> dict[str, float]:
    """Bradley-Terry maximum-likelihood ratings; their mean is ``initial``, or ``anchor = (model,
    rating)`` pins one model's rating (FastChat anchors to a well-known model so boards compare)."""
    battles = list(battles)
    models = _models(battles)
    if not models:
        return {}
    pairs, score_a, counts = _outcomes(battles, models)
    ratings = _place(scale * _fit(pairs, score_a, counts, len(models), base), models, initial, anchor)
    return dict(zip(models, ratings.tolist(), strict=True))


def bootstrap_intervals(
    battles, rounds: int = 100, seed: int = 0, confidence: float = 0.95, anchor: tuple[str, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Each model's ``confidence`` percentile interval over ``rounds`` Bradley-Terry refits on
    battles resampled with replacement (seeded: the same seed gives the same intervals)."""
    if rounds < 1:
        raise UserError(f"the bootstrap needs at least 1 round, got {rounds}: give a positive number of rounds")
    battles = list(battles)
    models = _models(battles)
    if not models:
        return {}
    pairs, score_a, counts = _outcomes(battles, models)
    resampled = np.random.default_rng(seed).multinomial(len(battles), counts / counts.sum(), size=rounds)
    fits = np.stack([_fit(pairs, score_a, weights, len(models), BASE) for weights in resampled])
    samples = _place(SCALE * fits, models, INITIAL, anchor)
    return {model: percentile_interval(samples[:, i], confidence) for i, model in enumerate(models)}


def leaderboard(battles, rounds: int = 100, seed: int = 0, anchor: tuple[str, float] | None = None) -> list[dict]:
    """One row per model, best Bradley-Terry rating first: model, bt, elo, ci_low, ci_high, rank_ub,
    battles, wins, ties (``tie (bothbad)`` counts as a tie)."""
    battles = list(battles)
    bt, elo = bradley_terry(battles, anchor=anchor), online_elo(battles)
    intervals = bootstrap_intervals(battles, rounds, seed, anchor=anchor)
    played, won, tied = Counter(), Counter(), Counter()
    for battle in battles:
        played.update((battle.model_a, battle.model_b))
        score_a = SCORE_A[battle.winner]
        if score_a == 0.5:
            tied.update((battle.model_a, battle.model_b))
        else:
            won[battle.model_a if score_a == 1.0 else battle.model_b] += 1
    rows = [
        {
            "model": model,
            "bt": bt[model],
            "elo": elo[model],
            "ci_low": low,
            "ci_high": high,
            "rank_ub": 1 + sum(other_low > high for other_low, _ in intervals.values()),
            "battles": played[model],
            "wins": won[model],
            "ties": tied[model],
        }
        for model, (low, high) in intervals.items()
    ]
    return sorted(rows, key=lambda row: (-row["bt"], row["model"]))


def win_matrix(battles) -> tuple[list[str], list[list[float | None]]]:
    """(models, matrix): ``matrix[i][j]`` is model i's score against model j over their battles,
    either side (a tie half a win), None where they never met; models in leaderboard order."""
    battles = list(battles)
    bt = bradley_terry(battles)
    models = sorted(bt, key=lambda model: (-bt[model], model))
    scored, met = Counter(), Counter()
    for battle in battles:
        score_a = SCORE_A[battle.winner]
        scored[battle.model_a, battle.model_b] += score_a
        scored[battle.model_b, battle.model_a] += 1.0 - score_a
        met[battle.model_a, battle.model_b] += 1
        met[battle.model_b, battle.model_a] += 1
    matrix = [
        [scored[row, column] / met[row, column] if met[row, column] else None for column in models] for row in models
    ]
    return models, matrix


def _models(battles: list) -> list[str]:
    return sorted({battle.model_a for battle in battles} | {battle.model_b for battle in battles})


def _outcomes(battles: list, models: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FastChat's ``preprocess_for_bt``: the distinct (model_a, model_b, score of a) outcomes as
    (pairs of model indices, scores, how many battles had each)."""
    index = {model: i for i, model in enumerate(models)}
    rows = [(index[b.model_a], index[b.model_b], round(2 * SCORE_A[b.winner])) for b in battles]
    distinct, counts = np.unique(np.array(rows, dtype=np.int64), axis=0, return_counts=True)
    return distinct[:, :2], distinct[:, 2] / 2.0, counts.astype(np.float64)


def _fit(pairs: np.ndarray, score_a: np.ndarray, weights: np.ndarray, n_models: int, base: float) -> np.ndarray:
    """Ratings in units of ``scale`` that minimize the weighted Bradley-Terry negative log-likelihood
    plus the L2 penalty. A score of 0.5 puts half its weight on each side: half a win, half a loss."""
    design = np.zeros((len(pairs), n_models))
    design[np.arange(len(pairs)), pairs[:, 0]] = math.log(base)
    design[np.arange(len(pairs)), pairs[:, 1]] = -math.log(base)

    def loss_and_gradient(ratings):
        logits = design @ ratings
        loss = weights @ (score_a * np.logaddexp(0.0, -logits) + (1.0 - score_a) * np.logaddexp(0.0, logits))
        gradient = design.T @ (weights * (expit(logits) - score_a))
        return loss + 0.5 * L2 * ratings @ ratings, gradient + L2 * ratings

    def hessian(ratings):
        p = expit(design @ ratings)
        return design.T @ (design * (weights * p * (1.0 - p))[:, None]) + L2 * np.eye(n_models)

    result = minimize(loss_and_gradient, np.zeros(n_models), jac=True, hess=hessian, method="trust-exact")
    return result.x


def _place(points: np.ndarray, models: list[str], initial: float, anchor: tuple[str, float] | None) -> np.ndarray:
    """Shift ratings (the last axis runs over models) so their mean is ``initial``, or so the anchor
    model's is its given rating: Bradley-Terry fixes only differences."""
    if anchor is None:
        return points - points.mean(axis=-1, keepdims=True) + initial
    name, rating = anchor
    if name not in models:
        raise UserError(f"the anchor model {name!r} has no battles: anchor to one of {', '.join(models)}")
    i = models.index(name)
    return points - points[..., i : i + 1] + rating
