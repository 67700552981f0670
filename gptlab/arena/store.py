"""Battles in one SQLite file, and FastChat's battle JSON in and out.

Votes arrive from several processes (``gptlab arena run``, the server's workers) at once, so the
store is SQLite in WAL mode (readers never block the writer), each vote one short ``BEGIN
IMMEDIATE ... COMMIT`` (the write lock is taken up front, so a writer waits on the busy timeout
instead of failing on a stale snapshot), and ``battle_id`` is unique (a replayed vote or a
re-imported file adds nothing). A store object may be shared by the threads of one server: one
connection (``check_same_thread=False``) guarded by a lock, since a SQLite connection runs one
statement at a time anyway.

The file says what it is: ``PRAGMA application_id`` marks it as a gptlab arena database and
``PRAGMA user_version`` records its schema version, so a file of another version, another
program's database or a file that is not SQLite is refused in one line before anything is
written to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptlab.arena.battles import WINNERS, Battle
from gptlab.errors import UserError, first_line
from gptlab.fileio import read_text, write_json_atomic

SCHEMA_VERSION = 1
APPLICATION_ID = int.from_bytes(b"gpta", "big")  # "gptlab arena", in the SQLite header
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another's commit: votes are short, a wait means a stuck peer

# seq keeps insertion order among battles of equal tstamp; prompt is the messages list as JSON text.
# Statements one by one: sqlite3's executescript would first COMMIT the transaction that checked the file.
_SCHEMA = (
    """CREATE TABLE battles (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        battle_id TEXT NOT NULL UNIQUE,
        tstamp REAL NOT NULL,
        model_a TEXT NOT NULL,
        model_b TEXT NOT NULL,
        winner TEXT NOT NULL,
        judge TEXT NOT NULL,
        prompt TEXT NOT NULL,
        answer_a TEXT NOT NULL,
        answer_b TEXT NOT NULL
    )""",
    "CREATE INDEX battles_in_time ON battles (tstamp, seq)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_COLUMNS = ("battle_id", "tstamp", "model_a", "model_b", "winner", "judge", "prompt", "answer_a", "answer_b")
_INSERT = f"INSERT OR IGNORE INTO battles ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


class ArenaStore:
    """The battles of one arena database. ``create=False`` refuses a missing file instead of
    making an empty one (for commands that only read, where a mistyped path should not look
    like an empty arena)."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"{self.path}: no such arena database: give the --db file the battles were written to")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(_open_problem(self.path, e)) from None
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        try:
            with self._transaction():
                self._check_or_create_schema()
            # After the check, so another program's database is left as it was; WAL then stays set in the file.
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise UserError(_open_problem(self.path, e)) from None

    def _check_or_create_schema(self) -> None:
        """Create the schema in a new (empty) database; refuse another program's or version's."""
        application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = [row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if application_id == APPLICATION_ID:
            if version != SCHEMA_VERSION:
                raise UserError(
                    f"{self.path} is an arena database of schema version {version}, this gptlab reads version "
                    f"{SCHEMA_VERSION}: open it with the gptlab that wrote it (gptlab arena export) and import the "
                    "export here"
                )
        elif tables or application_id:
            raise UserError(
                f"{self.path} is a SQLite database but not a gptlab arena one (tables: {', '.join(tables) or 'none'}): "
                "give another --db file"
            )
        else:
            for statement in _SCHEMA:
                self._db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, the write lock taken at BEGIN; rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, battle: Battle) -> bool:
        """Store one battle (a vote) in its own short transaction; False when its battle_id is already stored."""
        with self._transaction() as db:
            return db.execute(_INSERT, _row(battle)).rowcount == 1

    def add_many(self, battles: Iterable[Battle]) -> int:
        """Store battles in one transaction (all or none), skipping battle_ids already stored; how many were new."""
        rows = [_row(battle) for battle in battles]
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            return db.total_changes - before

    def battles(self) -> list[Battle]:
        """Every battle in time order (tstamp, then the order they were stored in), as ratings replay them."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM battles ORDER BY tstamp, seq").fetchall()
        return [_battle(row) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM battles").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ArenaStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_problem(path: Path, e: sqlite3.Error) -> str:
    """One line for SQLite's refusal to open ``path``."""
    code = getattr(e, "sqlite_errorname", "")
    if code == "SQLITE_NOTADB":
        return f"{path} is not a SQLite database ({first_line(e)}): give a gptlab arena database, or a new file name"
    if code.startswith("SQLITE_BUSY"):
        return f"{path} stayed locked for {BUSY_TIMEOUT_S:.0f} s: stop the process holding it, then retry"
    return f"cannot open {path} as an arena database ({first_line(e)}): give a file path in a folder you can write"


