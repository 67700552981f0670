"""Arithmetic: problems, worked digit-by-digit solutions, and operand pairs reserved for testing.

A task ``{op}_{k}`` (``add_3``, ``mul_2``) asks about two k-digit numbers. Harder tasks need
more digits of carrying, which is what makes exact match jump with training compute while
a partial-credit metric (digit edit distance) rises smoothly (Schaeffer et al.). Worked
solutions break a problem into one-digit steps, which is the chain of thought a small model can
learn to produce; both forms end in the same answer.

Test pairs are reserved before any training text is written: a reserved pair never appears in
the corpus or in SFT/preference training data, neither as a problem nor as a step inside a
worked solution (a multiplication's partial sums are additions that could be test problems).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gptlab.world.presets import WorldSize

SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
OP_WEIGHTS = {"add": 0.4, "sub": 0.3, "mul": 0.3}  # how often each operation appears in the corpus
COT_START = "Let's think step by step."


@dataclass(frozen=True)
class Problem:
    op: str  # "add" | "sub" | "mul"
    a: int
    b: int

    @property
    def answer(self) -> int:
        return {"add": self.a + self.b, "sub": self.a - self.b, "mul": self.a * self.b}[self.op]

    @property
    def question(self) -> str:
        return f"{self.a}{SYMBOLS[self.op]}{self.b}=?"

    @property
    def key(self) -> tuple[str, int, int]:
        """Identity for reservation; addition and multiplication ignore operand order."""
        if self.op == "sub":
            return (self.op, self.a, self.b)
        return (self.op, min(self.a, self.b), max(self.a, self.b))

    @property
    def task(self) -> str | None:
        """The benchmark task this problem belongs to: both operands of k >= 2 digits."""
        k = len(str(self.a))
        return f"{self.op}_{k}" if k >= 2 and len(str(self.b)) == k else None


def tasks(size: WorldSize) -> list[str]:
    """Benchmark task names, in a fixed order."""
    return (
        [f"add_{k}" for k in range(2, size.max_digits + 1)]
        + [f"sub_{k}" for k in range(2, size.max_digits + 1)]
        + [f"mul_{k}" for k in range(2, size.max_mul_digits + 1)]
    )


def random_problem(op: str, k: int, rng: random.Random) -> Problem:
    """Two k-digit operands (0-9 for k = 1); subtraction keeps the result non-negative."""
    lo, hi = (0 if k == 1 else 10 ** (k - 1)), 10**k - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "sub" and a < b:
        a, b = b, a
    return Problem(op, a, b)


def worked(p: Problem) -> tuple[str, list[Problem]]:
    """The step-by-step solution ending in "The answer is N.", and the multi-digit problems it
    states along the way (so that reservation can keep test pairs out of the steps too)."""
    steps: list[str] = []
    inner: list[Problem] = []
    if p.a < 10 and p.b < 10:
        steps.append(f"{p.a}{SYMBOLS[p.op]}{p.b}={p.answer}")
    elif p.op == "add":
        top, bottom = _digits(p.a), _digits(p.b)
        n = max(len(top), len(bottom))
        top, bottom, carry = top + [0] * (n - len(top)), bottom + [0] * (n - len(bottom)), 0
        for i in range(n):
            total = top[i] + bottom[i] + carry
            expr = f"{top[i]}+{bottom[i]}" + (f"+{carry}" if carry else "")
            if i == n - 1:
                steps.append(f"{expr}={total}, write {total}")
            else:
                steps.append(f"{expr}={total}, write {total % 10}" + (", carry 1" if total >= 10 else ""))
                carry = total // 10
    elif p.op == "sub":
        top, bottom = _digits(p.a), _digits(p.b)
        bottom += [0] * (len(top) - len(bottom))
        borrow = 0
        for t, d in zip(top, bottom):
            x = t - borrow
            step = f"{t}-{borrow}={x}, " if borrow else ""
            if x >= d:
                steps.append(f"{step}{x}-{d}={x - d}")
                borrow = 0
            else:
                steps.append(f"{step}{x}-{d} needs a borrow: {x + 10}-{d}={x + 10 - d}, borrow 1")
                borrow = 1
    else:
        partials = []
        for i, d in enumerate(_digits(p.b)):
            if i == 0 or d == 0:
                steps.append(f"{p.a}*{d}={p.a * d}")
            else:
                shifted = d * 10**i
                steps.append(f"{p.a}*{d}={p.a * d}, so {p.a}*{shifted}={p.a * shifted}")
                inner.append(Problem("mul", p.a, shifted))
            if d:
                partials.append(p.a * d * 10**i)
        total = partials[0]
        for part in partials[1:]:
            steps.append(f"{total}+{part}={total + part}")
            inner.append(Problem("add", total, part))
            total += part
    return f"{COT_START} {'. '.join(steps)}. The answer is {p.answer}.", inner


def _digits(n: int) -> list[int]:
    """Digits from the right."""
    return [int(c) for c in reversed(str(n))]


def bench_record(p: Problem) -> dict[str, str]:
    """GSM8K's layout: the answer is the rationale followed by "#### N"."""
    rationale, _ = worked(p)
    return {"question": p.question, "answer": f"{rationale}\n#### {p.answer}", "rationale": rationale}


