"""The arena of gptlab serve over HTTP: a battle streams two anonymous answers, the vote stores the
server's answers (never the client's) and only then names the models, one vote per complete battle
(a forged id, a replay or an early vote is refused), random distinct pairs, the leaderboard's JSON,
the API key, and the command line's --arena and --arena-db."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gptlab.arena import ratings
from gptlab.arena.store import ArenaStore
from gptlab.serve import create_app
from helpers import ROOT, assert_user_error, gptlab_in_process
from serving import paused, running_server, serving, twin_models

NAMES = ["quokka", "narwhal", "axolotl"]  # names no answer of the tiny models' vocabulary can hold
COLUMNS = {"model", "bt", "elo", "ci_low", "ci_high", "rank_ub", "battles", "wins", "ties"}
WAIT_S = 60  # for the server's state to settle; a hang fails instead of stalling
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return twin_models(tiny_model, tmp_path_factory.mktemp("arena_models"), NAMES)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arena_db") / "arena.db"


@pytest.fixture(scope="module")
def app(models: dict[str, Path], db: Path):
    return create_app({}, arena=models, arena_db=db)


@dataclass
class Reply:
    status_code: int
    text: str
    headers: dict

    def json(self):
        return json.loads(self.text)


class Client:
    """Raw HTTP to a test server, with the key if given: a ``Reply`` per request, or a stream's lines."""

    def __init__(self, url: str, key: str | None = None):
        self.url = url
        self.headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})

    def request(self, method: str, path: str, body=None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return Reply(response.status, response.read().decode(), dict(response.headers))
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode(), dict(e.headers))

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> Reply:
        return self.request("POST", path, body)

    @contextmanager
    def stream(self, path: str, body: dict) -> Iterator[Iterator[str]]:
        """A POST whose response is read line by line; leaving the block closes the connection."""
        address = urlsplit(self.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        try:
            connection.request("POST", path, json.dumps(body), self.headers)
            response = connection.getresponse()
            assert response.status == 200
            yield (line.decode().rstrip("\n") for line in response)
        finally:
            connection.close()


@pytest.fixture(scope="module")
def client(app) -> Iterator[Client]:
    with serving(app) as url:
        yield Client(url)


def stored(db: Path) -> list:
    with ArenaStore(db) as store:
        return store.battles()


def events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The JSON of each ``data:`` line of a server-sent event stream, then ``"[DONE]"``."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def battle(client: Client, prompt: str = "alpha beta?", **settings) -> tuple[str, list[str], str]:
    """One whole battle: its id, the two answers as streamed (A, B), and the raw stream."""
    response = client.post("/arena/api/battles", {"prompt": prompt, **(settings or GREEDY)})
    assert response.status_code == 200, response.text
    answers, ended, battle_id = ["", ""], set(), None
    parsed = list(events(response.text.splitlines()))
    assert parsed[-1] == "[DONE]" and "battle_id" in parsed[0]
    battle_id = parsed[0]["battle_id"]
    for event in parsed[1:-1]:
        side = "ab".index(event["side"])
        answers[side] += event.get("text", "")
        if "finish_reason" in event:
            ended.add(side)
    assert ended == {0, 1}
    return battle_id, answers, response.text


def vote(client: Client, battle_id: str, winner: str = "model_a", **extra) -> Reply:
    return client.post("/arena/api/vote", {"battle_id": battle_id, "winner": winner, **extra})


def greedy_answer(client: Client, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **GREEDY}
    return client.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --------------------------------------------------------------------------- a round


def test_a_battle_is_anonymous_until_the_vote_which_stores_the_servers_answers(client, db):
    before = len(stored(db))
    battle_id, answers, stream = battle(client, "gamma delta?")
    assert not any(name in stream for name in NAMES)  # nothing streamed names a model

    forged = vote(client, battle_id, "model_b", answer_a="forged", answer_b="forged")
    assert forged.status_code == 400 and forged.json()["error"]["param"] in ("answer_a", "answer_b")
    assert len(stored(db)) == before  # the refused vote stored nothing

    reply = vote(client, battle_id, "model_b")
    assert reply.status_code == 200, reply.text
    revealed = reply.json()
    assert revealed["battle_id"] == battle_id and revealed["winner"] == "model_b"
    assert revealed["model_a"] != revealed["model_b"] and {revealed["model_a"], revealed["model_b"]} <= set(NAMES)
    (record,) = [b for b in stored(db) if b.battle_id == battle_id]
    assert (record.model_a, record.model_b) == (revealed["model_a"], revealed["model_b"])
    assert [record.answer_a, record.answer_b] == answers
    assert record.prompt == [{"role": "user", "content": "gamma delta?"}]
    assert (record.winner, record.judge) == ("model_b", "human")
    # Each side's answer is its model's: the same greedy reply the model gives on /v1.
    assert answers == [greedy_answer(client, revealed[side], "gamma delta?") for side in ("model_a", "model_b")]
    assert answers[0] != answers[1]  # the twins answer differently: the check above tells the sides apart


def test_a_forged_id_and_a_bad_verdict_are_refused(client, db):
    before = len(stored(db))
    unknown = vote(client, "0" * 32)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "battle_not_found"
    battle_id, _, _ = battle(client)
    bad = vote(client, battle_id, "model_c")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "winner"
    assert len(stored(db)) == before


def test_a_replayed_vote_is_refused_and_the_first_stands(client, db):
    battle_id, _, _ = battle(client)
    assert vote(client, battle_id, "tie").status_code == 200
    replay = vote(client, battle_id, "model_a")
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "already_voted"
    assert [b.winner for b in stored(db) if b.battle_id == battle_id] == ["tie"]


def test_a_vote_before_both_answers_end_is_refused(app, client, db):
    body = {"prompt": "alpha", **GREEDY}
    with paused(app) as resume, client.stream("/arena/api/battles", body) as lines:
        battle_id = next(events(lines))["battle_id"]
        early = vote(client, battle_id)
        assert early.status_code == 409 and early.json()["error"]["code"] == "answers_incomplete"
        assert battle_id not in {b.battle_id for b in stored(db)}
        resume()
        assert list(events(lines))[-1] == "[DONE]"
    assert vote(client, battle_id).status_code == 200


def test_a_client_that_leaves_mid_battle_frees_the_slots_and_cannot_vote(app, client, db):
    with paused(app), client.stream("/arena/api/battles", {"prompt": "alpha", **GREEDY}) as lines:
        battle_id = next(events(lines))["battle_id"]
    workers = [model.worker for model in app.state.server.served.values()]
    wait_for(lambda: all(worker.active == 0 for worker in workers), "the left battle's slots to free")
    assert vote(client, battle_id).status_code in (404, 409)
    assert battle_id not in {b.battle_id for b in stored(db)}


def test_pairs_are_two_distinct_models_on_random_sides(client):
    pairs = []
    for _ in range(40):
        battle_id, _, _ = battle(client, "alpha", temperature=0, max_tokens=1)
        revealed = vote(client, battle_id, "tie (bothbad)").json()
        pairs.append((revealed["model_a"], revealed["model_b"]))
    assert all(a != b for a, b in pairs)
    # Each model on each side: a fixed order would leave some never A (or never B); chance misses 1 in 10^6.
    assert {a for a, _ in pairs} == {b for _, b in pairs} == set(NAMES)


def test_refusals_name_no_model_and_keep_no_battle(app, client):
    pending = len(app.state.arena.pending)
    for body, param in (
        ({"prompt": "alpha", "max_tokens": 100_000}, "max_tokens"),  # over the window: the error names the model
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "alpha", "temperature": -1}, "temperature"),
        ({"prompt": "alpha", "model": "quokka"}, "model"),
    ):
        response = client.post("/arena/api/battles", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert not any(name in response.text for name in NAMES), response.text
    assert len(app.state.arena.pending) == pending


def test_the_leaderboard_rates_the_stored_battles(client, db):
    battle_id, _, _ = battle(client)
    vote(client, battle_id, "model_a")
    board = client.get("/arena/api/leaderboard").json()
    battles = stored(db)
    assert board["battles"] == len(battles)
    assert all(set(row) == COLUMNS for row in board["rows"])
    expected = ratings.leaderboard(battles)
    assert [row["model"] for row in board["rows"]] == [row["model"] for row in expected]
    assert [row["bt"] for row in board["rows"]] == pytest.approx([row["bt"] for row in expected])
    assert [row["battles"] for row in board["rows"]] == [row["battles"] for row in expected]


# --------------------------------------------------------------------------- the key, the pages, the command


def test_the_key_guards_the_arenas_endpoints_not_its_pages(models, tmp_path):
    two = dict(list(models.items())[:2])
    with running_server({}, arena=two, arena_db=tmp_path / "keyed.db", api_key="sesame") as url:
        anonymous, keyed = Client(url), Client(url, key="sesame")
        assert anonymous.post("/arena/api/battles", {"prompt": "a"}).status_code == 401
        assert vote(anonymous, "0" * 32).status_code == 401
        assert anonymous.get("/arena/api/leaderboard").status_code == 401
        for page in ("/arena", "/leaderboard"):
            response = anonymous.get(page)
            assert response.status_code == 200 and "<script>" in response.text
            assert "script-src 'self'" in response.headers["content-security-policy"]
        assert keyed.get("/arena/api/leaderboard").json() == {"battles": 0, "rows": []}
        assert keyed.get("/v1/models").json()["data"][0]["id"] == next(iter(two))  # served on /v1 too


def test_a_server_without_an_arena_has_no_arena_pages(tiny_model):
    with running_server({"tiny": tiny_model}) as url:
        assert Client(url).get("/arena").status_code == 404
        assert Client(url).post("/arena/api/vote", {}).status_code == 404


def test_a_model_in_both_lists_is_loaded_once(models, tmp_path):
    (first, folder), (second, _) = list(models.items())[:2]
    app = create_app({first: folder}, arena=dict(list(models.items())[:2]), arena_db=tmp_path / "a.db")
    app.state.arena.store.close()
    assert list(app.state.server.served) == [first, second]


def test_serve_command_refuses_a_bad_arena_in_one_line(models, tmp_path, capfd):
    (a, folder_a), (b, folder_b) = list(models.items())[:2]
    one = gptlab_in_process(capfd, "serve", "--arena", f"{a}={folder_a}")
    assert_user_error(one, "--arena needs at least two models", a)
    assert_user_error(gptlab_in_process(capfd, "serve"), "no model to serve", "--arena")
    twice = gptlab_in_process(capfd, "serve", "--arena", f"{a}={folder_a}", f"{a}={folder_b}")  # space-separated
    assert_user_error(twice, "--arena", f"{a!r} is given twice")
    missing = tmp_path / "nothing"
    assert_user_error(gptlab_in_process(capfd, "serve", "--arena", f"{a}={missing},{b}={folder_b}"), "not a folder")
    clash = ("--model", f"{a}={folder_b}", "--arena", f"{a}={folder_a},{b}={folder_b}")
    assert_user_error(gptlab_in_process(capfd, "serve", *clash), f"{a!r} is given to two folders")
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database, but a file someone cares about\n" * 100)
    bad_db = ("--arena", f"{a}={folder_a},{b}={folder_b}", "--arena-db", not_a_db)
    assert_user_error(gptlab_in_process(capfd, "serve", *bad_db), str(not_a_db))
    assert not_a_db.read_text().startswith("not a database")  # left as it was


def test_serve_command_with_only_an_arena_serves_it(models, tmp_path):
    specs = ",".join(f"{name}={folder}" for name, folder in models.items())
    db = tmp_path / "votes.db"
    command = [sys.executable, "-m", "gptlab", "serve", "--arena", specs, "--arena-db", str(db), "--port", "0"]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        first, second = server.stderr.readline(), server.stderr.readline()
        assert first.startswith("gptlab serve: listening on http://127.0.0.1:") and ", ".join(NAMES) in first
        assert "/arena" in second and "/leaderboard" in second and str(db) in second
        client = Client(first.split("listening on ")[1].split()[0])
        assert client.get("/arena").status_code == 200
        battle_id, _, _ = battle(client)
        assert vote(client, battle_id).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    assert [b.battle_id for b in stored(db)] == [battle_id]
