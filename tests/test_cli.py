"""Command-line basics: version and help."""

from __future__ import annotations

import subprocess
import sys

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
