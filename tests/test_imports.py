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
