"""The core stays Qt-free: importing it never pulls napari, Qt or magicgui."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import napari_dsparse

GUI_MODULES = ("qtpy", "napari", "magicgui", "PyQt6", "PySide6", "PyQt5")


def core_module_names() -> list[str]:
    """Every public (non-underscore) module of the package, found on disk."""
    names = ["napari_dsparse"]
    for info in pkgutil.iter_modules(napari_dsparse.__path__):
        if not info.name.startswith("_"):
            names.append(f"napari_dsparse.{info.name}")
    return names


def test_core_modules_exist_beyond_the_root() -> None:
    assert "napari_dsparse.cli" in core_module_names()


def test_core_import_leaves_gui_modules_unloaded() -> None:
    imports = "; ".join(f"import {name}" for name in core_module_names())
    probe = (
        f"import sys; {imports}; "
        f"print(','.join(m for m in {GUI_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"core imports pulled: {result.stdout}"


EARLY_IMPORT_PROBE = """
import sys
import numpy as np
from napari_dsparse import train
from napari_dsparse.data import Normalization
from napari_dsparse.model import Classifier

print("before", "torch._dynamo" in sys.modules)
train.import_optimizer_early()
thread = train._early_import
print("thread", thread.name, thread.is_alive())
image = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
labels = np.zeros((32, 32), np.uint8)
labels[2:6, 2:20], labels[20:24, 8:30] = 1, 2
classifier = Classifier.create(1, ("a", "b"), Normalization.from_image(image), "fast")
trainer = train.Trainer(classifier, image, labels)
trainer.step()
print("after", "torch._dynamo" in sys.modules)
"""


def test_the_optimizer_import_starts_early_in_a_background_thread() -> None:
    """``import_optimizer_early`` imports ``torch._dynamo`` off the calling thread,
    and a trainer built while it runs still trains."""
    result = subprocess.run(
        [sys.executable, "-c", EARLY_IMPORT_PROBE],
        capture_output=True,
        text=True,
        check=True,
    )
    before, thread, after = result.stdout.splitlines()
    assert before == "before False"
    assert thread == "thread napari-dsparse early import True"
    assert after == "after True"
