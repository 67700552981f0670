"""The arena of ``gptlab serve --arena NAME=DIR,...``: a person writes a prompt, two of the arena's
models, drawn at random and shown only as "Model A" and "Model B", answer it side by side, the
person votes, and the vote, kept with the answers as the server generated them, goes to the arena's
store; only then are the two names revealed. ``/leaderboard`` rates the store's battles.

Endpoints (under ``/arena/api/``, which needs the server's API key as ``/v1/`` does):

- ``POST /arena/api/battles`` ``{"prompt", "temperature"?, "max_tokens"?}``: server-sent events,
  first ``{"battle_id"}``, then ``{"side": "a"|"b", "text"}`` pieces and one
  ``{"side", "finish_reason"}`` per side, then ``data: [DONE]`` once both answers are complete.
- ``POST /arena/api/vote`` ``{"battle_id", "winner"}`` (``winner`` one of FastChat's
  ``model_a``, ``model_b``, ``tie``, ``tie (bothbad)``): stores the battle (judge ``human``) and
  answers ``{"battle_id", "winner", "model_a", "model_b"}``. A battle takes one vote, and only
  once both answers are complete; an unknown id is a 404, the rest 409s.
- ``GET /arena/api/leaderboard``: ``{"battles": N, "rows": gptlab.arena.ratings.leaderboard(...)}``.

Battles waiting for their vote live in this process's memory under ids no one can guess (the
newest ``MAX_PENDING``); a battle whose stream failed or was left is dropped. Errors never name a
model before the vote: the two are anonymous until then.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from gptlab.arena import ratings
from gptlab.arena.battles import WINNERS, Battle, new_battle_id
from gptlab.arena.store import ArenaStore
from gptlab.serve import generate, pages
from gptlab.serve.protocol import ApiError, ChatRequest, Number, invalid
from gptlab.serve.worker import Sequence

API = "/arena/api/"  # the arena's JSON endpoints: the API key applies here as on /v1/
ROUTES = ("/arena", "/leaderboard", API + "battles", API + "vote", API + "leaderboard")
SIDES = ("a", "b")
MAX_PENDING = 1024  # battles kept for their vote; the oldest is dropped past this (memory stays bounded)


class BattleRequest(BaseModel):
    """``POST /arena/api/battles``: the prompt both models answer, with the same sampling."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    temperature: Number | None = Field(None, ge=0)
    max_tokens: StrictInt | None = Field(None, ge=1)


class VoteRequest(BaseModel):
    """``POST /arena/api/vote``: which battle, and who won. Nothing else: the answers are the server's."""

    model_config = ConfigDict(extra="forbid")

    battle_id: StrictStr
    winner: Literal[WINNERS]


@dataclass
class PendingBattle:
    """A battle the page may vote on once ``complete``; ``models`` and ``answers`` are (A, B)."""

    battle_id: str
    prompt: list[dict]
    models: tuple[str, str]
    answers: list[str]
    complete: bool = False
    voted: bool = False

    def record(self, winner: str) -> Battle:
        return Battle(
            prompt=self.prompt,
            model_a=self.models[0],
            model_b=self.models[1],
            answer_a=self.answers[0],
            answer_b=self.answers[1],
            winner=winner,
            judge="human",
            battle_id=self.battle_id,
        )


class Arena:
    """The arena's models (served by the server's own workers), its store, and the battles waiting
    for a vote. Used on the event loop's thread only, but for the store (thread-safe)."""

    def __init__(self, models: list[str], store: ArenaStore):
        self.models, self.store = models, store
        self.pending: OrderedDict[str, PendingBattle] = OrderedDict()
        self.rng = random.SystemRandom()  # pairs and sides no one can predict from earlier rounds

    def draw(self, prompt: list[dict]) -> PendingBattle:
        """Two distinct models at random, in random order (``sample`` draws an ordered pair)."""
        model_a, model_b = self.rng.sample(self.models, 2)
        return PendingBattle(new_battle_id(), prompt, (model_a, model_b), ["", ""])

    def keep(self, battle: PendingBattle) -> None:
        self.pending[battle.battle_id] = battle
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)

    def forget(self, battle: PendingBattle) -> None:
        if self.pending.get(battle.battle_id) is battle:
            del self.pending[battle.battle_id]

    def votable(self, battle_id: str) -> PendingBattle:
        """The battle of ``battle_id`` if it may take a vote now; else the refusal, which names no model."""
        battle = self.pending.get(battle_id)
        if battle is None:
            raise ApiError(
                404, "no battle waiting for a vote has this id: start a new round", "battle_id", "battle_not_found"
            )
        if battle.voted:
            raise ApiError(409, "this battle has its vote already: one vote per battle", "battle_id", "already_voted")
        if not battle.complete:
            raise ApiError(
                409, "the answers are not complete yet: vote once both have ended", "battle_id", "answers_incomplete"
            )
        return battle


