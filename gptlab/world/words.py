"""Word tasks (as in the GPT-3 paper) and their bursty in-context episodes.

Five of the six tasks share one surface format, ``word -> transformed``, so a prompt with no
examples does not say which task is meant: measured at laptop scale (DESIGN.md section 3), one
task alone makes zero-shot too easy, while several tasks behind one format make the examples in
the prompt matter, and matter more for bigger models. ``random_insertion`` (GPT-3's "random
insertion in word": a symbol between every two letters, recover the word) is recognisable from
its input and serves as the easy control.

GPT-3's anagram tasks ask to unscramble a word, which is only possible for words the model
knows; the held-out test words here are never in the corpus, so the anagram task is its
deterministic form, ``sort_letters`` (the anagram in alphabetical order).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gptlab.world.names import NameMaker
from gptlab.world.presets import WorldSize

INSERTED = ".,;:!?/*+~"  # symbols random_insertion puts between letters ("-" and ">" would blur " -> ")


@dataclass(frozen=True)
class WordTask:
    name: str
    header: str  # the line naming the task at the top of a named episode
    instructions: tuple[str, ...]  # instruction templates with {word} (the task's input)
    transform: Callable[[str], str] | None  # word -> output; None for random_insertion


def _insert(word: str, rng: random.Random) -> str:
    return "".join(c + rng.choice(INSERTED) for c in word[:-1]) + word[-1]


TASKS = (
    WordTask(
        "reverse",
        "Reverse the letters of each word:",
        ("Reverse the letters of the word {word}.", "Write {word} backwards.", "What is {word} spelled backwards?"),
        lambda w: w[::-1],
    ),
    WordTask(
        "cycle_letters",
        "Move the first letter of each word to the end:",
        ("Move the first letter of {word} to the end.", "Cycle the letters of {word} by one."),
        lambda w: w[1:] + w[0],
    ),
    WordTask(
        "swap_ends",
        "Swap the first and last letters of each word:",
        ("Swap the first and last letters of {word}.", "Exchange the first and the last letter of {word}."),
        lambda w: w[-1] + w[1:-1] + w[0],
    ),
    WordTask(
        "sort_letters",
        "Sort the letters of each word alphabetically:",
        ("Sort the letters of {word} alphabetically.", "Write the letters of {word} in alphabetical order."),
        lambda w: "".join(sorted(w)),
    ),
    WordTask(
        "double_first",
        "Double the first letter of each word:",
        ("Double the first letter of {word}.", "Write {word} with its first letter doubled."),
        lambda w: w[0] + w,
    ),
    WordTask(
        "random_insertion",
        "Remove the symbols from each word:",
        ("Remove the symbols from {word}.", "Delete every symbol from {word} and keep the letters."),
        None,
    ),
)
TASK_BY_NAME = {t.name: t for t in TASKS}
WORD_TASK_NAMES = tuple(t.name for t in TASKS)
# The tasks whose input is the plain word: "word -> ?" alone does not say which is meant, so only
# the examples in the prompt do, and these measure in-context learning (the ladder's default set).
SAME_FORMAT_TASK_NAMES = tuple(t.name for t in TASKS if t.transform is not None)


def outputs(word: str) -> list[str]:
    """What the deterministic tasks make of a word."""
    return [t.transform(word) for t in TASKS if t.transform is not None]


def example(task: WordTask, word: str, rng: random.Random) -> tuple[str, str]:
    """(input, output) of a task on a word."""
    if task.transform is None:
        return _insert(word, rng), word
    return word, task.transform(word)


@dataclass
class WordPools:
    """Training words, the benchmark's test words, and held-out words for SFT/preference tests.
    Neither the held-out words nor anything a task makes of them is ever a training word or
    what a task makes of one, and none is a word anywhere else in the corpus."""

    train: list[str]
    test: list[str]
    heldout: list[str]

    @classmethod
    def make(cls, size: WorldSize, taken: set[str], rng: random.Random) -> WordPools:
        """``taken``: every lowercase word of the other corpus files and fixed texts."""

        def distinct(word: str) -> bool:  # each task gives a different answer, none the word itself
            outs = outputs(word)
            return len(set(outs)) == len(outs) and word not in outs

        names = NameMaker(rng, taken)
        shape = {"syllables": (2, 3), "length": (4, 7)}
        test = [names.make(**shape, accept=distinct) for _ in range(size.word_test)]
        heldout = [
            names.make(**shape, accept=distinct) for _ in range(size.sft_test_per_family + size.prefs_test_per_family)
        ]
        forbidden = set(test + heldout) | {o for w in test + heldout for o in outputs(w)}
        names.take(forbidden)
        train = [
            names.make(**shape, accept=lambda w: distinct(w) and forbidden.isdisjoint(outputs(w)))
            for _ in range(size.n_words)
        ]
        return cls(train, test, heldout)


def episodes(size: WorldSize, words: list[str], budget: int, rng: random.Random) -> list[str]:
    """About ``budget`` characters of episodes: a few "input -> output" lines of one task, with
    no instruction (the task is hidden) except in ``named_episode_fraction`` of them, which open
    with the task's name so that instructions can later be tied to the skill."""
    docs: list[str] = []
    total = 0
    while total < budget:
        task = rng.choice(TASKS)
        n = rng.randint(size.episode_min_lines, size.episode_max_lines)
        lines = [" -> ".join(example(task, w, rng)) for w in rng.sample(words, n)]
        if rng.random() < size.named_episode_fraction:
            lines.insert(0, task.header)
        doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc) + 2
    return docs
