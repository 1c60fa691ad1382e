"""Fixtures of the widget tests."""

from __future__ import annotations

from collections.abc import Callable

import napari
import pytest
from napari.qt.threading import GeneratorWorker

from napari_dsparse import _widget as widget_module

ApplyAndWait = Callable[..., GeneratorWorker]


@pytest.fixture
def apply_and_wait(qtbot, monkeypatch) -> ApplyAndWait:
    """``apply_and_wait(widget, layer, timeout=30_000)``: Apply to layer, then wait
    until its worker has finished.

    ``qtbot.waitSignal(widget.apply_to_layer(layer).finished)`` connects only once
    the worker has started, so it misses ``finished`` when the worker ends first (a
    small layer on a busy machine: CI timed out so). This connects when the worker
    is created, before it starts.
    """
    finished: list[GeneratorWorker] = []
    create_worker = widget_module.create_worker

    def creating(*args, **kwargs) -> GeneratorWorker:
        worker = create_worker(*args, **kwargs)
        worker.finished.connect(lambda: finished.append(worker))
        return worker

    monkeypatch.setattr(widget_module, "create_worker", creating)

    def apply(
        widget, layer: napari.layers.Image, timeout: int = 30_000
    ) -> GeneratorWorker:
        worker = widget.apply_to_layer(layer)
        assert worker is not None
        qtbot.waitUntil(lambda: worker in finished, timeout=timeout)
        return worker

    return apply
