"""The npe2 manifest is valid and every python_name in it imports."""

from __future__ import annotations

import importlib

import pytest
from npe2 import PluginManifest

PLUGIN = "napari-dsparse"


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution(PLUGIN)


def test_manifest_is_registered_under_the_entry_point(manifest: PluginManifest) -> None:
    assert manifest.name == PLUGIN


def test_manifest_validates_with_imports(manifest: PluginManifest) -> None:
    manifest.validate_imports()


def test_every_python_name_resolves_to_a_callable(manifest: PluginManifest) -> None:
    commands = manifest.contributions.commands or []
    assert commands, "the manifest declares no commands"
    for command in commands:
        module_name, _, attribute = command.python_name.partition(":")
        target = getattr(importlib.import_module(module_name), attribute)
        assert callable(target), command.python_name
