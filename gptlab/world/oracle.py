"""The oracle: TinyWorld's hidden "human" preference, used to make preference pairs, to judge
arena battles and to measure alignment.

Correctness comes first: for every prompt of a family it knows (facts, arithmetic, word tasks,
city/country questions, biographies; see ``families.py``) it computes the true answer from
``world.json``, and a correct response always outscores a wrong one. Among responses equally
correct, four documented style rules decide (``STYLE_RULES``). Prompts it does not recognise
are judged on style alone. ``noise`` reverses a decisive verdict with that probability, from a
seeded stream, to model an imperfect rater.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

from gptlab.errors import UserError
from gptlab.world.facts import World
from gptlab.world.families import FAMILIES, Facts, Family, template_regex

STYLE_RULES = {
    "ends_with_period": "the response ends with a period",
    "concise": (
        "at most the family's word limit: 25 words, 80 for a biography, 60 for a prompt the oracle does not know"
    ),
    "no_repetition": "no sentence said twice, no word three times in a row",
    "no_filler": "does not open with filler such as 'Sure', 'Well', 'Of course' or 'As an AI'",
}
CORRECT_WEIGHT, STYLE_WEIGHT = 0.6, 0.4  # 0.6 > 0.4: any correct answer beats any wrong one
UNKNOWN_MAX_WORDS = 60
FILLER = re.compile(r"(?:sure|of course|certainly|well|okay|ok|hmm|great question|as an ai|let me|i think)\b")
RAMBLE = (
    "The weather has been mild this season.",
    "Many people enjoy long walks after dinner.",
    "Markets are busy on most mornings.",
    "Some travellers prefer to rest at small inns.",
    "Good bread takes time to bake.",
    "Letters from old friends are always welcome.",
    "The roads are quiet early on a holiday.",
    "A warm cup of tea helps on a cold evening.",
    "Gardens need water when summer comes.",
    "Every town has a favourite story to tell.",
    "Some shops close early on the last day of the week.",
    "Rivers rise after a long rain.",
)
CORRUPTIONS = ("wrong", "no_period", "filler", "repeat", "ramble")
_REPEATED_WORD = re.compile(r"\b(\w+)(?:\s+\1\b){2}", re.IGNORECASE)

Prompt = str | list[dict[str, Any]]
Response = str | list[dict[str, Any]] | dict[str, Any]


def style_checks(response: str, max_words: int) -> dict[str, bool]:
    """Which style rules a response keeps."""
    text = response.strip()
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return {
        "ends_with_period": text.endswith("."),
        "concise": len(text.split()) <= max_words,
        "no_repetition": len(set(sentences)) == len(sentences) and not _REPEATED_WORD.search(text),
        "no_filler": not FILLER.match(text.lower()),
    }


class Oracle:
    """Scores and compares responses to TinyWorld prompts.

    ``world``: a folder written by ``write_world`` (or a ``World``, as the generator passes).
    Prompts are a string or a list of chat messages (the last user message is the question);
    responses a string, an assistant message, or a list of messages (the last one is read).
    """

    def __init__(self, world: str | os.PathLike | World, noise: float = 0.0, seed: int = 0):
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise UserError(f"oracle noise {noise!r} is not a probability: use a value between 0 and 1")
        self.world = world if isinstance(world, World) else World.load(world)
        self.facts = Facts(self.world)
        self.noise = float(noise)
        self._rng = random.Random(seed)
        self._parsers = [(template_regex(t, f.patterns), f) for f in FAMILIES for t in f.templates]

    def parse(self, prompt: Prompt) -> tuple[Family, dict[str, str]] | None:
        """The family and slots of a prompt, or None if it is not one the oracle knows."""
        text = _user_text(prompt).strip()
        for regex, family in self._parsers:
            match = regex.fullmatch(text)
            if match and family.gold(self.facts, match.groupdict()) is not None:
                return family, match.groupdict()
        return None

    def reference(self, prompt: Prompt) -> str | None:
        """The reference answer (correct and keeping every style rule), if the prompt is known."""
        parsed = self.parse(prompt)
        return None if parsed is None else parsed[0].reference(self.facts, parsed[1])

    def correct(self, prompt: Prompt, response: Response) -> bool | None:
        """Whether the response answers the question correctly; None for an unknown prompt."""
        parsed = self.parse(prompt)
        return None if parsed is None else parsed[0].correct(self.facts, parsed[1], _response_text(response))

    def style(self, prompt: Prompt, response: Response) -> dict[str, bool]:
        parsed = self.parse(prompt)
        return style_checks(_response_text(response), parsed[0].max_words if parsed else UNKNOWN_MAX_WORDS)

    def score(self, prompt: Prompt, response: Response) -> float:
        """In [0, 1]: 0.6 for a correct answer (0.3, undecided, for an unknown prompt) plus 0.4
        times the share of style rules kept."""
        return self._score(self.parse(prompt), _response_text(response))

    def judge(self, prompt: Prompt, response_a: Response, response_b: Response) -> str:
        """ "model_a" | "model_b" | "tie" | "tie (bothbad)" (both wrong). With ``noise``, a
        decisive verdict is reversed with that probability; every call draws once from the
        seeded stream, so a sequence of judgements is reproducible."""
        draw = self._rng.random()
        parsed = self.parse(prompt)
        a, b = _response_text(response_a), _response_text(response_b)
        if (
            parsed is not None
            and not parsed[0].correct(self.facts, parsed[1], a)
            and not parsed[0].correct(self.facts, parsed[1], b)
        ):
            return "tie (bothbad)"
        score_a, score_b = self._score(parsed, a), self._score(parsed, b)
        if abs(score_a - score_b) < 1e-9:
            return "tie"
        a_wins = score_a > score_b
        if draw < self.noise:
            a_wins = not a_wins
        return "model_a" if a_wins else "model_b"

    def corruptions(self, prompt: Prompt, rng: random.Random) -> dict[str, str]:
        """One worse answer per kind in ``CORRUPTIONS``: "wrong" is false but well styled; the
        others are the correct reference breaking one style rule each."""
        parsed = self.parse(prompt)
        if parsed is None:
            raise UserError("the oracle cannot corrupt the answer to a prompt it does not know: use a TinyWorld prompt")
        family, slots = parsed
        reference = family.reference(self.facts, slots)
        ramble = list(RAMBLE)
        rng.shuffle(ramble)
        rambling = reference
        while len(rambling.split()) <= family.max_words and ramble:
            rambling += " " + ramble.pop()
        return {
            "wrong": family.wrong(self.facts, slots, rng),
            "no_period": reference.removesuffix("."),
            "filler": "Sure! " + reference,
            "repeat": reference + " " + reference,
            "ramble": rambling,
        }

    def _score(self, parsed: tuple[Family, dict[str, str]] | None, response: str) -> float:
        if parsed is None:
            correct, max_words = 0.5, UNKNOWN_MAX_WORDS
        else:
            correct, max_words = float(parsed[0].correct(self.facts, parsed[1], response)), parsed[0].max_words
        checks = style_checks(response, max_words)
        return CORRECT_WEIGHT * correct + STYLE_WEIGHT * sum(checks.values()) / len(checks)


def _user_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    raise TypeError(f"a prompt is a string or a list of chat messages, not {type(prompt).__name__}")


def _response_text(response: Response) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, dict):
        return str(response.get("content", ""))
    if isinstance(response, list):
        return str(response[-1].get("content", "")) if response else ""
    raise TypeError(f"a response is a string, a message or a list of messages, not {type(response).__name__}")
