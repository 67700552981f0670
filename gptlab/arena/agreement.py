"""Does the arena's order agree with another measure of the same models? Kendall's tau between the
Bradley-Terry ratings of a set of battles and each model's mean score (TinyWorld's oracle score,
say) over its own answers in those battles, with a seeded bootstrap interval over battles: the
interval answers "would another draw of battles from the same prompts give the same agreement?"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau

from gptlab.arena.battles import Battle
from gptlab.arena.ratings import bradley_terry
from gptlab.stats import percentile_interval


def mean_scores(battles: Sequence[Battle], scores: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Each model's mean score over the answers it gave in ``battles`` (``scores[i]`` scores battle i's
    answer_a and answer_b)."""
    totals: dict[str, list[float]] = {}
    for battle, (score_a, score_b) in zip(battles, scores):
        totals.setdefault(battle.model_a, []).append(score_a)
        totals.setdefault(battle.model_b, []).append(score_b)
    return {model: float(np.mean(values)) for model, values in totals.items()}


def _tau(battles: Sequence[Battle], scores: Sequence[tuple[float, float]]) -> float:
    ratings, means = bradley_terry(battles), mean_scores(battles, scores)
    models = sorted(ratings)
    return float(kendalltau([ratings[m] for m in models], [means[m] for m in models]).statistic)


def rank_agreement(
    battles: Sequence[Battle],
    scores: Sequence[tuple[float, float]],
    rounds: int = 100,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """``{"tau", "ci": (lo, hi), "rounds"}``: Kendall's tau-b between the arena's Bradley-Terry order
    and the mean-score order, and its percentile interval over ``rounds`` resamples of the battles
    (a resample in which tau is undefined, every model tied on one side, is left out; ``rounds``
    says how many counted)."""
    if len(battles) != len(scores):
        raise ValueError(f"one (score_a, score_b) per battle: {len(battles)} battles, {len(scores)} scores")
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(rounds):
        picked = rng.integers(0, len(battles), size=len(battles))
        tau = _tau([battles[i] for i in picked], [scores[i] for i in picked])
        if np.isfinite(tau):
            taus.append(tau)
    interval = percentile_interval(np.asarray(taus), confidence) if taus else (float("nan"), float("nan"))
    return {"tau": _tau(battles, scores), "ci": interval, "rounds": len(taus)}
