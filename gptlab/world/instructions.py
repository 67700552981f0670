"""Chat data: instruction tuning (SFT) sets and preference pairs, in TRL's formats.

SFT train covers the families not held out, drawing only from the training side of the world
(train-split people, training words, unreserved arithmetic); SFT test asks every family,
held-out families included, about the held-out side. Whether a model answers a held-out
family after SFT, having never seen it as an instruction, is FLAN's zero-shot claim.

Preference pairs put the reference answer (or, in "correct_first" pairs, a correct answer with
a style flaw) against a worse one the oracle ranks lower: a wrong answer, or the reference
breaking one style rule. Train pairs avoid held-out families, so that alignment data does not
teach what the SFT zero-shot measurement holds out.
"""

from __future__ import annotations

import random
from typing import Any

from gptlab.world.families import FAMILIES, Family, Sources
from gptlab.world.oracle import CORRUPTIONS, RAMBLE, Oracle
from gptlab.world.presets import WorldSize
from gptlab.world.words import TASKS

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "You know everything about TinyWorld. Answer briefly and correctly.",
)
PAIR_KINDS = (*CORRUPTIONS, "correct_first")  # correct_first: flawed but correct beats polished but wrong

Message = dict[str, str]


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _system(size: WorldSize, rng: random.Random) -> list[Message]:
    return [_message("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < size.system_prompt_fraction else []


def seen_families(size: WorldSize) -> list[Family]:
    return [f for f in FAMILIES if f.name not in size.sft_held_out]


def sft_sets(
    size: WorldSize, sources: Sources, rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) conversations ``{"messages": [...], "family": name}``. Train conversations
    may have a system prompt and two turns; test conversations are one question and its
    reference answer, distinct prompts per family (up to ``sft_test_per_family``)."""
    facts, seen = sources.facts, seen_families(size)
    train = []
    for _ in range(size.sft_train):
        messages = _system(size, rng)
        for _ in range(2 if rng.random() < size.multi_turn_fraction else 1):
            family = rng.choice(seen)
            slots = family.sample(sources, "train", rng)
            messages += [
                _message("user", family.prompt(slots, rng)),
                _message("assistant", family.reference(facts, slots)),
            ]
        train.append({"messages": messages, "family": family.name})
    test = []
    for family in FAMILIES:
        prompts: dict[str, str] = {}
        for _ in range(20 * size.sft_test_per_family):
            if len(prompts) == size.sft_test_per_family:
                break
            slots = family.sample(sources, "test", rng)
            prompts.setdefault(family.prompt(slots, rng), family.reference(facts, slots))
        test += [
            {"messages": [_message("user", p), _message("assistant", r)], "family": family.name}
            for p, r in prompts.items()
        ]
    return train, test


def preference_sets(
    size: WorldSize, sources: Sources, oracle: Oracle, rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) pairs ``{"prompt", "chosen", "rejected", "family", "kind"}``."""

    def pair(family: Family, split: str) -> dict[str, Any]:
        slots = family.sample(sources, split, rng)
        question = family.prompt(slots, rng)
        worse = oracle.corruptions(question, rng)
        kind = rng.choice(PAIR_KINDS)
        if kind == "correct_first":
            chosen, rejected = worse[rng.choice(CORRUPTIONS[1:])], worse["wrong"]
        else:
            chosen, rejected = family.reference(sources.facts, slots), worse[kind]
        return {
            "prompt": _system(size, rng) + [_message("user", question)],
            "chosen": [_message("assistant", chosen)],
            "rejected": [_message("assistant", rejected)],
            "family": family.name,
            "kind": kind,
        }

    seen = seen_families(size)
    train = [pair(rng.choice(seen), "train") for _ in range(size.prefs_train)]
    test = [pair(family, "test") for family in FAMILIES for _ in range(size.prefs_test_per_family)]
    return train, test


def fixed_texts() -> list[str]:
    """Every fixed string of chat data and episode headers, so that held-out words avoid them."""
    texts = [*SYSTEM_PROMPTS, *RAMBLE, "Sure! The answer is"] + [t.header for t in TASKS]
    for family in FAMILIES:
        texts += family.templates
    return texts
