"""Fixtures of the widget tests."""

from __future__ import annotations

from collections.abc import Callable

import napari
import pytest
from napari.qt.threading import GeneratorWorker

from napari_dsparse import _widget as widget_module

ApplyAndWait = Callable[..., GeneratorWorker]


@pytest.fixture
def finished_workers(monkeypatch) -> list[GeneratorWorker]:
    """The widget's workers that have finished, each recorded by a connection made
    when the worker is created, before it starts.

    ``qtbot.waitSignal(worker.finished)`` connects only once the worker has
    started, so it misses ``finished`` when the worker ends first (a small layer on
    a busy machine: CI timed out so).
    """
    finished: list[GeneratorWorker] = []
    create_worker = widget_module.create_worker

    def creating(*args, **kwargs) -> GeneratorWorker:
        worker = create_worker(*args, **kwargs)
        worker.finished.connect(lambda: finished.append(worker))
        return worker

    monkeypatch.setattr(widget_module, "create_worker", creating)
    return finished


@pytest.fixture
def apply_and_wait(qtbot, finished_workers) -> ApplyAndWait:
    """``apply_and_wait(widget, layer, timeout=30_000)``: Apply to layer, then wait
    until its worker has finished."""

    def apply(
        widget, layer: napari.layers.Image, timeout: int = 30_000
    ) -> GeneratorWorker:
        worker = widget.apply_to_layer(layer)
        assert worker is not None
        qtbot.waitUntil(lambda: worker in finished_workers, timeout=timeout)
        return worker

    return apply


@pytest.fixture
def update_once_and_wait(qtbot, finished_workers) -> Callable[..., None]:
    """``update_once_and_wait(widget, timeout=30_000)``: press Update once, then
    wait until its worker (a short training, then the prediction) has finished."""

    def update(widget, timeout: int = 30_000) -> None:
        before = widget._worker
        widget.update_button.clicked.emit()
        worker = widget._worker
        assert worker is not None and worker is not before, "Update started nothing"
        qtbot.waitUntil(lambda: worker in finished_workers, timeout=timeout)

    return update
