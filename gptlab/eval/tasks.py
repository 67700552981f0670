"""Tasks: where the documents come from, how a prompt is built, how an answer is read.

A ``Task`` is data plus a few small functions, in lm-eval's terms: ``doc_to_text`` (the
question), ``shot_target`` (what follows ``target_delimiter`` in a few-shot example), choices
and a gold index (multiple choice) or a reference answer with extraction regexes
(generation). The prompt is

    description + (text + target_delimiter + target + fewshot_delimiter) * k + text

Built-in tasks: ``mmlu`` over a folder in the original layout, ``world_mmlu``, ``arith_*`` and
``words_*`` over a TinyWorld folder, ``gsm8k`` over JSONL, ``ppl`` over a text file, and any
``.toml`` task file (see docs/eval.md).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import math
import random
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.data.documents import jsonl_records, read_jsonl
from gptlab.errors import UserError
from gptlab.eval import metrics
from gptlab.fileio import read_text, text_lines
from gptlab.world.words import WORD_TASK_NAMES

MC, GEN, PPL = "multiple_choice", "generate_until", "perplexity"
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
LETTERS = ("A", "B", "C", "D")
ARITH_OPS = ("add", "sub", "mul")
COT_PREFIX = "Let's think step by step."
# The arithmetic corpus writes a direct answer as "N." right after "A:".
ARITH_DIRECT = r"^\s*(-?\d+)\."
ARITH_COT = r"The answer is (-?\d+)"
# The fields each JSONL task reads from every record.
ARITH_FIELDS = ("question", "rationale", "answer")
WORDS_FIELDS = ("input", "output")
GSM8K_FIELDS = ("question", "answer")


@dataclass
class Doc:
    doc_id: int  # 0-based row in its test file
    data: dict[str, Any]
    subject: str | None = None


@dataclass
class Task:
    name: str
    kind: str  # MC, GEN or PPL
    docs: list[Doc]
    doc_to_text: Callable[[dict], str] = lambda d: d["text"]
    shot_target: Callable[[dict], str] = lambda d: ""
    description: Callable[[Doc], str] = lambda doc: ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    # Few-shot pools by subject (None: one pool) and where each came from, for error messages.
    fewshot: dict[str | None, list[Doc]] = field(default_factory=dict)
    fewshot_source: dict[str | None, str] = field(default_factory=dict)
    sampler: str = "random"  # or "first_n"
    # multiple choice
    choices: Callable[[dict], list[str]] = lambda d: []
    gold: Callable[[dict], int] = lambda d: 0
    # generation
    reference: Callable[[dict], str] = lambda d: ""
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    strict_regex: str | None = None  # None: the whole output, stripped
    flexible_regex: str | None = None  # last match; None: no flexible metric
    regexes_to_ignore: tuple[str, ...] = ()
    ignore_case: bool = False
    partial_credit: bool = False
    per_subject: bool = False  # report each subject too (MMLU)
    exclude_self: bool = False  # shots drawn from the test set itself never include the document
    score: Callable[[dict, str], float] | None = None  # replaces exact match (e.g. the TinyWorld oracle)
    # The conversation a chat model is asked (--chat): the question's messages without the answer.
    chat_messages: Callable[[dict], list[dict]] | None = None
    has_cot: bool = False  # --cot gives it worked exemplars and reads "The answer is N" (arith tasks)

    def shots(self, doc: Doc, k: int, seed: int) -> list[Doc]:
        """The k few-shot examples of one document: the pool's first k, or a seeded random
        pick that depends only on (seed, task, doc_id), so --limit and batch order change
        nothing, and k shots are the first k of k+1 (nested, which steadies shot curves)."""
        if k == 0:
            return []
        pool = self.fewshot.get(doc.subject, [])
        if self.exclude_self:
            pool = [d for d in pool if d.doc_id != doc.doc_id]
        if self.sampler == "first_n":
            return pool[:k]
        rng = random.Random(f"{seed}:{self.name}:{doc.doc_id}")
        return rng.sample(pool, len(pool))[:k]

    def context(self, doc: Doc, shots: list[Doc]) -> str:
        examples = "".join(
            self.doc_to_text(s.data) + self.target_delimiter + self.shot_target(s.data) + self.fewshot_delimiter
            for s in shots
        )
        return self.description(doc) + examples + self.doc_to_text(doc.data)

    def check_shots(self, k: int) -> None:
        """Refuse k larger than a few-shot pool, or a task without one, before any model work."""
        if k == 0:
            return
        if not self.fewshot:
            where = self.fewshot_source.get(None)
            hint = f"{where} is missing or empty" if where else "its task file names no fewshot data"
            raise UserError(f"task {self.name} has no few-shot examples ({hint}): use --shots 0")
        for subject, pool in self.fewshot.items():
            available = len(pool) - self.exclude_self  # a document is never its own example
            if available < k:
                raise UserError(
                    f"task {self.name}: {k} shots asked but {self.fewshot_source[subject]} holds only "
                    f"{available} example(s){f' for {subject}' if subject else ''}; ask for at most {available} shots"
                )


# --------------------------------------------------------------------------- reading files


def read_csv_rows(path: Path, columns: int | None = None) -> list[tuple[int, list[str]]]:
    """(first line number, fields) per record; with ``columns``, a record with another count is
    refused naming the file and line (quoted fields may span lines, so records != lines)."""
    rows = []
    with contextlib.closing(text_lines(path)) as lines:  # UTF-8 checked line by line, as the corpus readers do
        reader = csv.reader(line for _, line in lines)
        line = 1
        try:
            for record in reader:
                if record and columns is not None and len(record) != columns:
                    raise UserError(
                        f"{path}, line {line}: expected {columns} columns, found {len(record)}; "
                        "quote fields that contain commas"
                    )
                if record:
                    rows.append((line, record))
                line = reader.line_num + 1
        except csv.Error as e:
            raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def read_table(path: Path) -> list[dict]:
    """Rows of a JSONL file, or of a CSV file with a header row."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".csv":
        rows = read_csv_rows(path)
        if not rows:
            return []
        header = rows[0][1]
        for line, record in rows[1:]:
            if len(record) != len(header):
                raise UserError(
                    f"{path}, line {line}: expected {len(header)} columns as in the header, found {len(record)}"
                )
        return [dict(zip(header, record)) for _, record in rows[1:]]
    raise UserError(f"{path}: task data must be .jsonl or .csv")


