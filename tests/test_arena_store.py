"""The arena's store: concurrent votes, schema checks, FastChat import and export."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading

import pytest

from gptlab.arena.battles import Battle
from gptlab.arena.store import SCHEMA_VERSION, ArenaStore, read_fastchat, to_fastchat, write_fastchat
from gptlab.errors import UserError
from helpers import assert_one_line, snapshot, write_jsonl

WRITERS, VOTES_EACH = 8, 250
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime — in «Unicode»."}]


def battle(n: int, winner: str = "model_a", tstamp: float | None = None) -> Battle:
    return Battle(
        prompt=PROMPT,
        model_a="alpha" if n % 2 else "beta",
        model_b="gamma",
        answer_a=f"two ({n})",
        answer_b=f"<b>nine</b> ({n})",
        winner=winner,
        judge="oracle",
        tstamp=1_700_000_000.25 + n if tstamp is None else tstamp,
        battle_id=f"battle-{n}",
    )


def vote(path: str, writer: int, start) -> None:
    """One voter process: its votes, each in its own transaction, all writers starting together."""
    with ArenaStore(path) as store:
        start.wait()
        for n in range(VOTES_EACH):
            vote = Battle(PROMPT, "alpha", "beta", "a", "b", "tie", "human", battle_id=f"{writer}-{n}")
            if not store.add(vote):
                raise SystemExit(f"vote {writer}-{n} was already stored")


def test_eight_processes_voting_at_once_lose_and_duplicate_no_vote(tmp_path):
    path = str(tmp_path / "arena.db")
    ArenaStore(path).close()  # the voters open an existing arena, as the server's workers do
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    start = context.Event()
    writers = [context.Process(target=vote, args=(path, writer, start)) for writer in range(WRITERS)]
    for process in writers:
        process.start()
    start.set()
    for process in writers:
        process.join(timeout=300)
    assert [process.exitcode for process in writers] == [0] * WRITERS
    with ArenaStore(path) as store:
        ids = [b.battle_id for b in store.battles()]
        assert len(store) == WRITERS * VOTES_EACH
    assert len(ids) == len(set(ids)) == WRITERS * VOTES_EACH
    assert set(ids) == {f"{writer}-{n}" for writer in range(WRITERS) for n in range(VOTES_EACH)}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_vote_is_stored_once_and_battles_come_back_in_time_order(tmp_path):
    late, early = battle(1, tstamp=20.0), battle(2, "tie", tstamp=10.0)
    same_time_first, same_time_second = battle(3, tstamp=15.0), battle(4, tstamp=15.0)
    with ArenaStore(tmp_path / "arena.db") as store:
        assert store.add(late) and store.add(same_time_first)
        assert not store.add(late)  # a replayed vote
        assert store.add_many([early, same_time_second, late]) == 2
        assert store.add_many([early]) == 0
    with ArenaStore(tmp_path / "arena.db", create=False) as store:  # reopened: what was committed is there
        assert store.battles() == [early, same_time_first, same_time_second, late]
        assert store.battles()[0].prompt == PROMPT


def test_threads_of_one_server_share_a_store(tmp_path):
    with ArenaStore(tmp_path / "arena.db") as store:
        threads = [
            threading.Thread(target=lambda t=t: [store.add(battle(t * 100 + n)) for n in range(50)]) for t in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(store) == 200


def test_a_database_of_another_schema_version_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    path = tmp_path / "arena.db"
    with ArenaStore(path) as store:
        store.add(battle(1))
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as error:
        ArenaStore(path)
    assert_one_line(error, str(path), f"schema version {SCHEMA_VERSION + 1}", f"reads version {SCHEMA_VERSION}")
    assert snapshot(tmp_path) == before


def test_a_file_that_is_not_an_arena_database_is_refused_in_one_line(tmp_path):
    not_sqlite = tmp_path / "votes.db"
    not_sqlite.write_text("model_a,model_b,winner\n" * 200)
    with pytest.raises(UserError) as error:
        ArenaStore(not_sqlite)
    assert_one_line(error, str(not_sqlite), "not a SQLite database")
    assert not_sqlite.read_text() == "model_a,model_b,winner\n" * 200

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    before = other.read_bytes()
    with pytest.raises(UserError) as error:
        ArenaStore(other)
    assert_one_line(error, str(other), "not a gptlab arena", "notes")
    assert other.read_bytes() == before  # not switched to WAL, no schema added

    with pytest.raises(UserError) as error:
        ArenaStore(tmp_path / "missing.db", create=False)
    assert_one_line(error, "missing.db", "no such arena database")
    assert not (tmp_path / "missing.db").exists()


# --------------------------------------------------------------------------- FastChat's battle JSON


def test_fastchat_json_round_trips_and_holds_fastchats_keys(tmp_path):
    battles = [battle(1), battle(2, "model_b"), battle(3, "tie"), battle(4, "tie (bothbad)")]
    assert write_fastchat(battles, tmp_path / "battles.json") == 4
    assert read_fastchat(tmp_path / "battles.json") == battles
    row = json.loads((tmp_path / "battles.json").read_text(encoding="utf-8"))[1]
    assert set(row) == {
        *("model_a", "model_b", "winner", "judge", "tstamp", "question_id", "anony", "turn"),
        *("conversation_a", "conversation_b", "battle_id"),
    }
    assert row["conversation_a"] == [*PROMPT, {"role": "assistant", "content": "two (2)"}]
    assert row["conversation_b"] == [*PROMPT, {"role": "assistant", "content": "<b>nine</b> (2)"}]
    assert (row["winner"], row["turn"], row["question_id"], row["anony"]) == ("model_b", 1, "battle-2", True)
    assert to_fastchat(battles[1]) == row


def test_importing_the_same_file_twice_adds_nothing(tmp_path):
    # FastChat's rows name their battle by question_id; a row with no id is named by a hash of its content.
    rows = [
        {"question_id": "q1", "model_a": "alpha", "model_b": "beta", "winner": "model_a", "tstamp": 5, "judge": "u1"},
        {"model_a": "beta", "model_b": "alpha", "winner": "tie", "tstamp": 6.5, "anony": False},
        {"model_a": "beta", "model_b": "gamma", "winner": "tie", "tstamp": 7},
    ]
    write_jsonl(tmp_path / "battles.jsonl", rows)
    with ArenaStore(tmp_path / "arena.db") as store:
        assert store.add_many(read_fastchat(tmp_path / "battles.jsonl")) == 3
        assert store.add_many(read_fastchat(tmp_path / "battles.jsonl")) == 0
        stored = store.battles()
    assert stored[0].battle_id == "q1" and stored[0].judge == "u1" and stored[0].tstamp == 5.0
    assert stored[1].judge == "human" and stored[1].prompt == [] and stored[1].answer_a == ""
    assert len({b.battle_id for b in stored}) == 3


def test_a_fastchat_conversation_becomes_the_prompt_and_the_answers(tmp_path):
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    row = {
        "model_a": "alpha",
        "model_b": "beta",
        "winner": "model_b",
        "tstamp": 1.0,
        "conversation_a": [*conversation, {"role": "assistant", "content": "5"}],
        "conversation_b": [*conversation, {"role": "assistant", "content": "4"}],
    }
    (tmp_path / "one.json").write_text(json.dumps([row]))
    (imported,) = read_fastchat(tmp_path / "one.json")
    assert (imported.prompt, imported.answer_a, imported.answer_b) == (conversation, "5", "4")


@pytest.mark.parametrize(
    ("bad_row", "words"),
    [
        ({"winner": "model_c"}, ["index 2", "unknown winner 'model_c'", "tie (bothbad)"]),
        ({"winner": None}, ["index 2", "unknown winner"]),
        ({"tstamp": None}, ["index 2", "tstamp"]),
        ({"model_b": "alpha"}, ["index 2", "two different model names"]),
        ({"conversation_a": "hi"}, ["index 2", "conversation_a"]),
    ],
)
def test_a_bad_import_row_is_named_by_its_index_and_nothing_stored_is_lost(tmp_path, bad_row, words):
    good = {"model_a": "alpha", "model_b": "beta", "winner": "model_a", "tstamp": 1.0}
    (tmp_path / "battles.json").write_text(json.dumps([good, {**good, "tstamp": 2.0}, {**good, **bad_row}]))
    with ArenaStore(tmp_path / "arena.db") as store:
        store.add(battle(1))
        with pytest.raises(UserError) as error:
            store.add_many(read_fastchat(tmp_path / "battles.json"))
        assert_one_line(error, "battles.json", *words)
        assert store.battles() == [battle(1)]


def test_a_row_missing_a_field_or_a_file_that_is_not_json_is_refused_in_one_line(tmp_path):
    write_jsonl(tmp_path / "missing.jsonl", [{"model_a": "alpha", "model_b": "beta", "winner": "tie", "tstamp": 1}] * 3)
    rows = (tmp_path / "missing.jsonl").read_text().splitlines()
    (tmp_path / "missing.jsonl").write_text("\n".join([*rows, '{"model_a": "alpha", "winner": "tie"}']))
    with pytest.raises(UserError) as error:
        read_fastchat(tmp_path / "missing.jsonl")
    assert_one_line(error, "index 3", "has no model_b, tstamp")

    (tmp_path / "broken.json").write_text('[{"model_a": "alpha",\n "winner": }]')
    with pytest.raises(UserError) as error:
        read_fastchat(tmp_path / "broken.json")
    assert_one_line(error, "broken.json", "not valid JSON", "line 2")
