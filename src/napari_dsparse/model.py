"""A trained pixel classifier: network, class names and input normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dsparse.data import Normalization, read_window
from napari_dsparse.nets import (
    DEFAULT_PRESET,
    PRESETS,
    ClassPrior,
    FeatureScale,
    Preset,
    build_patch_net,
)
from napari_dsparse.sparse import DenseNet, to_dense

__all__ = ["DEFAULT_COLORS", "Classifier", "pick_device"]

Color = tuple[float, float, float, float]  # RGBA in [0, 1]

# Matplotlib's tab10, in RGBA: distinct for the first ten classes, then repeated.
_TAB10 = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd")
_TAB10 += ("8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf")
DEFAULT_COLORS: tuple[Color, ...] = tuple(
    (int(h[0:2], 16) / 255, int(h[2:4], 16) / 255, int(h[4:6], 16) / 255, 1.0)
    for h in _TAB10
)


def _sample_windows(
    image: np.ndarray,
    normalization: Normalization,
    z: int,
    halo: int,
    side: int = 128,
    per_axis: int = 3,
) -> list[np.ndarray]:
    """Normalised windows (with halos) on a regular grid over slice ``z``."""
    height, width = image.shape[-2:]
    rows = np.unique(np.linspace(0, max(height - side, 0), per_axis).astype(int))
    cols = np.unique(np.linspace(0, max(width - side, 0), per_axis).astype(int))
    return [
        read_window(
            image,
            normalization,
            z,
            (r, min(r + side, height)),
            (c, min(c + side, width)),
            halo,
        )
        for r in rows
        for c in cols
    ]


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA, then Apple MPS, then the CPU."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(
                f"unknown device {requested!r}: give cpu, cuda, cuda:1 or mps"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("MPS was requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Classifier:
    """A patch network, its exact dense form and what is needed to apply it.

    ``patch_net`` and ``dense`` share parameters: training one trains the other.
    ``provenance`` holds plain data about training (steps, seed, version);
    ``class_colors`` one RGBA colour (floats in [0, 1]) per class, for display.
    """

    preset: Preset
    in_channels: int
    class_names: tuple[str, ...]
    normalization: Normalization
    patch_net: nn.Sequential
    dense: DenseNet = field(init=False)
    provenance: dict[str, Any] = field(default_factory=dict)
    class_colors: tuple[Color, ...] = ()

    def __post_init__(self) -> None:
        self.dense = to_dense(self.patch_net)

    def colors(self) -> tuple[Color, ...]:
        """``class_colors``, completed from :data:`DEFAULT_COLORS` for every class."""
        given = tuple(tuple(map(float, color)) for color in self.class_colors)
        missing = range(len(given), self.num_classes)
        return given[: self.num_classes] + tuple(
            DEFAULT_COLORS[k % len(DEFAULT_COLORS)] for k in missing
        )

    @classmethod
    def create(
        cls,
        in_channels: int,
        class_names: tuple[str, ...],
        normalization: Normalization,
        preset: Preset | str = DEFAULT_PRESET,
        seed: int | None = None,
    ) -> Classifier:
        """A freshly initialised classifier (seeded if ``seed`` is given)."""
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(
                    f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}"
                )
            preset = PRESETS[preset]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            net = build_patch_net(preset, in_channels, len(class_names))
        return cls(preset, in_channels, tuple(class_names), normalization, net)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def halo(self) -> int:
        return self.dense.halo

    @property
    def patch_size(self) -> int:
        return self.dense.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.patch_net.parameters()).device

    def with_classes(self, class_names: tuple[str, ...]) -> Classifier:
        """A copy with more classes: learned weights kept, new outputs initialised."""
        if len(class_names) < self.num_classes:
            raise ValueError("a classifier can gain classes, not lose them")
        grown = Classifier.create(
            self.in_channels, class_names, self.normalization, self.preset
        ).to(self.device)
        new_state = grown.patch_net.state_dict()
        for name, value in self.patch_net.state_dict().items():
            new_state[name][: value.shape[0]] = value  # the head gains rows only
        grown.patch_net.load_state_dict(new_state)
        grown.provenance = dict(self.provenance)
        grown.class_colors = self.class_colors
        return grown

    def feature_scale(self) -> FeatureScale | None:
        """The network's feature standardisation, if its preset has one."""
        return next((m for m in self.patch_net if isinstance(m, FeatureScale)), None)

    def class_prior(self) -> ClassPrior | None:
        """The network's change of class prior (absent from custom networks)."""
        return next((m for m in self.patch_net if isinstance(m, ClassPrior)), None)

    def fit_feature_scale(
        self, image: np.ndarray, normalization: Normalization | None = None
    ) -> None:
        """Fit the feature standardisation to ``(C, Z, Y, X)`` ``image`` once.

        A no-op when the preset has none or it is already fitted (a trained or
        loaded model keeps its own). Statistics come from up to 3 x 3 windows of
        128 x 128 pixels spread over the middle slice, so huge images cost no more
        than small ones.
        """
        scale = self.feature_scale()
        if scale is None or scale.fitted.item():
            return
        normalization = normalization or self.normalization.for_image(image)
        layers = list(self.patch_net)
        trunk = nn.Sequential(*layers[: layers.index(scale)])
        z = image.shape[1] // 2
        with torch.no_grad():
            features = [
                trunk(torch.from_numpy(window).to(self.device)[None])
                for window in _sample_windows(image, normalization, z, self.halo)
            ]
        scale.fit(torch.cat([f.flatten(2) for f in features], 2))

    def to(self, device: torch.device | str) -> Classifier:
        """Move the network to ``device`` in place; returns ``self``."""
        self.patch_net.to(device)
        return self
