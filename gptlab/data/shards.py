"""Tokenize a corpus into binary shards that the loader memory-maps.

A shard file is a 64-byte header followed by the tokens, little-endian::

    magic b"GPTLABTK" | format version (u32) | bytes per token (u32: 2 or 4) | token count (u64) | zeros

Tokens are uint16 when every id fits (vocab_size <= 65536), else uint32. A shards folder holds
``train_000000.bin, ...``, ``val_000000.bin, ...`` and ``meta.json``. The token stream of a split is
its shards concatenated in order; documents (and the loader's windows) may cross shard boundaries.
``meta.json`` is written last, atomically: a folder without it is an unfinished ``prepare``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import struct
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data.documents import iter_documents, require_documents
from gptlab.errors import UserError
from gptlab.fileio import remove_stale, write_error, write_json_atomic
from gptlab.tokenizer import Tokenizer

MAGIC = b"GPTLABTK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SPLITS = ("train", "val")
STAGING_PREFIX = ".prepare-"  # new shards are written in this hidden folder, then moved in
# The staging folder: STAGING_PREFIX, the writer's process id, 12 hex digits (no process id before
# gptlab recorded it); a killed prepare's is removed by the next one into the same folder.
STAGING = rf"{re.escape(STAGING_PREFIX)}(?:(?P<pid>\d+)-)?[0-9a-f]{{12}}"
CHUNK_CHARS = 1 << 20  # documents are sent to workers in chunks of about this many characters
MAX_WORKERS = 1024  # tokenizer processes: far beyond any machine's cores, a typo rather than a setting


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


# ----------------------------------------------------------------------------- one shard


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, vocab_size: int) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = _as_dtype(np.asarray(tokens), dtype)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_header(dtype, tokens.size))
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        error = write_error(e, path, staged=tmp)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from e
        raise


def _header(dtype: np.dtype, count: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count).ljust(HEADER_BYTES, b"\0")


def _as_dtype(tokens: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids outside 0..{np.iinfo(dtype).max} cannot be stored as {dtype.name}")
    return tokens.astype(dtype, copy=False)


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens (read-only), checking that its header and size agree."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
    except OSError as e:
        raise UserError(f"cannot read shard {path} ({e.strerror}): re-run `gptlab prepare`") from None
    if size < HEADER_BYTES:
        raise UserError(f"shard {path} is truncated ({size} bytes, less than a header): re-run `gptlab prepare`")
    magic, version, itemsize, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gptlab shard (bad magic bytes): re-run `gptlab prepare`")
    if version != FORMAT_VERSION:
        raise UserError(
            f"shard {path} has format version {version}, this gptlab reads {FORMAT_VERSION}: "
            f"re-run `gptlab prepare` with this version"
        )
    if itemsize not in _DTYPES:
        raise UserError(f"shard {path} has a corrupt header (token size {itemsize}): re-run `gptlab prepare`")
    if size != HEADER_BYTES + count * itemsize:
        raise UserError(
            f"shard {path} is truncated or corrupt ({size} bytes, header says {count} tokens of "
            f"{itemsize} bytes): re-run `gptlab prepare`"
        )
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=_DTYPES[itemsize])
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(count,))


class _ShardWriter:
    """Streams one split's tokens into numbered shard files of ``shard_tokens`` tokens each, in
    ``prepare``'s staging folder: only complete shards ever leave it."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.names: list[str] = []  # finished shards
        self.tokens = 0
        self._file = None
        self._count = 0  # tokens in the open file

    def write(self, tokens: np.ndarray) -> None:
        tokens = _as_dtype(tokens, self.dtype)
        while tokens.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self._count += part.size
            self.tokens += part.size
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> None:
        if self._file is not None:
            self._finish()

    def abort(self) -> None:
        """Close the open file; ``prepare`` removes the staging folder with everything in it."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # flushing what is buffered fails again on a full disk
                self._file.close()
            self._file = None

    def _open(self) -> None:
        # Open across write() calls, so no with-block; close() and abort() close it.
        self._file = open(self.out_dir / shard_name(self.split, len(self.names)), "wb")  # noqa: SIM115
        self._file.write(bytes(HEADER_BYTES))  # placeholder until the count is known
        self._count = 0

    def _finish(self) -> None:
        name = shard_name(self.split, len(self.names))
        f = self._file
        f.seek(0)
        f.write(_header(self.dtype, self._count))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        self.names.append(name)


class _SplitWriter:
    """Sends each document to its split's ``_ShardWriter``, counting documents: document ``i`` of the
    corpus goes to val when ``is_val(i, val_fraction)``."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int, val_fraction: float):
        self.writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
        self.documents = dict.fromkeys(SPLITS, 0)
        self.val_fraction = val_fraction
        self._next_index = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Write the next documents of the corpus: ``tokens`` concatenated, ``lengths`` tokens each."""
        val = is_val(np.arange(self._next_index, self._next_index + lengths.size), self.val_fraction)
        in_val = np.repeat(val, lengths)
        self.writers["train"].write(tokens[~in_val])
        self.writers["val"].write(tokens[in_val])
        self.documents["val"] += int(val.sum())
        self.documents["train"] += int((~val).sum())
        self._next_index += lengths.size

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def summary(self) -> dict[str, dict[str, Any]]:
        """meta.json's "splits": documents, tokens and shard names per split."""
        return {
            split: {"documents": self.documents[split], "tokens": writer.tokens, "shards": writer.names}
            for split, writer in self.writers.items()
        }

    def shard_names(self) -> list[str]:
        return [name for split in SPLITS for name in self.writers[split].names]


