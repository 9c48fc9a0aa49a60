"""Atomic file writes: a temporary file in the target's folder, renamed over the target.

A kill at any moment leaves either the old file or the new one, never a half-written file. Every
write-then-rename site of fe2ml goes through :func:`atomic_target` (or :func:`atomic_write` for text and bytes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "atomic_write"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; renamed over ``path`` when the block ends without error.

    The temporary name keeps the suffix of ``path`` (``np.savez`` and gmsh choose the format by it) and holds the
    process id, so that ranks writing different files of one folder never share a temporary. On an error, or where
    the block wrote nothing, the temporary file is removed and the target is left as it was.

    Args:
        path: the file to write.

    Yields:
        The temporary path.
    """
    target = Path(path)
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically; returns the path."""
    with atomic_target(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)
