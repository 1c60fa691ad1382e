"""Freed C-heap memory goes back to the OS between rounds, every few seconds."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import napari_dsparse.live as live
from napari_dsparse.live import Mailbox, PredictionUpdate, iter_live
from napari_dsparse.memory import PeriodicRelease, _malloc_trim, release_freed_memory

glibc_only = pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc")


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@glibc_only
def test_freed_heap_pages_are_given_back() -> None:
    # 64 KB blocks come from the heap (below any mmap threshold); the last one stays
    # allocated, so free() cannot give the pages back by shrinking the heap's top.
    blocks = [np.ones(2**13) for _ in range(1600)]  # 100 MB, every page touched
    keep = blocks.pop()
    before = _resident_mb()
    del blocks
    freed = _resident_mb()
    assert release_freed_memory()
    after = _resident_mb()
    assert freed - after > 50, (before, freed, after)
    assert keep.sum() == 2**13


def test_releases_at_most_once_per_period() -> None:
    now, calls = [0.0], []
    release = PeriodicRelease(
        10.0, clock=lambda: now[0], release=lambda: bool(calls.append(1))
    )
    assert not release()  # not 10 s since it was made
    now[0] = 9.9
    assert not release() and not calls
    now[0] = 10.0
    assert release() and len(calls) == 1
    now[0] = 19.0
    assert not release()
    now[0] = 20.5
    assert release() and len(calls) == 2


def test_the_live_loop_releases_memory_after_each_round(monkeypatch, rng) -> None:
    image = rng.normal(size=(1, 1, 40, 50)).astype(np.float32)
    labels = np.zeros((40, 50), np.uint8)
    labels[2:4, 2:20], labels[30:33, 30:45] = 1, 2
    session = live.LiveSession(image, ("bg", "fg"))
    mailbox = Mailbox()
    mailbox.post_labels(labels)
    order = []
    every_time = functools.partial(
        PeriodicRelease, 0.0, release=lambda: order.append("release")
    )
    monkeypatch.setattr(live, "PeriodicRelease", every_time)
    for event in iter_live(session, mailbox, round_seconds=0.05, rounds=2):
        order.append(type(event).__name__)
    assert order.count("release") == 2
    first = order.index("release")  # after the round's previews, not inside them
    assert order[first - 1] == PredictionUpdate.__name__
    assert order[-1] == "release"
