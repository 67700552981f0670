"""Reading text a user gives and writing files so that a reader never sees half of one (torch-free:
data workers import it).

Reading: user text is UTF-8. A byte that is not is refused in one line naming the file and the line
(``text_lines``, ``read_text``), or the argument (``check_text``), never a traceback deep inside a
tokenizer or a CSV reader.

Writing: a file or folder is written under a temporary name beside its target, named with the
writer's process id, then renamed into place. A writer that fails removes its temporary; one that
was killed cannot, so the next writer into the same folder removes what dead processes left
(``remove_stale``). A write that fails in a library that drops the path (``f.write`` on a full disk
raises ``OSError(ENOSPC)`` with no file name; ``torch.save`` raises a ``RuntimeError``) is reported as
an ``OSError`` naming the target (``write_error``), which the CLI prints as one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

from gptlab.errors import UserError

# Below this much free space a failed write is put down to a full disk: a write that fails for want
# of space fills the disk to its last blocks first.
FULL_DISK_BYTES = 1 << 20
_OS_ERROR_IN_MESSAGE = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report an errno


# --------------------------------------------------------------------------- reading user text


def decode_line(raw: bytes, where: str, offset: int) -> str:
    """Decode one line strictly: a NUL byte or invalid UTF-8 means a binary or mis-encoded input.
    ``where`` names the line in the error ("corpus.txt:12", "stdin:3"); ``offset`` is the line's
    first byte in its file."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{where} looks binary (NUL byte at byte offset {offset + nul}): give UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not valid UTF-8 (byte offset {offset + e.start}): re-encode it as UTF-8") from None


def decoded_lines(stream: BinaryIO, source: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line with its newline) of a byte stream, streaming and checking
    each line (see ``decode_line``); a UTF-8 byte order mark is dropped."""
    offset = 0
    for number, raw in enumerate(stream, start=1):
        line = decode_line(raw, f"{source}:{number}", offset)
        if number == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark is not text
        offset += len(raw)
        yield number, line


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file (see ``decoded_lines``)."""
    with open(path, "rb") as f:
        yield from decoded_lines(f, str(path))


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file; a byte that is not UTF-8 is refused naming the file and line."""
    return "".join(line for _, line in text_lines(path))


def check_text(text: str, what: str) -> str:
    """``text`` that arrived as a ``str`` (a command-line argument, a line typed at a terminal),
    refused when it holds bytes that were not UTF-8: Python hands them on as lone surrogates, which
    no tokenizer takes. ``what`` names it in the error ("--prompt")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{what} is not valid UTF-8 text (character {e.start} is a byte that UTF-8 does not allow): give UTF-8 text"
        ) from None
    return text


# --------------------------------------------------------------------------- writing


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    remove_stale(path.parent, rf"\.{re.escape(path.name)}\.tmp-(?P<pid>\d+)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        error = write_error(e, path)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from e
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_error(e: BaseException, target: str | os.PathLike, staged: str | os.PathLike | None = None) -> OSError | None:
    """The ``OSError`` to raise for a write to ``target`` that failed with ``e``, naming ``target``
    (or the file under it), or None when ``e`` is no failed write or already names a path the user
    can find. ``staged``: the temporary file or folder the write went to, which the caller removes;
    a path inside it is reported at its place under ``target``. Call it before removing ``staged``:
    it measures the free space there."""
    target = Path(target)
    if isinstance(e, OSError):
        if e.errno is None:
            return None
        if e.filename is None:
            return OSError(e.errno, e.strerror or os.strerror(e.errno), str(target))
        if staged is None:
            return None
        try:
            inside = Path(os.fsdecode(e.filename)).relative_to(staged)
        except (ValueError, TypeError):
            return None
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(target / inside))
    if not isinstance(e, Exception) or isinstance(e, UserError):
        return None
    found = _OS_ERROR_IN_MESSAGE.search(str(e))
    if found:
        code = int(found.group(1))
    elif _disk_full(Path(staged) if staged is not None else target):
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(target))


def _disk_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` (or its nearest existing parent) is out of space."""
    if not hasattr(os, "statvfs"):
        return False
    for folder in (path, *path.parents):
        if folder.exists():
            usage = os.statvfs(folder)
            return usage.f_bavail * usage.f_frsize < FULL_DISK_BYTES
    return False


def remove_stale(folder: str | os.PathLike, pattern: str) -> None:
    """Remove what killed writers left in ``folder``: the files and folders whose whole name
    matches the regex ``pattern`` and whose group ``pid``, when it matched, names no running
    process (a running one may still be writing). An entry without a process id is from an
    older writer and is removed."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder: nothing was left there
        return
    for entry in entries:
        match = re.fullmatch(pattern, entry.name)
        if match is None or (match.group("pid") is not None and _running(int(match.group("pid")))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(entry.path)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (always True where that cannot be asked safely:
    on Windows ``os.kill`` terminates)."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):
        return False
    return True


def umask() -> int:
    """The process's umask. Linux reports it; elsewhere it is set and put back, which a thread
    creating a file at that instant could notice."""
    with suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions ``open`` gives a new one (0666 less the umask), for files a
    library writes through a private temporary file (safetensors' are 0600)."""
    os.chmod(path, 0o666 & ~umask())
