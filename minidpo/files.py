"""Files: written so that a reader (or a crash) never sees half of one; inputs checked before they are read."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from minidpo.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on an exception removed.

    The rename is atomic on one filesystem, so `path` is either its old content or the whole new one. The
    temporary name is hidden and carries the pid, so concurrent writers do not share it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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
