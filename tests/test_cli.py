"""Command-line basics: version, help, budgets and output into a closed pipe."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_dsparse import __version__
from napari_dsparse.cli import main


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"napari-dsparse {__version__}"


def test_console_script_help_lists_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_dsparse.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in result.stdout


def test_missing_subcommand_is_an_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (("--steps", "0"), "must be above 0"),
        (("--steps", "2.5"), "expected a whole number"),
        (("--seconds", "-1"), "must be above 0"),
        (("--seconds", "nan"), "must be above 0"),
        (("--seed", "-1"), "must be from 0 to 4294967295"),
        (("--seed", str(2**32)), "must be from 0 to 4294967295"),
    ],
)
def test_budgets_and_seeds_out_of_range_are_usage_errors(
    capsys, tmp_path, budget, message
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["train", "image.tif", "labels.tif", "-o", str(tmp_path / "m.pt"), *budget]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--rounds", "0"), "must be above 0"),
        (("--round-seconds", "-1"), "must be a finite number above 0"),
        (("--round-seconds", "inf"), "must be a finite number above 0"),
    ],
)
def test_the_headless_demo_refuses_empty_or_endless_rounds(
    capsys, tmp_path, option, message
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--headless", "-o", str(tmp_path / "demo"), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_training_piped_into_a_reader_that_left_still_writes_the_model(
    tmp_path,
) -> None:
    """``train ... | head -1``: the reader leaves; the model must still be written."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "image.npy", rng.normal(size=(32, 32)).astype(np.float32))
    labels = np.zeros((32, 32), np.uint8)
    labels[2:4, 2:20], labels[20:22, 3:20] = 1, 2
    np.save(tmp_path / "labels.npy", labels)
    command = [sys.executable, "-m", "napari_dsparse.cli", "train"]
    command += [str(tmp_path / name) for name in ("image.npy", "labels.npy")]
    command += ["-o", str(tmp_path / "m.pt"), "--steps", "20"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # before the first line is printed
    error = process.stderr.read()
    assert process.wait(timeout=120) == 0, error
    assert error == "" and (tmp_path / "m.pt").is_file()
