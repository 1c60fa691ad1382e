"""The headless demo runs the live loop and writes its results."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_dsparse.cli import main
from napari_dsparse.demo import mean_iou
from napari_dsparse.export import load_classifier
from napari_dsparse.samples import coins_sample, coins_truth


def test_mean_iou() -> None:
    truth = np.array([1, 1, 2, 2])
    assert mean_iou(truth, truth) == 1.0
    assert mean_iou(truth, np.array([1, 2, 2, 2])) == (0.5 + 2 / 3) / 2


def test_derived_truth_agrees_with_the_starter_scribbles() -> None:
    _, scribbles = coins_sample()
    truth = coins_truth()
    painted = scribbles > 0
    assert (truth[painted] == scribbles[painted]).mean() > 0.99


def test_headless_demo_writes_prediction_and_model(tmp_path, capsys) -> None:
    code = main(
        [
            "demo",
            "--headless",
            "-o",
            str(tmp_path),
            "--rounds",
            "2",
            "--round-seconds",
            "0.5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "round 2/2" in out and "mean IoU" in out
    prediction = tifffile.imread(tmp_path / "prediction.tif")
    assert prediction.shape == (303, 384) and prediction.min() >= 1
    scribbles = tifffile.imread(tmp_path / "scribbles.tif")
    assert (scribbles > 0).sum() > (coins_sample()[1] > 0).sum()  # corrections added
    assert load_classifier(tmp_path / "model.pt").class_names == ("background", "coin")


@pytest.mark.parametrize("platform", [None, "xcb", "wayland"])
def test_the_demo_without_a_display_says_what_to_do(
    monkeypatch, capsys, platform
) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    if platform is not None:
        monkeypatch.setenv("QT_QPA_PLATFORM", platform)
    assert main(["demo"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--headless" in error and "xvfb-run" in error
