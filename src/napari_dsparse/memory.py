"""Handing memory that the C heap keeps after ``free`` back to the operating system.

Live training allocates and frees about 1 GB/s of 1-16 MB blocks on the CPU
(PyTorch's activations come from ``malloc``). glibc raises its mmap threshold to the
largest block freed so far (up to 32 MB), so these blocks come from its heaps, the
main one and 64 MB ones per thread, whose freed pages stay resident: a rare peak or
a new heap raises the process's RSS for good, in steps, minutes into a session
(docs/reliability.md, long sessions). ``malloc_trim(0)`` gives the free pages of
every heap back; pages in regular use fault in again. Every 10 s that costs well
under 1 % of a core; after every round (about once a second) it refaulted 15-17
thousand pages a second, and a fixed, low mmap threshold instead faults every block
in (60 % more CPU per training step).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable

__all__ = ["PeriodicRelease", "release_freed_memory"]

RELEASE_EVERY_SECONDS = 10.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on other C libraries (macOS, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such symbol, or no dlopen(NULL)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the OS; whether any were (glibc only).

    It walks the allocator's free lists (a few ms) and the pages given back fault in
    again when next used: call it between bursts of work, not inside them.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class PeriodicRelease:
    """:func:`release_freed_memory` at most once every ``seconds`` (call it often)."""

    def __init__(
        self,
        seconds: float = RELEASE_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        release: Callable[[], bool] = release_freed_memory,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._release = release
        self._last = clock()

    def __call__(self) -> bool:
        """Release if ``seconds`` have passed since the last release; whether it did."""
        now = self._clock()
        if now - self._last < self.seconds:
            return False
        self._last = now
        self._release()
        return True
