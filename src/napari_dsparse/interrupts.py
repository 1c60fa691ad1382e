"""Ctrl-C between the steps of long work: never inside a write, never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be. Raised
inside a zarr write, it leaves the write running on zarr's I/O thread, where it can
land after the scratch store has been removed; raised inside a finaliser, it is
printed and dropped, and the work goes on as if nothing had been pressed. Within
:func:`interrupts_between_steps` the first Ctrl-C only takes note, and the next
:func:`stop_if_interrupted` (or the end of the block) raises it, or
:func:`take_interrupt` hands it to the caller, which may finish up first (save what
it has); a second Ctrl-C raises at once, for work that never reaches a step's end.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["interrupts_between_steps", "stop_if_interrupted", "take_interrupt"]

_pending = threading.Event()


@contextlib.contextmanager
def interrupts_between_steps(notice: str = "") -> Iterator[None]:
    """Hold a first Ctrl-C until :func:`stop_if_interrupted` or the block's end.

    ``notice``, if given, goes to stderr when a Ctrl-C is held. Does nothing
    outside the main thread (signals reach only that one) or where someone else
    handles SIGINT (a GUI, a notebook, an outer block of this kind).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, functools.partial(_hold, notice))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        # A Ctrl-C held through the last step, or through an error, still stops.
        stop_if_interrupted()


def stop_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the last check."""
    if take_interrupt():
        raise KeyboardInterrupt


def take_interrupt() -> bool:
    """Whether Ctrl-C was pressed since the last check; the press is then handled.

    Only in the main thread, the one a held Ctrl-C belongs to.
    """
    if threading.current_thread() is threading.main_thread() and _pending.is_set():
        _pending.clear()
        return True
    return False


def _hold(notice: str, signum: int, frame) -> None:
    if _pending.is_set():
        _pending.clear()
        signal.default_int_handler(signum, frame)  # pressed twice: stop now
    _pending.set()
    if notice:
        print(notice, file=sys.stderr, flush=True)