def open_arena(models: list[str], db: str | os.PathLike) -> Arena:
    """The arena over ``models`` with its store at ``db`` (created if new; a bad file is a ``UserError``)."""
    return Arena(models, ArenaStore(db))


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/arena", arena_page, methods=["GET"])
    app.add_api_route("/leaderboard", leaderboard_page, methods=["GET"])
    app.add_api_route(API + "battles", start_battle, methods=["POST"])
    app.add_api_route(API + "vote", vote, methods=["POST"])
    app.add_api_route(API + "leaderboard", leaderboard, methods=["GET"])


async def arena_page():
    return pages.page("arena.html")


async def leaderboard_page():
    return pages.page("leaderboard.html")


# --------------------------------------------------------------------------- a round


async def start_battle(body: BattleRequest, http: HttpRequest):
    server, arena = http.app.state.server, http.app.state.arena
    if not body.prompt.strip():
        raise invalid("prompt", "the prompt is empty: write something for the two models to answer")
    battle = arena.draw([{"role": "user", "content": body.prompt}])
    queue: asyncio.Queue = asyncio.Queue()  # both answers arrive on one queue, told apart by side
    sides = []
    for index, name in enumerate(battle.models):
        chat = ChatRequest(model=name, messages=battle.prompt, temperature=body.temperature, max_tokens=body.max_tokens)
        with anonymous(name):
            _, (sequence,) = generate.chat_sequences(server.model(name), chat, server.limits, queue)
        sequence.index = index  # the side: the answer's index in the battle
        sides.append(sequence)
    admitted: list[Sequence] = []
    try:
        for sequence in sides:
            with anonymous(sequence.worker.name):
                generate.admit(sequence.worker, [sequence])
            admitted.append(sequence)
    except ApiError:
        generate.cancel(admitted)  # half a battle is none: the first model's answer is not generated alone
        raise
    arena.keep(battle)
    return generate.event_stream(sides, battle_chunks(arena, battle, sides))


@contextmanager
def anonymous(name: str):
    """Re-raise an ``ApiError`` about the model ``name`` without its name ("model quokka is busy" ->
    "a model is busy"): before the vote, nothing may tell which models are fighting."""
    try:
        yield
    except ApiError as error:
        message = error.message.replace(f"model {name}'s", "a model's").replace(f"model {name}", "a model")
        raise ApiError(error.status, message, error.param, error.code) from None


async def battle_chunks(arena: Arena, battle: PendingBattle, sides: list[Sequence]):
    """The battle's events; the battle becomes votable when both answers have ended, and is dropped
    if its stream fails or is left first."""
    try:
        yield {"battle_id": battle.battle_id}
        async for sequence, output in generate.outputs(sides):
            side = SIDES[sequence.index]
            if output.text:
                battle.answers[sequence.index] += output.text
                yield {"side": side, "text": output.text}
            if output.finish_reason is not None:
                yield {"side": side, "finish_reason": output.finish_reason}
        battle.complete = True
    finally:
        if not battle.complete:
            arena.forget(battle)


async def vote(body: VoteRequest, http: HttpRequest):
    arena: Arena = http.app.state.arena
    battle = arena.votable(body.battle_id)
    battle.voted = True  # before the store's write: a replay arriving meanwhile is refused
    try:
        added = await run_in_threadpool(arena.store.add, battle.record(body.winner))
    except BaseException:
        battle.voted = False  # nothing was stored: the vote may be cast again
        raise
    if not added:  # the store holds this battle already (another server writing to the same file)
        raise ApiError(409, "this battle has its vote already: one vote per battle", "battle_id", "already_voted")
    model_a, model_b = battle.models
    return {"battle_id": battle.battle_id, "winner": body.winner, "model_a": model_a, "model_b": model_b}


async def leaderboard(http: HttpRequest):
    arena: Arena = http.app.state.arena
    battles = await run_in_threadpool(arena.store.battles)
    rows = await run_in_threadpool(ratings.leaderboard, battles) if battles else []
    return {"battles": len(battles), "rows": rows}
