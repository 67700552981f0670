"""Seeded percentile-bootstrap intervals for means and differences of per-item scores, and the
pooling of one effect's estimates from independent runs (the demo's seeds).

Torch-free (numpy only), so the report, the scaling fits, the ladder and the arena share one
implementation without importing the model.
"""

from __future__ import annotations

import numpy as np


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap samples, (lo, hi)."""
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _as_sample(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers")
    return array


def bootstrap_mean_interval(
    values, confidence: float = 0.95, bootstrap: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-item scores with a seeded percentile-bootstrap interval."""
    values = _as_sample(values, "values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(bootstrap, values.size))].mean(axis=1)
    return (float(values.mean()), *percentile_interval(means, confidence))


def difference_interval(
    a_values, b_values, *, paired: bool, confidence: float = 0.95, bootstrap: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), lo, hi) with a seeded percentile-bootstrap interval.

    Paired when item i of a and of b is the same question (e.g. CoT vs standard prompting): items
    are resampled together, so the spread between easy and hard questions cancels out of the
    interval. Unpaired (e.g. two models on different samples): each side
    is resampled on its own.
    """
    a, b = _as_sample(a_values, "a_values"), _as_sample(b_values, "b_values")
    rng = np.random.default_rng(seed)
    if paired:
        if a.size != b.size:
            raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
        diffs = b - a
        boot = diffs[rng.integers(0, diffs.size, size=(bootstrap, diffs.size))].mean(axis=1)
        return (float(diffs.mean()), *percentile_interval(boot, confidence))
    boot = b[rng.integers(0, b.size, size=(bootstrap, b.size))].mean(axis=1) - a[
        rng.integers(0, a.size, size=(bootstrap, a.size))
    ].mean(axis=1)
    return (float(b.mean() - a.mean()), *percentile_interval(boot, confidence))


def pooled_interval(estimates, z: float = 1.96) -> tuple[float, float, float]:
    """(effect, lo, hi): a fixed-effect inverse-variance pooling of independent estimates of one
    effect, each given as (effect, lo, hi) with a 95% interval (``z`` = 1.96).

    Each estimate's standard error is read off its interval, (hi - lo) / (2 z), and weighs 1 / se²;
    the pooled effect is the weighted mean and its standard error 1 / sqrt(sum of the weights), so
    n equal estimates give the same effect with an interval sqrt(n) times narrower. A zero-width
    interval (a bootstrap over items that all scored alike) has no usable standard error: it gets
    the smallest nonzero one among the estimates, so it weighs as much as the surest of them instead
    of infinitely much; when every interval has zero width the pooled one has zero width too.
    """
    array = np.asarray(estimates, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != 3 or not np.all(np.isfinite(array)):
        raise ValueError("estimates must be a non-empty sequence of finite (effect, lo, hi) triples")
    effects, lo, hi = array.T
    if np.any(hi < lo):
        raise ValueError("every estimate's interval must have lo <= hi")
    se = (hi - lo) / (2 * z)
    if not np.any(se > 0):
        mean = float(effects.mean())
        return mean, mean, mean
    se = np.where(se > 0, se, se[se > 0].min())
    weights = 1.0 / se**2
    mean = float(np.sum(weights * effects) / np.sum(weights))
    half = z / float(np.sqrt(np.sum(weights)))
    return mean, mean - half, mean + half
