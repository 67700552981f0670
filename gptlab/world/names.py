"""Invented, pronounceable names built from syllables (onset + vowel + optional coda).

Everything named in TinyWorld is invented, so a model can only know a fact about it from the
generated corpus, never from anything it might have read elsewhere, and a held-out word cannot
be a word the model already knows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable

from gptlab.errors import UserError

ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "sh",
    "th",
    "ch",
)
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "nd", "rt")
_HARD = re.compile(r"[^aeiou]{4}|(.)\1\1")  # four consonants in a row, or a letter three times


class NameMaker:
    """Makes names never made (or taken) before; one instance per family of names that must
    not collide. Membership is all the taken set is used for, so its order never matters."""

    def __init__(self, rng: random.Random, taken: Iterable[str] = ()):
        self._rng = rng
        self._taken = {t.lower() for t in taken}

    def take(self, names: Iterable[str]) -> None:
        """Mark names as used so they are never made."""
        self._taken.update(n.lower() for n in names)

    def make(
        self,
        syllables: tuple[int, int],
        endings: tuple[str, ...] = ("",),
        length: tuple[int, int] = (3, 10),
        accept: Callable[[str], bool] | None = None,
    ) -> str:
        """A new lowercase name of ``syllables`` syllables plus one of ``endings``."""
        for _ in range(20_000):
            name = "".join(self._syllable() for _ in range(self._rng.randint(*syllables)))
            name += self._rng.choice(endings)
            if (
                length[0] <= len(name) <= length[1]
                and name not in self._taken
                and not _HARD.search(name)
                and (accept is None or accept(name))
            ):
                self._taken.add(name)
                return name
        raise UserError(
            f"TinyWorld ran out of new {syllables[0]}-{syllables[1]} syllable names after "
            f"{len(self._taken)}: the sizes ask for too many names; lower n_people or n_words"
        )

    def _syllable(self) -> str:
        return self._rng.choice(ONSETS) + self._rng.choice(VOWELS) + self._rng.choice(CODAS)
