"""A tournament between model folders: `gptlab arena run`, and ``play`` for the demo.

``schedule`` deals the battles evenly over every unordered pair of models (each pair's count
differs from another's by at most one) in a seeded random order, and flips a seeded coin for
which model sits on side A, so neither side's position favours a model (an LLM judge's position
bias, say). Prompts are dealt the same way: the file's prompts shuffled, and shuffled again each
time they run out, so every prompt is asked as often as any other, give or take one.

Answers are generated in batches: each model answers each of its prompts once (through the chat
template, greedy by default, ``gptlab.chat.chat_replies``), and its battles on a prompt share that
answer. The judge then decides every battle in one call, and the battles go to the store in one
transaction.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from gptlab.align.rollouts import record_prompt
from gptlab.arena.battles import Battle, as_messages
from gptlab.arena.judges import Judge
from gptlab.arena.store import ArenaStore
from gptlab.chat import chat_replies, default_reply_tokens
from gptlab.data.documents import jsonl_records
from gptlab.engine import Engine
from gptlab.errors import UserError
from gptlab.tokenizer import CHAT_ROLES


def parse_models(spec: str) -> dict[str, Path]:
    """``NAME=DIR,NAME=DIR,...`` as name -> folder (a bare ``DIR`` is named by its path, as
    `gptlab serve --model` names it); at least two models, each name once, each folder there."""
    models: dict[str, Path] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, folder = entry.partition("=")
        if not sep or Path(entry).is_dir():
            name, folder = entry.rstrip("/") or entry, entry
        if not name or not folder:
            raise UserError(f"--models {entry!r}: give NAME=DIR, a name and a model folder")
        if name in models:
            raise UserError(f"--models: the name {name!r} is given twice; give each model its own name")
        if not Path(folder).is_dir():
            raise UserError(f"--models {entry}: {folder} is not a folder; give a model folder such as runs/sft/model")
        models[name] = Path(folder)
    if len(models) < 2:
        raise UserError(f"an arena needs at least two models, got {len(models)}: give --models A=DIR,B=DIR[,...]")
    return models


def read_prompts(path: str | os.PathLike) -> list[list[dict]]:
    """The prompts of a JSONL file as conversations: each line's ``prompt`` (text or messages), or
    its ``messages`` up to the last assistant reply (a chat data file), or its ``question``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist; give a JSONL file with one 'prompt' per line")
    prompts = []
    for number, record in jsonl_records(path):
        try:
            prompt = as_messages(record_prompt(record))
            _check_messages(prompt)
        except UserError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        prompts.append(prompt)
    if not prompts:
        raise UserError(
            f"{path} holds no prompts: give one JSON object per line with a 'prompt' (text or messages) or 'messages'"
        )
    return prompts


def _check_messages(messages: list) -> None:
    for message in messages:
        if not (
            isinstance(message, dict) and message.get("role") in CHAT_ROLES and isinstance(message.get("content"), str)
        ):
            raise UserError(f"a message must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': text}}")


def check_battles(battles: int) -> None:
    if isinstance(battles, bool) or not isinstance(battles, int) or battles < 1:
        raise UserError(f"--battles must be a whole number >= 1, got {battles!r}")


def schedule(models: list[str], battles: int, rng: random.Random) -> list[tuple[str, str]]:
    """(model_a, model_b) of each battle: every unordered pair ``battles // pairs`` times, the rest on
    distinct pairs drawn at random, in random order, each side by a coin flip."""
    pairs = list(itertools.combinations(models, 2))
    rounds, rest = divmod(battles, len(pairs))
    dealt = pairs * rounds + rng.sample(pairs, rest)
    rng.shuffle(dealt)
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in dealt]


def deal_prompts(prompts: int, battles: int, rng: random.Random) -> list[int]:
    """The prompt index of each battle: the prompts shuffled, again each time they run out."""
    dealt: list[int] = []
    while len(dealt) < battles:
        deck = list(range(prompts))
        rng.shuffle(deck)
        dealt += deck
    return dealt[:battles]


def play(
    engines: Mapping[str, Engine],
    prompts: list[list[dict]],
    judge: Judge,
    battles: int,
    seed: int = 0,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    batch_size: int = 32,
) -> list[Battle]:
    """``battles`` battles among ``engines`` (name -> engine) on ``prompts``, decided by ``judge``
    (see the module docstring). ``max_new_tokens``: the longest answer (default: each model's
    ``gptlab.chat.default_reply_tokens``); with ``temperature`` > 0 answers are sampled, seeded."""
    check_battles(battles)
    if len(engines) < 2:
        raise UserError(f"an arena needs at least two models, got {len(engines)}")
    if not prompts:
        raise UserError("an arena needs at least one prompt")
    rng = random.Random(seed)
    sides = schedule(list(engines), battles, rng)
    asked = deal_prompts(len(prompts), battles, rng)
    answers = {}
    for name, engine in engines.items():
        mine = sorted({i for (a, b), i in zip(sides, asked) if name in (a, b)})
        limit = default_reply_tokens(engine) if max_new_tokens is None else max_new_tokens
        try:
            replies = chat_replies(engine, [prompts[i] for i in mine], limit, temperature, batch_size, seed)
        except UserError as e:
            raise UserError(f"model {name}: {e}") from None
        answers[name] = dict(zip(mine, replies))
    answers_a = [answers[a][i] for (a, _), i in zip(sides, asked)]
    answers_b = [answers[b][i] for (_, b), i in zip(sides, asked)]
    verdicts = judge.judge([prompts[i] for i in asked], answers_a, answers_b)
    return [
        Battle(prompts[i], model_a, model_b, answer_a, answer_b, winner, judge=judge.name)
        for (model_a, model_b), i, answer_a, answer_b, winner in zip(sides, asked, answers_a, answers_b, verdicts)
    ]


def run_arena(
    models: Mapping[str, str | os.PathLike],
    prompts: list[list[dict]],
    judge: Judge,
    battles: int,
    db: str | os.PathLike,
    device: str = "cpu",
    **options,
) -> tuple[list[Battle], int]:
    """`gptlab arena run`: the models' folders loaded on ``device``, ``play``ed (``options``: its
    keyword arguments), the battles added to the store ``db``. Returns the battles and the number of
    battles the store holds now. The store is opened once the models have loaded and before any
    answer is generated: a model that cannot load leaves no database behind, and a file that is not
    an arena fails before the work."""
    check_battles(battles)
    engines = {name: Engine.from_pretrained(folder, device=device) for name, folder in models.items()}
    with ArenaStore(db) as store:
        played = play(engines, prompts, judge, battles, **options)
        store.add_many(played)
        return played, len(store)


def format_summary(battles: list[Battle], db: str | os.PathLike, total: int) -> str:
    """What `arena run` prints: where the battles went, and each model's wins, ties and losses."""
    record: dict[str, Counter] = {}
    for battle in battles:
        for side, model in (("model_a", battle.model_a), ("model_b", battle.model_b)):
            outcome = "tie" if battle.winner.startswith("tie") else "win" if battle.winner == side else "loss"
            record.setdefault(model, Counter())[outcome] += 1
    judge = battles[0].judge if battles else "-"
    ranked = sorted(record, key=lambda m: (-record[m]["win"], record[m]["loss"], m))
    lines = [
        f"{len(battles)} battles among {len(record)} models, judged by {judge} -> {db} ({total} battles in all)",
        "wins/ties/losses: "
        + ", ".join(f"{m} {record[m]['win']}/{record[m]['tie']}/{record[m]['loss']}" for m in ranked),
        f"board: gptlab arena board --db {db}",
    ]
    return "\n".join(lines)
