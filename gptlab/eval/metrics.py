"""Metrics as pure functions, named and computed as lm-evaluation-harness computes them.

Per-sample scores (``mc_scores``, ``exact_match``, ``partial_credit``) turn into a task's
numbers by aggregation (``mean`` with ``mean_stderr``; the perplexities with ``bootstrap_stderr``,
since they are not means of per-sample values).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

INVALID = "[invalid]"  # what lm-eval's regex filter yields when nothing matches

# GSM8K's two extractions (lm-eval's gsm8k.yaml): the "#### N" line, or the last number anywhere.
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
# What lm-eval's gsm8k strips from prediction and reference before comparing them.
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
LAST_NUMBER = r"(-?\d+)"


# --------------------------------------------------------------------------- multiple choice


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_scores(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (log-likelihood per character) and acc_bytes (per UTF-8 byte) of one question.

    ``choices`` are the answer texts without the target delimiter, as lm-eval measures them.
    """
    chars = [len(c) for c in choices]
    octets = [len(c.encode("utf-8")) for c in choices]
    return {
        "acc": float(argmax(logprobs) == gold),
        "acc_norm": float(argmax([lp / n for lp, n in zip(logprobs, chars)]) == gold),
        "acc_bytes": float(argmax([lp / n for lp, n in zip(logprobs, octets)]) == gold),
    }


# --------------------------------------------------------------------------- generation


def extract(text: str, pattern: str | None, group_select: int = 0) -> str:
    """The ``group_select``-th match of ``pattern`` in ``text`` (lm-eval's regex filter).

    A match of a pattern with several groups is the first group that matched; no match gives
    ``INVALID``; no pattern gives the text stripped.
    """
    if pattern is None:
        return text.strip()
    matches = re.findall(pattern, text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), match[0])
    return match.strip()


def normalize(text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False) -> str:
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def exact_match(
    prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False
) -> float:
    """1.0 when both strings agree after the same normalisation (lm-eval's exact_match)."""
    return float(
        normalize(prediction, regexes_to_ignore, ignore_case) == normalize(reference, regexes_to_ignore, ignore_case)
    )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of characters."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def partial_credit(prediction: str, reference: str) -> float:
    """1 - edit distance / longer length, in [0, 1]: a continuous score for answers that are
    nearly right (Schaeffer et al.: "emergence" can be an artifact of all-or-nothing metrics).
    On numbers it is the digit edit distance; a missing answer scores 0."""
    if prediction == INVALID:
        prediction = ""
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(prediction, reference) / longest


# --------------------------------------------------------------------------- aggregation


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean with the sample standard deviation (n - 1), as lm-eval: for
    0/1 scores it is sqrt(p (1 - p) / (n - 1)). NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1) / n)


def weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """sum(values) / sum(weights) over (value, weight) pairs."""
    return sum(v for v, _ in pairs) / sum(w for _, w in pairs)


def weighted_perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    """exp(-total log-likelihood / total units) over (log-likelihood, units) pairs."""
    return math.exp(-weighted_mean(pairs))


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    """-total log-likelihood (nats) / total bytes / ln 2 over (log-likelihood, bytes) pairs."""
    return -weighted_mean(pairs) / math.log(2)


def bootstrap_stderr(statistic: Callable[[list], float], items: Sequence, iters: int = 1000, seed: int = 0) -> float:
    """Standard deviation of ``statistic`` over ``iters`` resamples of ``items`` with
    replacement (seeded, so a rerun gives the same number). NaN for fewer than two items."""
    if len(items) < 2:
        return math.nan
    rng = random.Random(seed)
    draws = [statistic(rng.choices(items, k=len(items))) for _ in range(iters)]
    mu = mean(draws)
    return math.sqrt(sum((d - mu) ** 2 for d in draws) / (iters - 1))
