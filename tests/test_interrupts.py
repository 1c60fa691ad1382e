"""Ctrl-C between steps: held through a step, raised at the next check, never lost."""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from napari_dsparse import large
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.interrupts import interrupts_between_steps, stop_if_interrupted


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler, as a console script starts with."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_waits_for_the_next_check() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_between_steps():
        signal.raise_signal(signal.SIGINT)
        steps.append("the step went on")
        stop_if_interrupted()
        steps.append("past the check")
    assert steps == ["the step went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_the_last_step_stops_at_the_block_end() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts_between_steps():
        signal.raise_signal(signal.SIGINT)
    stop_if_interrupted()  # consumed: raises nothing now


def test_a_ctrl_c_wins_over_an_error_in_the_same_step() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts_between_steps():
        signal.raise_signal(signal.SIGINT)
        raise InputError("a file could not be read")


def test_a_second_ctrl_c_stops_at_once(capsys) -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_between_steps("stopping soon"):
        signal.raise_signal(signal.SIGINT)
        steps.append("held")
        signal.raise_signal(signal.SIGINT)
        steps.append("not reached")
    assert steps == ["held"]
    assert capsys.readouterr().err == "stopping soon\n"


def test_no_ctrl_c_no_interrupt() -> None:
    with interrupts_between_steps():
        stop_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_another_handler_and_other_threads_are_left_alone() -> None:
    def custom(signum, frame) -> None:
        pass

    signal.signal(signal.SIGINT, custom)
    with interrupts_between_steps():
        assert signal.getsignal(signal.SIGINT) is custom
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = []

    def worker() -> None:
        with interrupts_between_steps():
            seen.append(signal.getsignal(signal.SIGINT))
        stop_if_interrupted()  # the main thread's Ctrl-C is not the worker's
        seen.append("the worker went on")

    with pytest.raises(KeyboardInterrupt), interrupts_between_steps():
        signal.raise_signal(signal.SIGINT)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    handler, went_on = seen
    assert handler is not signal.default_int_handler  # the main thread's, untouched
    assert went_on == "the worker went on"


def test_a_ctrl_c_during_a_tile_write_lets_it_land_then_stops(
    make_classifier, rng, tmp_path, monkeypatch
) -> None:
    picture = rng.integers(0, 4000, (70, 90), dtype=np.uint16)
    np.save(tmp_path / "a.npy", picture)
    classifier = make_classifier(as_channels_first(picture), num_classes=2)
    store_tile = large._store_tile
    written = []

    def store_after_a_ctrl_c(store, proba, z, rows, cols) -> None:
        signal.raise_signal(signal.SIGINT)  # pressed while the tile is written
        store_tile(store, proba, z, rows, cols)
        written.append(np.array(store["classes"][z, slice(*rows), slice(*cols)]))

    monkeypatch.setattr(large, "_store_tile", store_after_a_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        large.predict_file(
            classifier, tmp_path / "a.npy", tmp_path / "out.tif", memory=4 * 2**20
        )
    assert len(written) == 1  # the first tile landed whole, and no other began
    assert written[0].min() >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_ctrl_c_while_the_tif_is_written_leaves_nothing(
    make_classifier, rng, tmp_path, monkeypatch
) -> None:
    picture = rng.integers(0, 4000, (70, 90), dtype=np.uint16)
    np.save(tmp_path / "a.npy", picture)
    classifier = make_classifier(as_channels_first(picture), num_classes=2)
    tif_tiles = large._tif_tiles
    streamed = []

    def tiles_after_a_ctrl_c(array, band, tif_tile):
        for index, tile in enumerate(tif_tiles(array, band, tif_tile)):
            if index == 0:
                signal.raise_signal(signal.SIGINT)
            streamed.append(tile.shape)
            yield tile

    monkeypatch.setattr(large, "_tif_tiles", tiles_after_a_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        large.predict_file(
            classifier, tmp_path / "a.npy", tmp_path / "out.tif", memory=4 * 2**20
        )
    assert large.tile_for_memory(classifier, 4 * 2**20) == 16  # bands of 16 rows
    assert len(streamed) == 6  # one band of the 5 x 6 TIFF tiles, then it stopped
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]
