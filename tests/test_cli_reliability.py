"""The command line on bad input and unwritable outputs: one line, non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_dsparse import workflows
from napari_dsparse.cli import main
from napari_dsparse.train import Trainer, TrainingDiverged


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def strokes(tmp_path):
    labels = np.zeros((40, 40), np.uint8)
    labels[2:4, 2:20], labels[30:33, 5:25] = 1, 2
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "labels.npy"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((40, 40), 9, np.uint16), "nothing to tell classes apart"),
        (np.where(np.eye(40) > 0, np.inf, 0.5), "image.npy: the image contains NaN"),
        (np.zeros((0, 40, 40), np.uint8), "image.npy: the image has 0 planes"),
    ],
    ids=["constant", "infinite", "no planes"],
)
def test_train_refuses_untrainable_images(capsys, tmp_path, strokes, image, message):
    np.save(tmp_path / "image.npy", image)
    code, err = _run(
        capsys, "train", tmp_path / "image.npy", strokes, "-o", tmp_path / "m.pt"
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "m.pt").exists()


def test_a_missing_labels_file_is_named_once(capsys, tmp_path) -> None:
    np.save(tmp_path / "image.npy", np.random.default_rng(0).normal(size=(40, 40)))
    labels = tmp_path / "missing.npy"
    code, err = _run(capsys, "train", tmp_path / "image.npy", labels, "-o", "m.pt")
    assert code == 2 and err.count(str(labels)) == 1 and "does not exist" in err


def test_train_to_an_unwritable_path_fails_in_one_line(capsys, tmp_path, strokes):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "image.npy", rng.normal(size=(40, 40)).astype(np.float32))
    (tmp_path / "taken").mkdir()  # a folder where the model file should go
    code, err = _run(
        capsys,
        *("train", tmp_path / "image.npy", strokes),
        *("-o", tmp_path / "taken", "--steps", "2"),
    )
    assert code == 2 and "taken is a folder" in err and err.count("\n") == 1
    assert list((tmp_path / "taken").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image.npy",
        "labels.npy",
        "taken",
    ]


def test_a_model_too_large_to_write_is_one_line_and_leaves_nothing(tmp_path, strokes):
    # The kernel refuses writes past 8 KB (RLIMIT_FSIZE), as a full disk refuses
    # them; torch's own file writer turned that into a RuntimeError traceback.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "image.npy", rng.normal(size=(40, 40)).astype(np.float32))
    limited = (
        "import resource, signal, sys\n"
        "from napari_dsparse.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", "image.npy", "labels.npy", "-o", "m.pt", "--steps", "2"]
    done = subprocess.run(
        [sys.executable, "-c", limited, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "napari-dsparse train: error: cannot write m.pt: File too large"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy", "labels.npy"]


def _training_files(tmp_path, strokes):
    image = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", np.load(strokes))
    strokes.unlink()  # labels.npy would share its name with labels.tif
    return tmp_path / "image.tif", tmp_path / "labels.tif"


@pytest.mark.parametrize("victim", ["image", "labels", "link to labels"])
def test_train_never_writes_the_model_over_its_inputs(
    capsys, tmp_path, strokes, victim
) -> None:
    image, labels = _training_files(tmp_path, strokes)
    output = {"image": image, "labels": tmp_path / "." / "labels.tif"}.get(victim)
    if output is None:
        output = tmp_path / "link.tif"
        output.symlink_to(labels)
    before = image.read_bytes(), labels.read_bytes()
    code, err = _run(capsys, "train", image, labels, "-o", output, "--steps", "2")
    assert code == 2 and "would overwrite the input" in err and err.count("\n") == 1
    assert (image.read_bytes(), labels.read_bytes()) == before


@pytest.mark.parametrize(
    ("folder", "reason"), [("missing", "does not exist"), ("a file", "is a file")]
)
def test_train_checks_the_models_folder_before_training(
    capsys, tmp_path, strokes, monkeypatch, folder, reason
) -> None:
    image, labels = _training_files(tmp_path, strokes)
    (tmp_path / "a file").write_text("not a folder")
    monkeypatch.setattr(Trainer, "step", _no_training)
    output = tmp_path / folder / "m.pt"
    code, err = _run(capsys, "train", image, labels, "-o", output, "--seconds", "60")
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write {output}: folder {tmp_path / folder} {reason}" in err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (".", "is a folder; give the model a file name, such as"),
        (
            "model.npy",
            "a model named model.npy would pass for an image; name it model.pt",
        ),
        ("model.TIF", "would pass for an image"),
        ("model.zarr", "would pass for an image"),
    ],
)
def test_train_refuses_a_model_name_it_cannot_or_should_not_write(
    capsys, tmp_path, strokes, monkeypatch, name, message
) -> None:
    image, labels = _training_files(tmp_path, strokes)
    monkeypatch.setattr(Trainer, "step", _no_training)
    output = tmp_path / name
    code, err = _run(capsys, "train", image, labels, "-o", output, "--seconds", "60")
    assert code == 2 and err.count("\n") == 1 and message in err
    assert name == "." or not output.exists()


def _no_training(self):
    raise AssertionError("trained before the output folder was checked")


def test_predict_never_writes_over_its_inputs(capsys, tmp_path, strokes) -> None:
    image, labels = _training_files(tmp_path, strokes)
    model = tmp_path / "m.pt"
    assert _run(capsys, "train", image, labels, "-o", model, "--steps", "2")[0] == 0
    shutil.copy(image, tmp_path / "image_uncertainty.tif")
    os.link(image, tmp_path / "hard link.tif")
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    for argv in (
        (image, "-o", image),  # the classes over the image
        (image, "-o", tmp_path / "hard link.tif"),  # the same file by another name
        (tmp_path, "-o", tmp_path),  # a folder predicted into itself
        (tmp_path / "image_uncertainty.tif", "-o", image, "--uncertainty"),
    ):
        code, err = _run(capsys, "predict", model, *argv, "-q")
        assert code == 2 and "would overwrite the input" in err, argv
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("folder", "reason"), [("missing", "does not exist"), ("a file", "is a file")]
)
def test_predict_checks_the_results_folder_before_loading_the_model(
    capsys, tmp_path, strokes, monkeypatch, folder, reason
) -> None:
    image, labels = _training_files(tmp_path, strokes)
    model = tmp_path / "m.pt"
    assert _run(capsys, "train", image, labels, "-o", model, "--steps", "2")[0] == 0
    (tmp_path / "a file").write_text("not a folder")

    def no_loading(*_args, **_kwargs):
        raise AssertionError("loaded the model before the output folder was checked")

    monkeypatch.setattr(workflows, "load_classifier", no_loading)
    output = tmp_path / folder / "a.tif"
    code, err = _run(capsys, "predict", model, image, "-o", output, "-q")
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write {output}: folder {tmp_path / folder} {reason}" in err
    assert not (tmp_path / "missing").exists()


def test_divergence_is_one_line_and_writes_no_model(
    capsys, tmp_path, strokes, monkeypatch
) -> None:
    def diverge(_trainer):
        raise TrainingDiverged("the loss became nan at step 1")

    monkeypatch.setattr(Trainer, "step", diverge)
    image, labels = _training_files(tmp_path, strokes)
    code, err = _run(capsys, "train", image, labels, "-o", tmp_path / "m.pt")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "training diverged (the loss became nan at step 1); no model" in err
    assert not (tmp_path / "m.pt").exists()


def test_a_time_series_with_a_channel_axis_trains(capsys, tmp_path) -> None:
    rng = np.random.default_rng(0)
    series = rng.normal(size=(2, 3, 24, 24, 1)).astype(np.float32)  # T, Z, Y, X, C
    labels = np.zeros((2, 3, 24, 24), np.uint8)  # T, Z, Y, X
    labels[1, 1, 2:4, 2:20], labels[1, 1, 20:22, 3:20] = 1, 2
    np.save(tmp_path / "series.npy", series)
    np.save(tmp_path / "labels.npy", labels)
    code, err = _run(
        capsys,
        *("train", tmp_path / "series.npy", tmp_path / "labels.npy"),
        *("-o", tmp_path / "m.pt", "--steps", "2", "--channel-axis", "-1"),
    )
    assert code == 0, err
