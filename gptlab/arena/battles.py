"""One arena battle: a prompt, two models' answers and a judge's verdict, in FastChat's terms."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

# FastChat's verdicts: "tie (bothbad)" is a tie in which both answers are bad; ratings count it as a tie.
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
# What a verdict scores for model_a, as Elo's actual score and as Bradley-Terry's half-win for a tie
SCORE_A = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def new_battle_id() -> str:
    """An id no one can guess (the arena page's vote names its battle by it)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Battle:
    """``prompt`` is the conversation up to the user's last turn (a list of ``{"role", "content"}``);
    ``answer_a`` / ``answer_b`` are the two models' replies to it; ``winner`` is one of ``WINNERS``;
    ``judge`` names who decided (``oracle``, ``reward:DIR``, ``llm:DIR``, ``human``);
    ``tstamp`` is Unix time in seconds (ratings replay battles in that order)."""

    prompt: list[dict]
    model_a: str
    model_b: str
    answer_a: str
    answer_b: str
    winner: str
    judge: str
    tstamp: float = field(default_factory=time.time)
    battle_id: str = field(default_factory=new_battle_id)

    def __post_init__(self):
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {self.winner!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"a battle needs two different models, got {self.model_a!r} twice")


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt file's prompt (plain text, or TRL's conversational list of messages) as messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
