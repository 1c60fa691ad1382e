"""The soak benchmark runs (30 s) so it cannot rot; closing mid-training exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_a_30_second_soak_reports_and_the_process_exits() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
    )
    command = ("benchmarks/soak.py", "--seconds", "30", "--size", "256")
    done = subprocess.run(
        [sys.executable, *command, "--sample-every", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # a hung worker thread after closing would stop the exit
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| worker_stopped_after_close | 1 |" in out
    assert "target no thread leak: met" in out
    assert "| rss_growth_after_warm_up_mb |" in out and "| strokes | " in out
