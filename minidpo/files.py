"""Files: written so that a reader (or a crash) never sees half of one; inputs checked before they are read."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import shutil
import socket
from pathlib import Path

from minidpo.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on an exception removed.

    The rename is atomic on one filesystem, so `path` is either its old content or the whole new one. The
    temporary name (`temp_sibling`) is hidden and carries host and pid, so concurrent writers do not share it and
    `remove_orphans` can tell one left by a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, keep_suffix=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def temp_sibling(path, keep_suffix: bool = False) -> Path:
    """A hidden temporary name beside `path` naming this host and process: `.NAME.tmp-HOST-PID[SUFFIX]` (the
    suffix kept for writers that pick a format by it, e.g. matplotlib)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
                          f"{path.suffix if keep_suffix else ''}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def remove_orphans(folder) -> list:
    """Remove the temporary files and folders (`temp_sibling` names) in `folder` that a process of this host left
    when it was killed mid-write (its pid is gone); returns what was removed. Temporaries of live processes, and of
    other hosts sharing the folder (their pids mean nothing here), are left alone."""
    folder = Path(folder)
    pattern = re.compile(rf"^\..+\.tmp-{re.escape(socket.gethostname())}-(\d+)(\.[^.]*)?$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # no folder yet (or unreadable: the caller's own write will say so)
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# What a full disk (or quota) looks like from Python's, torch's and safetensors' writers
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull", "file write failed")


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in _DISK_FULL)


def write_error(what: str, path, error: Exception, advice: str) -> "UserError":
    """The one-line `UserError` for a failed write of `what` to `path` (disk full, read-only, no permission, a file
    where a folder belongs), with `advice` on what to change. `error` is an OSError, or what a writer that does its
    own I/O raises instead (safetensors' SafetensorError names the OS error in its text)."""
    reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [repr(error)])[0]
    if is_disk_full(error):
        reason, advice = "no space left on the device", f"free some space, or {advice}"
    return UserError(f"cannot write {what} to {path}: {reason}; {advice}", code="write_failed")


# Set by `digests_shared()`: the digests of files already read in this scope, by file identity, size and mtime.
_SHARED_DIGESTS: contextvars.ContextVar = contextvars.ContextVar("minidpo_shared_digests", default=None)


def file_digest(path) -> str:
    """sha256 of the bytes of `path`: what content-keyed caches and run records stand on, never a path or a
    modification time. Inside `digests_shared()` a file is read once however often it is asked for."""
    shared = _SHARED_DIGESTS.get()
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if shared is not None and key in shared:
        return shared[key]
    with open(path, "rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    if shared is not None:
        shared[key] = digest
    return digest


@contextlib.contextmanager
def digests_shared():
    """One read per file for the `file_digest` calls inside: a run's record and its prepared-data key hash the same
    data seconds apart. Outside it, every call reads the file (a rewrite with the same size and mtime is seen)."""
    token = _SHARED_DIGESTS.set({})
    try:
        yield
    finally:
        _SHARED_DIGESTS.reset(token)


def cache_root() -> Path:
    """The folder of minidpo's caches (reference log-probs, prepared data): $MINIDPO_CACHE, else ~/.cache/minidpo."""
    return Path(os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo").expanduser()


def write_text_atomic(path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_input_file(path: Path) -> None:
    """UserError unless `path` is a readable file (not a directory)."""
    if not path.exists():
        raise UserError(f"input file not found: {path}", code="missing_path")
    if path.is_dir():
        raise UserError(f"input is a directory, not a .jsonl file: {path}", code="missing_path")
    if not os.access(path, os.R_OK):
        raise UserError(f"input file is not readable: {path}", code="missing_path")