def read_records(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The records of a task's JSONL file; one without a string in each of ``fields`` is refused
    naming the file and line (not a KeyError when its prompt is built)."""
    rows = []
    for number, record in jsonl_records(path):
        missing = [name for name in fields if not isinstance(record.get(name), str)]
        if missing:
            raise UserError(
                f"{path}:{number} has no string {', '.join(map(repr, missing))}: every record of this task needs "
                f"{', '.join(fields)}"
            )
        rows.append(record)
    return rows


def _docs(rows: list[dict], limit: int | None, subject: str | None = None) -> list[Doc]:
    return [Doc(i, row, subject) for i, row in enumerate(rows[:limit] if limit is not None else rows)]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} does not exist: {what}")
    return path


def _longest_target(pool: list[Doc], shot_target: Callable[[dict], str], default: int) -> int:
    """A generation budget from the few-shot targets: a byte-level token covers at least one
    character, so the longest target in characters (plus 20%) bounds its length in tokens."""
    if not pool:
        return default
    longest = max(len(shot_target(d.data)) for d in pool) + 1  # + the target delimiter
    return math.ceil(1.2 * longest) + 2


# --------------------------------------------------------------------------- MMLU


def mmlu_question(doc: dict) -> str:
    """The standard MMLU question (lm-eval's ``doc_to_text``)."""
    return f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\nAnswer:"


def subject_description(doc: Doc) -> str:
    return f"The following are multiple choice questions (with answers) about {doc.subject}.\n\n"


def read_mmlu_csv(path: Path) -> list[dict]:
    rows = []
    for line, record in read_csv_rows(path, columns=len(MMLU_COLUMNS)):
        row = dict(zip(MMLU_COLUMNS, record))
        if row["answer"].strip() not in LETTERS:
            raise UserError(f"{path}, line {line}: answer {row['answer']!r} is not one of A, B, C, D")
        row["answer"] = row["answer"].strip()
        rows.append(row)
    return rows


def mmlu_task(name: str, root: Path, limit: int | None, need_dev: bool) -> Task:
    """MMLU in its original layout: ``root/{dev,test}/{subject}_{split}.csv``, headerless rows
    ``question,A,B,C,D,answer``; the subject is the file stem with underscores as spaces."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise UserError(
            f"{root} has no test/ folder: {name} needs the MMLU layout dev/ and test/ with {{subject}}_test.csv"
        )
    files = sorted(test_dir.glob("*_test.csv"))
    if not files:
        raise UserError(f"{test_dir} holds no *_test.csv files: {name} needs {{subject}}_test.csv files")
    docs: list[Doc] = []
    fewshot: dict[str | None, list[Doc]] = {}
    sources: dict[str | None, str] = {}
    for path in files:
        stem = path.name[: -len("_test.csv")]
        subject = stem.replace("_", " ")
        questions = read_mmlu_csv(path)
        if not questions:
            raise UserError(f"{path} holds no questions: fill it with rows question,A,B,C,D,answer or remove it")
        docs += _docs(questions, limit, subject)
        if need_dev:
            dev = root / "dev" / f"{stem}_dev.csv"
            if not dev.is_file():
                raise UserError(
                    f"{dev} does not exist: few-shot {name} takes its examples from the dev split; "
                    "add the dev/ files or use --shots 0"
                )
            fewshot[subject] = _docs(read_mmlu_csv(dev), None, subject)
            sources[subject] = str(dev)
    return Task(
        name=name,
        kind=MC,
        docs=docs,
        doc_to_text=mmlu_question,
        description=subject_description,
        shot_target=lambda d: d["answer"],
        choices=lambda d: list(LETTERS),
        gold=lambda d: LETTERS.index(d["answer"]),
        fewshot=fewshot,
        fewshot_source=sources,
        sampler="first_n",
        per_subject=True,
    )


# --------------------------------------------------------------------------- TinyWorld and GSM8K


def final_number(answer: str) -> str:
    """N of a GSM8K-style answer "...\\n#### N" (or the answer itself when it is bare)."""
    found = metrics.extract(answer, metrics.GSM8K_STRICT)
    return answer.strip() if found == metrics.INVALID else found


def _cot_steps(rationale: str) -> str:
    return rationale[len(COT_PREFIX) :].lstrip() if rationale.startswith(COT_PREFIX) else rationale


def _test_stems(folder: Path) -> list[str]:
    """The tasks a TinyWorld bench folder holds: the stems of its ``*_test.jsonl`` files."""
    return sorted(p.name[: -len("_test.jsonl")] for p in folder.glob("*_test.jsonl"))


def _fewshot_pool(test: Path, stem: str, fields: tuple[str, ...]) -> tuple[Path, list[Doc]]:
    """A bench task's few-shot file and its examples (none when the world has no such file)."""
    shots_file = test.parent / f"{stem}_fewshot.jsonl"
    return shots_file, _docs(read_records(shots_file, fields), None) if shots_file.is_file() else []


def _bench_file(world: Path, family: str, name: str, stem: str) -> Path:
    """The test file of a TinyWorld task; a name the world does not hold gets suggestions."""
    folder = world / "bench" / family
    if not folder.is_dir():
        raise UserError(f"{world} is not a TinyWorld folder (no bench/{family}): task {name} needs one as --data")
    path = folder / f"{stem}_test.jsonl"
    if not path.is_file():
        held = [f"{family}_{held_stem}" for held_stem in _test_stems(folder)]
        near = difflib.get_close_matches(name, held, n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"it holds {', '.join(held)}"
        raise UserError(f"unknown task {name!r}: {world} has no {path.name}; {hint}")
    return path


def arith_task(name: str, world: Path, op_digits: str, cot: bool, limit: int | None) -> Task:
    """The corpus formats are the prompts: ``Q: 12+35=? A: 47.`` directly, or with CoT
    ``Q: ... A: Let's think step by step. <steps> The answer is 47.``; one example per line."""
    test = _bench_file(world, "arith", name, op_digits)
    shots_file, pool = _fewshot_pool(test, op_digits, ARITH_FIELDS)
    if cot:
        text = lambda d: f"Q: {d['question']} A: {COT_PREFIX}"
        target = lambda d: _cot_steps(d["rationale"])
        strict = ARITH_COT
    else:
        text = lambda d: f"Q: {d['question']} A:"
        target = lambda d: f"{final_number(d['answer'])}."
        strict = ARITH_DIRECT
    return Task(
        name=name,
        kind=GEN,
        docs=_docs(read_records(test, ARITH_FIELDS), limit),
        doc_to_text=text,
        shot_target=target,
        has_cot=True,
        fewshot_delimiter="\n",
        fewshot={None: pool} if pool else {},
        fewshot_source={None: str(shots_file)},
        reference=lambda d: final_number(d["answer"]),
        until=("\n",),
        max_new_tokens=_longest_target(pool, target, 192 if cot else 12),
        strict_regex=strict,
        flexible_regex=metrics.LAST_NUMBER,
        partial_credit=True,
    )


def words_task(name: str, world: Path, word_task: str, limit: int | None) -> Task:
    """k lines ``input -> output`` joined by newlines, then ``input ->``; the answer is the line."""
    test = _bench_file(world, "words", name, word_task)
    shots_file, pool = _fewshot_pool(test, word_task, WORDS_FIELDS)
    target = lambda d: d["output"]
    return Task(
        name=name,
        kind=GEN,
        docs=_docs(read_records(test, WORDS_FIELDS), limit),
        doc_to_text=lambda d: f"{d['input']} ->",
        shot_target=target,
        fewshot_delimiter="\n",
        fewshot={None: pool} if pool else {},
        fewshot_source={None: str(shots_file)},
        reference=target,
        until=("\n",),
        max_new_tokens=_longest_target(pool, target, 24),
        partial_credit=True,
    )


def instruct_task(name: str, world: Path, limit: int | None) -> Task:
    """TinyWorld's held-out instruction test set (``sft/test.jsonl``), one subject per family,
    scored by the oracle. Plain prompt ``Q: {question} A:`` with shots of the same family from
    the test set (never the question itself) for a base model; with ``--chat`` the question's
    messages go through the model's chat template, as a user would ask an instruction-tuned model.
    ``--limit`` keeps the first n questions of each family."""
    from gptlab.world import Oracle

    path = _require_file(world / "sft" / "test.jsonl", "world_instruct reads a TinyWorld folder's sft/test.jsonl")
    oracle = Oracle(world)
    everything = [Doc(i, row, row["family"]) for i, row in enumerate(_instruct_records(path))]
    pools: dict[str | None, list[Doc]] = {}
    for doc in everything:
        pools.setdefault(doc.subject, []).append(doc)
    # Shots come from the whole family whatever --limit keeps, so a limit changes no prompt.
    docs = [doc for pool in pools.values() for doc in (pool if limit is None else pool[:limit])]
    docs.sort(key=lambda doc: doc.doc_id)
    question = lambda d: [m for m in d["messages"] if m["role"] != "assistant"]
    answer = lambda d: d["messages"][-1]["content"]
    return Task(
        name=name,
        kind=GEN,
        docs=docs,
        doc_to_text=lambda d: f"Q: {question(d)[-1]['content']} A:",
        shot_target=answer,
        fewshot_delimiter="\n",
        fewshot=pools,
        fewshot_source={f: str(path) for f in pools},
        reference=answer,
        until=("\n",),
        max_new_tokens=_longest_target(everything, answer, 64),
        per_subject=True,
        exclude_self=True,
        score=lambda d, output: float(bool(oracle.correct(question(d), output.strip()))),
        chat_messages=question,
    )


def _instruct_records(path: Path) -> list[dict]:
    """sft/test.jsonl's records: a family and messages that end with the assistant's answer."""
    rows = []
    for number, row in jsonl_records(path):
        messages = row.get("messages")
        well_formed = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        answered = well_formed and len(messages) >= 2 and messages[-1]["role"] == "assistant"
        if not (isinstance(row.get("family"), str) and answered):
            raise UserError(
                f"{path}:{number} is not an instruction record: it needs a 'family' and 'messages' ending in the "
                "assistant's answer, as `gptlab world` writes them"
            )
        rows.append(row)
    return rows


def gsm8k_task(name: str, data: Path, limit: int | None) -> Task:
    """GSM8K as lm-eval's ``gsm8k``: ``Question: ...\\nAnswer:``, the full worked answer as the
    shot target, strict ``#### N`` and flexible last-number extraction. ``data`` is the test
    JSONL, or a folder with test.jsonl; shots come from train.jsonl beside it."""
    test = data / "test.jsonl" if data.is_dir() else data
    _require_file(
        test, f"{name} needs a GSM8K-format JSONL file (question, answer with '#### N') or a folder with test.jsonl"
    )
    train = test.parent / "train.jsonl"
    pool = _docs(read_records(train, GSM8K_FIELDS), None) if train.is_file() and train != test else []
    return Task(
        name=name,
        kind=GEN,
        docs=_docs(read_records(test, GSM8K_FIELDS), limit),
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        shot_target=lambda d: d["answer"],
        fewshot={None: pool} if pool else {},
        fewshot_source={None: str(train)},
        reference=lambda d: d["answer"],
        until=("Question:", "</s>", "<|im_end|>"),
        max_new_tokens=256,
        strict_regex=metrics.GSM8K_STRICT,
        flexible_regex=metrics.GSM8K_FLEXIBLE,
        regexes_to_ignore=metrics.GSM8K_IGNORE,
        ignore_case=True,
    )


def ppl_task(name: str, data: Path, limit: int | None) -> Task:
    """Perplexity and bits per byte over the documents of text files (blank-line separated
    .txt, .jsonl with "text", .parquet), as lm-eval's wikitext task scores them."""
    from gptlab.data import iter_documents

    if not data.exists():
        raise UserError(f"{data} does not exist: {name} needs a text file or folder as --data")
    rows = [{"text": text} for text in iter_documents(data)]
    if not rows:
        raise UserError(f"{data} holds no documents to score")
    return Task(name=name, kind=PPL, docs=_docs(rows, limit))


# --------------------------------------------------------------------------- TOML task files

TOML_KEYS = {
    "name",
    "type",
    "test",
    "fewshot",
    "fewshot_sampler",
    "description",
    "doc_to_text",
    "doc_to_target",
    "choices",
    "choices_field",
    "target_delimiter",
    "fewshot_delimiter",
    "until",
    "max_new_tokens",
    "answer_regex",
    "flexible_regex",
    "regexes_to_ignore",
    "ignore_case",
    "partial_credit",
}


def _template(source: str, key: str, template: str) -> Callable[[dict], str]:
    def render(doc: dict) -> str:
        try:
            return template.format_map(doc)
        except KeyError as e:
            raise UserError(f"{source}: {key} names the field {e.args[0]!r}, which a document lacks") from None
        except (ValueError, IndexError) as e:
            raise UserError(
                f"{source}: {key} is not a valid template ({e}); write literal braces as {{{{ }}}}"
            ) from None

    return render


def toml_task(path: Path, limit: int | None) -> Task:
    """A multiple-choice or generation task described by a TOML file (keys: docs/eval.md)."""
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    try:
        spec = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    for key in spec:
        if key not in TOML_KEYS:
            near = difflib.get_close_matches(key, sorted(TOML_KEYS), n=1)
            raise UserError(f"{path}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    kind = spec.get("type", MC)
    if kind not in (MC, GEN):
        raise UserError(f"{path}: type must be {MC!r} or {GEN!r}, got {kind!r}")
    for key in ("test", "doc_to_text", "doc_to_target"):
        if key not in spec:
            raise UserError(f"{path}: the key {key!r} is required")
    name = spec.get("name", path.stem)
    test = path.parent / spec["test"]
    text = _template(str(path), "doc_to_text", spec["doc_to_text"])
    target = _template(str(path), "doc_to_target", spec["doc_to_target"])
    pool: list[Doc] = []
    if "fewshot" in spec:
        pool = _docs(read_table(path.parent / spec["fewshot"]), None)
    preamble = spec.get("description", "")
    task = Task(
        name=name,
        kind=kind,
        docs=_docs(read_table(test), limit),
        doc_to_text=text,
        shot_target=target,
        description=lambda doc: preamble,
        target_delimiter=spec.get("target_delimiter", " "),
        fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"),
        fewshot={None: pool} if pool else {},
        fewshot_source={None: str(path.parent / spec["fewshot"])} if "fewshot" in spec else {},
        sampler=spec.get("fewshot_sampler", "random"),
        # Shots from the test file itself (lm-eval's fallback) must never be the question.
        exclude_self="fewshot" in spec and (path.parent / spec["fewshot"]).resolve() == test.resolve(),
    )
    if task.sampler not in ("random", "first_n"):
        raise UserError(f"{path}: fewshot_sampler must be 'random' or 'first_n', got {task.sampler!r}")
    if kind == MC:
        task.choices = _toml_choices(path, spec)
        task.gold = _toml_gold(path, task.choices, target)
        task.shot_target = lambda d: task.choices(d)[task.gold(d)]
    else:
        task.reference = target
        task.until = tuple(spec.get("until", ["\n"]))
        task.max_new_tokens = int(spec.get("max_new_tokens", 32))
        task.strict_regex = spec.get("answer_regex")
        task.flexible_regex = spec.get("flexible_regex")
        task.regexes_to_ignore = tuple(spec.get("regexes_to_ignore", ()))
        task.ignore_case = bool(spec.get("ignore_case", False))
        task.partial_credit = bool(spec.get("partial_credit", False))
    return task


def _toml_choices(path: Path, spec: dict) -> Callable[[dict], list[str]]:
    if "choices_field" in spec:
        key = spec["choices_field"]

        def from_field(doc: dict) -> list[str]:
            value = doc.get(key)
            if not isinstance(value, list) or not value:
                raise UserError(f"{path}: choices_field {key!r} must name a non-empty list in every document")
            return [str(v) for v in value]

        return from_field
    if "choices" not in spec:
        raise UserError(f"{path}: a multiple-choice task needs 'choices' (templates) or 'choices_field'")
    templates = [_template(str(path), "choices", c) for c in spec["choices"]]
    return lambda doc: [t(doc) for t in templates]


def _toml_gold(
    path: Path, choices: Callable[[dict], list[str]], target: Callable[[dict], str]
) -> Callable[[dict], int]:
    """doc_to_target names the gold choice by its text, else by its 0-based index."""

    def gold(doc: dict) -> int:
        options, value = choices(doc), target(doc).strip()
        if value in options:
            return options.index(value)
        if value.isdigit() and int(value) < len(options):
            return int(value)
        raise UserError(f"{path}: doc_to_target gives {value!r}, neither a choice nor a choice index")

    return gold


# --------------------------------------------------------------------------- names


def known_names(data: Path | None) -> list[str]:
    """Task names for suggestions: the built-in ones, and those a TinyWorld folder holds."""
    names = ["mmlu", "gsm8k", "ppl", "world_mmlu", "world_instruct", "arith", "words"]
    names += [f"words_{t}" for t in WORD_TASK_NAMES]
    names += [f"arith_{op}_{k}" for op in ARITH_OPS for k in range(2, 6)] + [f"arith_{k}" for k in range(2, 6)]
    if data is not None and (data / "bench" / "arith").is_dir():
        names += [f"arith_{stem}" for stem in _test_stems(data / "bench" / "arith")]
    return sorted(set(names))


def _world_arith(data: Path) -> list[str]:
    folder = data / "bench" / "arith"
    if not folder.is_dir():
        raise UserError(f"{data} is not a TinyWorld folder (no bench/arith): write one with `gptlab world`")
    return _test_stems(folder)


def expand_names(names: list[str], data: Path | None) -> list[str]:
    """Group names stand for several tasks: ``arith`` (all), ``arith_3`` (every operation on
    3 digits the world holds), ``words`` (all six word tasks)."""
    out = []
    for name in names:
        if name == "words":
            out += [f"words_{t}" for t in WORD_TASK_NAMES]
        elif name == "arith" or re.fullmatch(r"arith_\d+", name):
            if data is None:
                raise UserError(f"task {name} needs --data: a TinyWorld folder")
            digits = name.partition("_")[2]
            found = [t for t in _world_arith(data) if not digits or t.endswith(f"_{digits}")]
            if not found:
                raise UserError(
                    f"{data} holds no arithmetic task on {digits} digits; it has {', '.join(_world_arith(data))}"
                )
            out += [f"arith_{t}" for t in found]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def load_task(
    name: str, data: Path | None, cot: bool = False, limit: int | None = None, need_shots: bool = False
) -> Task:
    """One task by name (or TOML path). ``data``: the folder or file the task reads."""
    if name.endswith(".toml"):
        return toml_task(Path(name), limit)
    needs_data = name in ("mmlu", "gsm8k", "ppl", "world_mmlu", "world_instruct") or name.startswith(
        ("arith_", "words_")
    )
    if not needs_data:
        near = difflib.get_close_matches(name, known_names(data), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; see `gptlab eval --help` for the task names"
        raise UserError(f"unknown task {name!r}{hint}")
    if data is None:
        raise UserError(f"task {name} needs --data (a folder or file to read it from)")
    if name == "mmlu":
        return mmlu_task(name, data, limit, need_shots)
    if name == "world_mmlu":
        root = data / "bench" / "world_mmlu"
        if not root.is_dir():
            raise UserError(f"{data} is not a TinyWorld folder (no bench/world_mmlu): write one with `gptlab world`")
        return mmlu_task(name, root, limit, need_shots)
    if name == "world_instruct":
        return instruct_task(name, data, limit)
    if name == "gsm8k":
        return gsm8k_task(name, data, limit)
    if name == "ppl":
        return ppl_task(name, data, limit)
    if name.startswith("arith_"):
        return arith_task(name, data, name[len("arith_") :], cot, limit)
    return words_task(name, data, name[len("words_") :], limit)