# ----------------------------------------------------------------------------- meta.json


def read_meta(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a shards folder's meta.json, refusing folders that ``prepare`` did not finish."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise UserError(f"shards folder {shards_dir} does not exist: run `gptlab prepare` first")
    path = shards_dir / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{shards_dir} has no meta.json: it is not a shards folder or `gptlab prepare` did not "
            f"finish; run `gptlab prepare` (with --overwrite) again"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): re-run `gptlab prepare`") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(
            f"{path} has format version {version}, this gptlab reads {FORMAT_VERSION}: re-run `gptlab prepare`"
        )
    return meta


# ----------------------------------------------------------------------------- prepare


def prepare(
    tokenizer_dir: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    val_fraction: float = 0.0005,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize documents into train/val shards and return the meta.json written last.

    Each document starts with BOS (or, for a tokenizer without BOS, ends with EOS). Document ``i``
    goes to val when ``is_val(i, val_fraction)``, a function of ``i`` alone, so the split and the
    shards are identical for any number of ``workers`` (processes; 1 tokenizes in this process).
    The corpus is streamed: at most ``2 * workers`` chunks of ~1 MB of text are in flight.
    Worker processes are spawned, so a script calling this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out_dir = Path(out_dir)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_settings(val_fraction, shard_tokens, workers)
    separator = _separator(tokenizer, tokenizer_dir)
    created = not out_dir.exists()
    old = _old_shards(out_dir, overwrite)
    # New shards are written aside and swapped in only once complete, so a failure at any
    # input (a bad line, an unreachable hub, a full disk) leaves the old ones as they were.
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    splits = _SplitWriter(staging, token_dtype(tokenizer.vocab_size), shard_tokens, val_fraction)
    # The encoder is iterated here, not handed to a helper, so a failed write drops it at once,
    # closing its worker pool before the staging folder goes.
    try:
        staging.mkdir()
        chunks = _chunks(require_documents(iter_documents(inputs), ", ".join(map(str, inputs))))
        for tokens, lengths in _encode_chunks(chunks, tokenizer, Path(tokenizer_dir), separator["position"], workers):
            splits.write(tokens, lengths)
        splits.close()
    except BaseException as e:
        error = write_error(e, out_dir, staged=staging)  # before the clean-up frees the space it measures
        splits.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only while empty: a folder this run made, and nothing else
        if error is not None:
            raise error from e
        raise
    meta = _meta(tokenizer, separator, inputs, val_fraction, shard_tokens, splits)
    _swap_in(staging, out_dir, old, splits.shard_names())
    # A copy of the tokenizer travels with its shards, so training needs only the shards folder.
    tokenizer.save_pretrained(out_dir / "tokenizer")
    write_json_atomic(out_dir / "meta.json", meta)
    return meta


def _meta(
    tokenizer: Tokenizer,
    separator: dict[str, Any],
    inputs: list[str | os.PathLike],
    val_fraction: float,
    shard_tokens: int,
    splits: _SplitWriter,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "separator": separator,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "inputs": [str(p) for p in inputs],
        "splits": splits.summary(),
    }


def _check_settings(val_fraction: float, shard_tokens: int, workers: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}: e.g. 0.0005")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"workers must be in 1..{MAX_WORKERS}, got {workers}: e.g. the number of cores")


def _swap_in(staging: Path, out_dir: Path, old: list[Path], names: list[str]) -> None:
    """Replace the ``old`` shards with the staged ``names``. ``old`` starts with meta.json: from here
    until the new one lands, the folder reads as unfinished."""
    for path in old:
        path.unlink()
    for name in names:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


def is_val(index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents go to val: a hash of the document index below ``val_fraction``.

    Document 0 always trains and document 1 always validates (when ``val_fraction > 0``), so any
    corpus of two or more documents has both splits.
    """
    index = np.asarray(index, dtype=np.uint64)
    if val_fraction <= 0:
        return np.zeros(index.shape, dtype=bool)
    hashed = mix64(index) >> np.uint64(11)  # 53 bits: exact as a float
    chosen = hashed < np.uint64(int(val_fraction * 2**53))
    return (chosen | (index == 1)) & (index != 0)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-mixed hash of uint64 values (wraps on overflow)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _separator(tokenizer: Tokenizer, tokenizer_dir: str | os.PathLike) -> dict[str, Any]:
    if tokenizer.bos_id is not None:
        return {"token": tokenizer.bos_token, "id": tokenizer.bos_id, "position": "start"}
    if tokenizer.eos_id is not None:
        return {"token": tokenizer.eos_token, "id": tokenizer.eos_id, "position": "end"}
    raise UserError(
        f"tokenizer {tokenizer_dir} has neither a BOS nor an EOS token, so documents cannot be "
        f"separated: set bos_token or eos_token in its tokenizer_config.json"
    )


def _old_shards(out_dir: Path, overwrite: bool) -> list[Path]:
    """The shards (meta.json first) that a new ``prepare`` into ``out_dir`` would replace: refused
    unless ``overwrite``. A killed prepare's staging folder is removed (not a running one's)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file, not a folder: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, STAGING)
    old = [out_dir / "meta.json"] if (out_dir / "meta.json").exists() else []
    old += sorted(p for split in SPLITS for p in out_dir.glob(f"{split}_*.bin"))
    if old and not overwrite:
        raise UserError(
            f"{out_dir} already holds shards ({old[0].name}, ...): choose another --out or pass --overwrite"
        )
    return old


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_chunks(
    chunks: Iterator[list[str]], tokenizer: Tokenizer, tokenizer_dir: Path, position: str, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode chunks in order, in this process or in a pool with a bounded number in flight.

    A corpus of fewer than ``2 * workers`` chunks is encoded here (the library still uses every
    core): a spawned worker imports the caller's main module, torch included, which costs more
    than such a corpus takes to encode. ``Pool.imap`` would read the whole input ahead of the
    workers; submitting at most ``2 * workers`` chunks keeps the parent's memory independent of
    the corpus size.
    """
    ahead = list(itertools.islice(chunks, 2 * workers))
    if workers == 1 or len(ahead) < 2 * workers:
        for chunk in itertools.chain(ahead, chunks):
            yield _encode(tokenizer, chunk, position)
        return
    # spawn, not fork: the parent may hold threads (the tokenizers library's, torch's).
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        pending: deque = deque()
        for chunk in itertools.chain(ahead, chunks):
            pending.append(pool.apply_async(_encode_in_worker, (chunk, position)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _encode(tokenizer: Tokenizer, texts: list[str], position: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, each with its separator; returns (all tokens, tokens per document)."""
    ids = tokenizer.encode_batch(texts, add_special_tokens=False)
    if position == "start":
        docs = [[tokenizer.bos_id] + x for x in ids]
    else:
        docs = [x + [tokenizer.eos_id] for x in ids]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
    return tokens, lengths


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    # One core per worker process: the pool supplies the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_pretrained(tokenizer_dir)


def _encode_in_worker(texts: list[str], position: str) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, texts, position)