def _row(battle: Battle) -> tuple:
    prompt = json.dumps(battle.prompt, ensure_ascii=False)
    return (
        battle.battle_id,
        float(battle.tstamp),
        battle.model_a,
        battle.model_b,
        battle.winner,
        battle.judge,
        prompt,
        battle.answer_a,
        battle.answer_b,
    )


def _battle(row: tuple) -> Battle:
    fields = dict(zip(_COLUMNS, row, strict=True))
    return Battle(**{**fields, "prompt": json.loads(fields["prompt"])})


# --------------------------------------------------------------------------- FastChat's battle JSON

# What a FastChat battle row must have for gptlab to rate it; judge, anony, question_id and the
# conversations are optional (an imported row without conversations has an empty prompt and answers).
REQUIRED_FIELDS = ("model_a", "model_b", "winner", "tstamp")


def to_fastchat(battle: Battle) -> dict:
    """A battle as a row of FastChat's battle JSON (``clean_battle_data``'s keys), plus gptlab's
    ``battle_id``. Each conversation is the prompt followed by that model's answer; ``anony`` is
    true because gptlab's judges and voters never see the names before the verdict."""
    return {
        "question_id": battle.battle_id,
        "battle_id": battle.battle_id,
        "model_a": battle.model_a,
        "model_b": battle.model_b,
        "winner": battle.winner,
        "judge": battle.judge,
        "tstamp": battle.tstamp,
        "anony": True,
        "turn": sum(message.get("role") == "user" for message in battle.prompt),
        "conversation_a": [*battle.prompt, {"role": "assistant", "content": battle.answer_a}],
        "conversation_b": [*battle.prompt, {"role": "assistant", "content": battle.answer_b}],
    }


def write_fastchat(battles: Iterable[Battle], path: str | os.PathLike) -> int:
    """Write battles as FastChat's battle JSON (a list, as FastChat writes it), atomically; how many."""
    rows = [to_fastchat(battle) for battle in battles]
    write_json_atomic(path, rows)
    return len(rows)


def read_fastchat(path: str | os.PathLike) -> list[Battle]:
    """Battles from FastChat's battle JSON: a JSON list, or one battle per line (JSONL). Every row
    is checked before any is returned, so an import that fails stores nothing. A row's battle_id is
    its ``battle_id``, else its ``question_id``, else a hash of its content: importing the same file
    twice adds nothing."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): give FastChat battle JSON") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{number} is not valid JSON ({e.msg}): "
                        "give FastChat battle JSON, a list or one battle per line"
                    ) from None
    return [_from_fastchat(row, f"{path}: the battle at index {index}") for index, row in enumerate(rows)]


def _from_fastchat(row, where: str) -> Battle:
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object: each battle is an object with {', '.join(REQUIRED_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)}: each battle needs {', '.join(REQUIRED_FIELDS)}")
    if row["winner"] not in WINNERS:
        raise UserError(f"{where} has an unknown winner {row['winner']!r}: a winner is one of {', '.join(WINNERS)}")
    model_a, model_b, tstamp = row["model_a"], row["model_b"], row["tstamp"]
    if not (isinstance(model_a, str) and isinstance(model_b, str) and model_a and model_b and model_a != model_b):
        raise UserError(f"{where} has model_a {model_a!r} and model_b {model_b!r}: give two different model names")
    if isinstance(tstamp, bool) or not isinstance(tstamp, (int, float)):
        raise UserError(f"{where} has tstamp {tstamp!r}: give the battle's Unix time in seconds, a number")
    # A multi-turn battle keeps conversation_a's earlier turns as the prompt (the Battle has one prompt).
    prompt, answer_a = _prompt_and_answer(row.get("conversation_a"), f"{where}'s conversation_a")
    _, answer_b = _prompt_and_answer(row.get("conversation_b"), f"{where}'s conversation_b")
    content_id = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:32]
    return Battle(
        prompt=prompt,
        model_a=model_a,
        model_b=model_b,
        answer_a=answer_a,
        answer_b=answer_b,
        winner=row["winner"],
        judge=str(row.get("judge", "human")),  # FastChat's battles are people's votes
        tstamp=float(tstamp),
        battle_id=str(row.get("battle_id") or row.get("question_id") or content_id),
    )


def _prompt_and_answer(conversation, where: str) -> tuple[list[dict], str]:
    """(the messages before the final assistant turn, that turn's text) of a FastChat conversation."""
    if conversation is None:
        return [], ""
    if not isinstance(conversation, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in conversation
    ):
        raise UserError(f"{where} is not a list of {{role, content}} text messages: give it as FastChat writes it")
    if conversation and conversation[-1]["role"] == "assistant":
        return conversation[:-1], conversation[-1]["content"]
    return conversation, ""
