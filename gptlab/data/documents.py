"""Read training documents from .txt, .jsonl and .parquet files and folders of them, and from
Hugging Face datasets named ``hf:PATH[:CONFIG[:SPLIT]]``.

Documents are streamed one at a time, so a corpus never has to fit in memory. The order is
deterministic (folders are walked recursively in sorted order), which makes shard preparation
and tokenizer training reproducible.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import UserError, first_line
from gptlab.fileio import text_lines

SUFFIXES = (".txt", ".jsonl", ".parquet")


def iter_documents(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the documents of files and folders in a deterministic order.

    - ``.txt``: documents are separated by blank lines (lines holding only whitespace).
    - ``.jsonl``: one JSON object per line with a string ``text`` field; blank lines are skipped.
    - ``.parquet``: the ``text`` column; nulls are skipped.

    - ``hf:PATH[:CONFIG[:SPLIT]]``: a Hugging Face dataset's ``text`` column (see ``HubDataset``).

    Named files must have one of these extensions; inside folders, files with other extensions and
    hidden files are skipped, so a corpus folder may hold a README. Empty documents are skipped.
    Yielding nothing is not an error here: the consumer decides (see ``require_documents``).
    """
    for path in list(_expand(paths)):  # all paths are checked before the first document
        if isinstance(path, HubDataset):
            yield from path.documents()
        elif path.suffix == ".txt":
            yield from _read_txt(path)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        else:
            yield from _read_parquet(path)


def require_documents(documents: Iterable[str], source: object) -> Iterator[str]:
    """Pass documents through, raising UserError before the first one if there are none."""
    it = iter(documents)
    try:
        first = next(it)
    except StopIteration:
        raise UserError(
            f"no documents found in {source}: the corpus is empty; "
            f"give .txt (blank-line separated), .jsonl ('text' field) or .parquet ('text' column) files"
        ) from None
    yield first
    yield from it


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face dataset by name, ``hf:PATH[:CONFIG[:SPLIT]]`` (no config and split ``train``
    unless given; ``hf:PATH::SPLIT`` picks a split without a config): its ``text`` column,
    streamed, so rows download as they are read and nothing is held whole. Only a name the user
    gives is ever fetched; reading needs the ``datasets`` package."""

    spec: str  # as the user wrote it, for messages
    path: str
    config: str | None
    split: str

    PREFIX = "hf:"

    @classmethod
    def parse(cls, spec: str) -> HubDataset:
        path, config, split = (spec.removeprefix(cls.PREFIX).split(":") + ["", ""])[:3]
        if not path or spec.count(":") > 3:
            raise UserError(
                f"input {spec!r} is not hf:PATH[:CONFIG[:SPLIT]]: e.g. hf:roneneldan/TinyStories, "
                "hf:roneneldan/TinyStories::validation or hf:wikitext:wikitext-103-raw-v1:train"
            )
        return cls(spec, path, config or None, split or "train")

    def check_installed(self) -> None:
        try:
            importlib.import_module("datasets")
        except ImportError:
            raise UserError(f"reading {self.spec} needs the datasets package: pip install 'gptlab[hf]'") from None

    def documents(self) -> Iterator[str]:
        import datasets

        # The hub, the network and the dataset's own loader fail in many types, at open or mid-stream.
        try:
            rows = datasets.load_dataset(self.path, self.config, split=self.split, streaming=True)
            for number, row in enumerate(rows):
                if "text" not in row:
                    raise UserError(f"{self.spec} has no 'text' column (row {number} has: {', '.join(row)})")
                text = row["text"]
                if text is not None and not isinstance(text, str):
                    raise UserError(f"{self.spec} row {number}: 'text' holds {type(text).__name__}, not a string")
                if text:  # nulls and empty texts are skipped, as in Parquet files
                    yield text
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"cannot read {self.spec} ({first_line(e)}): check the name, config and split, and the network"
            ) from None


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[Path | HubDataset]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for given in paths:
        if isinstance(given, str) and given.startswith(HubDataset.PREFIX):
            hub = HubDataset.parse(given)
            hub.check_installed()
            yield hub
            continue
        p = Path(given)
        if not p.exists():
            raise UserError(f"input {p} does not exist: check the path")
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and f.suffix in SUFFIXES and not any(s.startswith(".") for s in rel):
                    yield f
        elif p.suffix in SUFFIXES:
            yield p
        else:
            raise UserError(
                f"input {p} has unsupported extension {p.suffix!r}: use {', '.join(SUFFIXES)} files or a folder of them"
            )


def _read_txt(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in text_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield _join(paragraph)
            paragraph = []
    if paragraph:
        yield _join(paragraph)


def _join(lines: list[str]) -> str:
    """Join a paragraph's lines, dropping only the final line ending."""
    return "".join(lines).removesuffix("\n").removesuffix("\r")


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object ends with one error naming the file and the line."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not valid JSON ({e.msg}): fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number} is not a JSON object: each line must be one record")
        yield number, record


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file (see ``jsonl_records``)."""
    return [record for _, record in jsonl_records(path)]


def _read_jsonl(path: Path) -> Iterator[str]:
    for number, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise UserError(
                f"{path}:{number} has no string 'text' field: each JSONL line must be an object "
                f'like {{"text": "..."}}'
            )
        if record["text"]:
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow, which is not installed: pip install gptlab[parquet]") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path} is not a readable Parquet file ({first_line(e)}): check the file") from None
    schema = file.schema_arrow
    if "text" not in schema.names:
        raise UserError(
            f"{path} has no 'text' column (columns: {', '.join(schema.names)}): "
            f"rename the column holding the documents to 'text'"
        )
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{path}: column 'text' has type {kind}, not string: store the documents as strings")
    for batch in file.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text
