"""SIGINT / SIGTERM as ``KeyboardInterrupt``, held back while a file-system step must finish as a whole.

The command line's signal handler calls :func:`interrupt`. Outside a :func:`critical` section that raises
``KeyboardInterrupt`` at once; inside one it only records the signal, and the outermost section raises it when it
ends normally. A conversion creates directories and records them, and renames its finished checkpoint into place
and records that, inside such sections: an interrupt can then never fall between a step and its record, so the
clean-up removes exactly what was created and an interrupt after the rename is known to be one.

The state is the process's (signal handlers run in the main thread); nesting is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # open critical sections
_pending = False  # a signal arrived inside one


def interrupt() -> None:
    """What a signal handler does: raise ``KeyboardInterrupt`` now, or when the open critical section ends."""
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def critical() -> Iterator[None]:
    """Hold interrupts back for the body; one that arrived is raised when the outermost section ends normally
    (when the body raised, that exception goes on and the held interrupt is dropped: the caller is unwinding)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        if not _depth:
            _pending = False
        raise
    _depth -= 1
    if not _depth and _pending:
        _pending = False
        raise KeyboardInterrupt
