"""Ctrl-C between steps: held through a step, raised at the next check, never lost."""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest
import tifffile

from napari_dsparse import large
from napari_dsparse.data import InputError, as_channels_first
from napari_dsparse.export import load_classifier
from napari_dsparse.interrupts import (
    interrupts_between_steps,
    stop_if_interrupted,
    take_interrupt,
)
from napari_dsparse.samples import coins_sample
from napari_dsparse.workflows import train_from_pairs


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
        assert not take_interrupt()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_taken_ctrl_c_is_the_caller_s_to_handle() -> None:
    with interrupts_between_steps():
        signal.raise_signal(signal.SIGINT)
        assert take_interrupt()
        assert not take_interrupt()  # handled once
    # and the block ends without raising


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


SMALL_MEMORY = 4 * 2**20  # tiles of 16 x 16 pixels for the fast preset


@pytest.fixture
def classifier(make_classifier, rng, tmp_path):
    """A fresh classifier, and a (70, 90) image for it saved as ``a.npy``."""
    picture = rng.integers(0, 4000, (70, 90), dtype=np.uint16)
    np.save(tmp_path / "a.npy", picture)
    return make_classifier(as_channels_first(picture), num_classes=2)


def test_a_ctrl_c_during_a_tile_write_lets_it_land_then_stops(
    classifier, tmp_path, monkeypatch
) -> None:
    store_tile = large._store_tile
    written = []

    def store_after_a_ctrl_c(store, proba, z, rows, cols) -> None:
        signal.raise_signal(signal.SIGINT)  # pressed while the tile is written
        store_tile(store, proba, z, rows, cols)
        written.append(np.array(store["classes"][slice(*rows), slice(*cols)]))  # 2D

    monkeypatch.setattr(large, "_store_tile", store_after_a_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        large.predict_file(
            classifier, tmp_path / "a.npy", tmp_path / "out.tif", memory=SMALL_MEMORY
        )
    assert len(written) == 1  # the first tile landed whole, and no other began
    assert written[0].min() >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_ctrl_c_while_the_tif_is_written_leaves_nothing(
    classifier, tmp_path, monkeypatch
) -> None:
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
            classifier, tmp_path / "a.npy", tmp_path / "out.tif", memory=SMALL_MEMORY
        )
    assert large.tile_for_memory(classifier, SMALL_MEMORY) == 16  # bands of 16 rows
    assert len(streamed) == 6  # one band of the 5 x 6 TIFF tiles, then it stopped
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


@pytest.fixture
def painted(tmp_path) -> list[tuple[str, str]]:
    image, labels = coins_sample()
    tifffile.imwrite(tmp_path / "image.tif", image[:96, :128])
    np.save(tmp_path / "labels.npy", labels[:96, :128])
    return [(str(tmp_path / "image.tif"), str(tmp_path / "labels.npy"))]


def _press_ctrl_c(times: int, reports: list[str]):
    """A report callback that presses Ctrl-C ``times`` times at the first step."""

    def report(message: str) -> None:
        reports.append(message)
        if message.startswith("step") and len(reports) == 2:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)

    return report


def test_ctrl_c_stops_training_and_saves_the_model_so_far(painted, tmp_path) -> None:
    reports: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_from_pairs(
            painted, tmp_path / "model.pt", seconds=60, report=_press_ctrl_c(1, reports)
        )
    model = load_classifier(tmp_path / "model.pt")
    assert model.provenance["steps"] == 1  # pressed as step 1 was reported
    assert "stopped by Ctrl-C: 1 steps" in reports[2]
    assert reports[-1] == f"wrote {tmp_path / 'model.pt'}"
    assert any(message.startswith("class shares") for message in reports)


def test_a_second_ctrl_c_quits_without_saving(painted, tmp_path) -> None:
    reports: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_from_pairs(
            painted, tmp_path / "model.pt", seconds=60, report=_press_ctrl_c(2, reports)
        )
    assert not (tmp_path / "model.pt").exists()
    assert len(reports) == 2
