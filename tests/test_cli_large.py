"""Command line: predict in many tiles, on a cluster; stop on Ctrl-C; export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_dsparse.cli import main
from napari_dsparse.data import as_channels_first
from napari_dsparse.export import load_classifier, save_classifier
from napari_dsparse.predict import labels_and_uncertainty, predict_proba

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _console_sigint() -> None:
    """Ctrl-C as a console gives it: a shell's background job (``make test &``)
    starts with SIGINT ignored, and Python keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def image(rng) -> np.ndarray:
    return rng.integers(0, 4000, (90, 110), dtype=np.uint16)


@pytest.fixture
def model(make_classifier, image, tmp_path) -> Path:
    classifier = make_classifier(as_channels_first(image), num_classes=2, seed=3)
    return save_classifier(classifier, tmp_path / "model.pt")


def _expected_classes(model: Path, image: np.ndarray) -> np.ndarray:
    proba = predict_proba(load_classifier(model), as_channels_first(image))
    return labels_and_uncertainty(proba)[0][0]


def test_predict_a_multi_tile_image_with_little_memory(model, image, tmp_path) -> None:
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(32, 32))
    args = ["predict", str(model), str(tmp_path / "big.tif"), "-o"]
    assert main([*args, str(tmp_path / "out.tif"), "--memory", "4MB", "-q"]) == 0
    classes = tifffile.imread(tmp_path / "out.tif")
    np.testing.assert_array_equal(classes, _expected_classes(model, image))


def test_predict_on_a_local_dask_cluster(model, image, tmp_path) -> None:
    pytest.importorskip("distributed")
    np.save(tmp_path / "big.npy", image)
    args = ["predict", str(model), str(tmp_path / "big.npy"), "-o"]
    out = tmp_path / "out.zarr"
    assert main([*args, str(out), "--memory", "4MB", "--dask", "local", "-q"]) == 0
    import zarr

    classes = zarr.open_group(str(out), mode="r")["classes"][:]  # (Y, X)
    np.testing.assert_array_equal(classes, _expected_classes(model, image))


def test_a_truncated_model_is_one_line_and_exit_2(model, image, tmp_path, capsys):
    model.write_bytes(model.read_bytes()[:300])
    np.save(tmp_path / "a.npy", image)
    code = main(["predict", str(model), str(tmp_path / "a.npy"), "-o", "x.tif"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert "truncated or corrupt" in error


def test_an_unreadable_memory_size(model, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model), "a.tif", "-o", "b.tif", "--memory", "lots"])
    assert exit_info.value.code == 2
    assert "cannot read the memory size" in capsys.readouterr().err


def test_ctrl_c_stops_promptly_and_leaves_no_output(model, rng, tmp_path) -> None:
    np.save(tmp_path / "big.npy", rng.integers(0, 4000, (800, 800), dtype=np.uint16))
    command = [sys.executable, "-m", "napari_dsparse.cli", "predict", str(model)]
    command += [str(tmp_path / "big.npy"), "-o", str(tmp_path / "out.tif")]
    command += ["--memory", "4MB", "-q", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": SRC}
    process = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_console_sigint,
    )
    scratch = tmp_path / ".out.tif.part.zarr"
    deadline = time.monotonic() + 60
    while not scratch.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scratch.exists(), "prediction never started"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, error = process.communicate(timeout=30)
    assert time.monotonic() - start < 10, error
    assert process.returncode == 130
    assert "interrupted" in error
    assert "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy", "model.pt"]


def test_ctrl_c_stops_training_and_writes_the_model(image, tmp_path) -> None:
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 10:40], labels[60:70, 50:90] = 1, 2
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    command = [sys.executable, "-m", "napari_dsparse.cli", "train"]
    command += [str(tmp_path / "image.npy"), str(tmp_path / "labels.npy")]
    command += ["-o", str(tmp_path / "model.pt"), "--seconds", "120", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_console_sigint,
    )
    while not process.stdout.readline().startswith("step"):
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    out, error = process.communicate(timeout=30)
    assert process.returncode == 130, error
    assert "stopped by Ctrl-C" in out and "wrote" in out
    assert "interrupted" in error and "Traceback" not in error
    assert load_classifier(tmp_path / "model.pt").provenance["steps"] >= 1


def test_export_a_bioimageio_package(model, tmp_path, monkeypatch) -> None:
    pytest.importorskip("bioimageio.core")
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "cache"))
    out = tmp_path / "model.zip"
    assert main(["export", str(model), "--bioimageio", str(out)]) == 0
    assert out.stat().st_size > 0
