"""Collective error handling: a failure on one rank never leaves the others hanging.

Every rank runs the same code path; where a step can fail on some ranks only (reading a file, building an RVE,
a user's bad input that only one rank sees), the ranks agree on success first and then raise everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from fe2ml.errors import Fe2mlError

__all__ = ["collective"]

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
    err, out = None, None
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