class Reservation:
    """Operand pairs held out of every training text, per benchmark task: ``bench`` for the
    arithmetic benchmark, ``heldout`` for the SFT and preference test sets."""

    def __init__(self, size: WorldSize, rng: random.Random):
        self.bench: dict[str, list[Problem]] = {}
        self.heldout: dict[str, list[Problem]] = {}
        self._keys: set[tuple[str, int, int]] = set()
        extra = size.sft_test_per_family + size.prefs_test_per_family
        for task in tasks(size):
            op, k = task.split("_")
            mine: list[Problem] = []
            while len(mine) < size.arith_test + extra:
                p = random_problem(op, int(k), rng)
                if p.key not in self._keys:
                    self._keys.add(p.key)
                    mine.append(p)
            self.bench[task], self.heldout[task] = mine[: size.arith_test], mine[size.arith_test :]

    def allows(self, p: Problem, steps: bool = True) -> bool:
        """May ``p`` appear in training text? With ``steps``, also checks its worked solution."""
        if p.key in self._keys:
            return False
        return not steps or all(q.key not in self._keys for q in worked(p)[1])


class ArithSampler:
    """Training problems: random operation and digit count, never a reserved pair."""

    def __init__(self, size: WorldSize, reservation: Reservation, rng: random.Random):
        self.size, self.reservation, self.rng = size, reservation, rng

    def problem(self, op: str | None = None, steps: bool = True) -> Problem:
        rng = self.rng
        op = op or rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
        top = self.size.max_mul_digits if op == "mul" else self.size.max_digits
        while True:
            p = random_problem(op, rng.randint(1, top), rng)
            if self.reservation.allows(p, steps):
                return p

    def fewshot(self, task: str) -> list[Problem]:
        """Exemplars for one task: distinct training problems of its operation and digit count."""
        op, k = task.split("_")
        found: dict[tuple[str, int, int], Problem] = {}
        while len(found) < self.size.arith_fewshot:
            p = random_problem(op, int(k), self.rng)
            if self.reservation.allows(p):
                found.setdefault(p.key, p)
        return list(found.values())

    def bare_documents(self, budget: int) -> list[str]:
        """Lines of "Q: 12+35=? A: 47.", three to eight per document."""
        docs, size = [], 0
        while size < budget:
            doc = "\n".join(
                f"Q: {p.question} A: {p.answer}."
                for p in (self.problem(steps=False) for _ in range(self.rng.randint(3, 8)))
            )
            docs.append(doc)
            size += len(doc) + 2
        return docs

    def worked_documents(self, budget: int) -> list[str]:
        """One to three worked solutions per document, one per line."""
        docs, size = [], 0
        while size < budget:
            doc = "\n".join(
                f"Q: {p.question} A: {worked(p)[0]}" for p in (self.problem() for _ in range(self.rng.randint(1, 3)))
            )
            docs.append(doc)
            size += len(doc) + 2
        return docs
