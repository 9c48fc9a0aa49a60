"""Collective error handling and rank-aware console logging.

Every rank runs the same code path; where a step can fail on some ranks only (reading a file, building an RVE,
a user's bad input that only one rank sees), the ranks agree on success first and then raise everywhere
(:func:`collective`).

Library modules log through module loggers (``logging.getLogger(__name__)``, all under ``fe2ml``) and never print;
:func:`install_console_logging`, called once by the CLI (or a script), shows rank 0's progress on stdout and
every rank's warnings on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from fe2ml.errors import Fe2mlError

__all__ = ["collective", "fault_point", "install_console_logging", "log_level"]


def fault_point(where: str) -> None:
    """Test hook of the chaos tests: ``FE2ML_KILL=<where>`` kills this process with SIGKILL when it reaches ``where``.

    Points: ``rank:step:checkpoint`` (every rank's file of a step written, the pointer not yet switched) and
    ``flush:N`` (inside the N-th log flush of the process, between the resizes of its datasets) and ``create``
    (a log part's HDF5 file opened, its header not yet written).
    """
    if os.environ.get("FE2ML_KILL") == where:
        os.kill(os.getpid(), signal.SIGKILL)


class _ConsoleHandler(logging.StreamHandler):
    """The console handler of :func:`install_console_logging` (replaced, never stacked).

    It writes to whatever ``sys.stdout``/``sys.stderr`` is at the time of the message (redirections and captures
    made after the installation are honoured).
    """

    def __init__(self, name: str):
        super().__init__(getattr(sys, name))
        self._name = name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self._name)
        super().emit(record)


def install_console_logging(comm, *, level: int = logging.INFO) -> None:
    """Show fe2ml's progress messages of rank 0 on stdout and warnings of every rank on stderr.

    Args:
        comm: the communicator whose rank 0 reports progress.
        level: the level shown on rank 0 (other ranks show warnings and errors only).
    """
    log = logging.getLogger("fe2ml")
    for h in [h for h in log.handlers if isinstance(h, _ConsoleHandler)]:
        log.removeHandler(h)
    if comm.rank == 0:
        out = _ConsoleHandler("stdout")
        out.setLevel(level)
        out.addFilter(lambda r: r.levelno < logging.WARNING)
        out.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(out)
    err = _ConsoleHandler("stderr")
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter(f"[rank {comm.rank}] %(levelname)s %(message)s"))
    log.addHandler(err)
    log.setLevel(min(level, logging.WARNING))
    log.propagate = False

@contextlib.contextmanager
def log_level(level: int, name: str = "fe2ml") -> Iterator[None]:
    """Show only messages of ``level`` and above from the logger ``name`` inside the block.

    What a ``quiet`` flag would do, done with the logger: ``with log_level(logging.WARNING): run(comm, cfg)``
    keeps a run's warnings and drops its progress lines.
    """
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def collective[T](comm, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on every rank; if it raises a :class:`Fe2mlError` on any rank, raise it on all ranks.

    The error keeps its type and the message of the first failing rank (lowest rank number), so every rank
    reports the same one line.

    Args:
        comm: the communicator whose ranks all call this.
        fn: the work of this rank.

    Returns:
        What ``fn`` returned on this rank.
    """
    err: Fe2mlError | None = None
    out: Any = None
    try:
        out = fn()
    except Fe2mlError as e:
        err = e
    errs = comm.allgather(None if err is None else (type(err), str(err)))
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        cls = first[0]
        while cls.__init__ is not Exception.__init__:  # a type with its own constructor: its nearest plain base
            cls = cls.__mro__[1]
        raise cls(first[1])
    return out
