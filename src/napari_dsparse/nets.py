"""Patch-classifier presets, built as ``nn.Sequential`` patch networks.

Every preset starts with a fixed bank of multi-scale Gaussian-derivative filters (the
features that ilastik-style pixel classifiers use; a grouped convolution, so the
sparse-kernel conversion stays exact), then a 1 x 1 layer that mixes them per pixel,
then strided 3 x 3 convolutions for context and a fully connected head. Strided
convolutions (not max pooling) keep the centre pixel's position inside each cell, so
thin structures one or two pixels wide stay separable. A preset without context
layers (``pixel``, the default) learns a per-pixel classifier on the filter bank,
like the random forests of ilastik and APOC: its only context is the fixed filters'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from napari_dsparse.sparse import DenseNet, PixelwiseModule, to_dense

__all__ = [
    "PRESETS",
    "ClassPrior",
    "FeatureScale",
    "Preset",
    "build_patch_net",
    "filter_bank",
    "macs_per_pixel",
]


@dataclass(frozen=True)
class Preset:
    """Architecture of a patch classifier.

    ``P`` and MACs per pixel follow from these numbers; ``describe_presets()`` lists
    them as measured from the built networks.
    """

    name: str
    filter_scales: tuple[float, ...]  # Gaussian sigmas of the fixed filter bank
    filter_size: int  # odd support of the filter bank; covers about 2.5 sigma
    mix_width: int  # channels of the per-pixel 1 x 1 layer and the first 3 x 3
    context_widths: tuple[int, ...]  # one stride-2 3 x 3 convolution per entry
    # (none: no learned context, every learned layer is 1 x 1)
    head_width: int  # hidden units of the fully connected (or 1 x 1) head
    summary: str
    invariants: bool = True  # append gradient magnitude and Hessian eigenvalues
    standardize: bool = True  # fixed per-feature shift and scale, fitted to the image
    # Factor on the invariants as appended. Without standardisation it sets how soon
    # the first layer learns them against the smoothed intensities; with it, none.
    invariant_gain: float = 1.0


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "pixel",
            filter_scales=(1.0, 2.0, 3.5),
            filter_size=15,
            mix_width=32,
            context_widths=(),
            head_width=32,
            summary="default: per-pixel on the filter bank, like a random forest's "
            "features; 100 steps/s on 2 CPU cores",
            # Unstandardised features: the first layer learns the large smoothed
            # intensities first and the small derivative responses slowly, which
            # generalises better from few strokes (bench_training.py, 3000 steps,
            # raw vs standardised: IHC 0.87 vs 0.82, membranes 0.78 vs 0.74,
            # blobs 0.95 vs 0.94; see docs/benchmarks.md).
            standardize=False,
            # Invariants at twice their size are learned sooner: at 3000 steps,
            # summed over 3 seeds, textures +0.084, coins +0.012, membranes and
            # IHC level, blobs -0.004 (docs/benchmarks.md, session 17).
            invariant_gain=2.0,
        ),
        Preset(
            "fast",
            filter_scales=(1.0, 2.0, 3.5),
            filter_size=15,
            mix_width=24,
            context_widths=(32, 32),
            head_width=64,
            summary="learned context: textures and objects by their surroundings; "
            "13 steps/s on 2 CPU cores",
        ),
        Preset(
            "wide",
            filter_scales=(1.0, 2.0, 4.0),
            filter_size=19,
            mix_width=48,
            context_widths=(64, 64, 64),
            head_width=128,
            summary="more context and capacity, for a GPU",
        ),
    )
}
DEFAULT_PRESET = "pixel"

_FINAL_MAP_SIDE = 3  # the head sees 3 x 3 cells of the coarsest stride
_DERIVATIVE_ORDERS = ((0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0))  # (dy, dx)


def _gaussian_derivative_1d(sigma: float, order: int, size: int) -> torch.Tensor:
    """Sampled derivative of a normalised Gaussian, scaled by ``sigma ** order``."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    if order == 1:
        g = -x / sigma**2 * g
    elif order == 2:
        g = (x**2 / sigma**4 - 1 / sigma**2) * g
        g -= g.mean()  # second derivatives must not respond to a constant
    return g * sigma**order


def filter_bank(scales: tuple[float, ...], size: int) -> torch.Tensor:
    """Identity plus six Gaussian derivatives per scale: ``(1 + 6 S, size, size)``."""
    identity = torch.zeros(size, size, dtype=torch.float64)
    identity[size // 2, size // 2] = 1.0
    filters = [identity]
    for sigma in scales:
        for dy, dx in _DERIVATIVE_ORDERS:
            gy = _gaussian_derivative_1d(sigma, dy, size)
            gx = _gaussian_derivative_1d(sigma, dx, size)
            filters.append(torch.outer(gy, gx))
    return torch.stack(filters).float()


def _fixed_filters(in_channels: int, preset: Preset) -> nn.Conv2d:
    bank = filter_bank(preset.filter_scales, preset.filter_size)  # (F, k, k)
    conv = nn.Conv2d(
        in_channels,
        in_channels * bank.shape[0],
        preset.filter_size,
        groups=in_channels,
        bias=False,
    )
    with torch.no_grad():
        conv.weight.copy_(bank.repeat(in_channels, 1, 1).unsqueeze(1))
    conv.weight.requires_grad_(False)
    return conv


class FilterInvariants(PixelwiseModule):
    """Rotation-invariant features of the filter bank, appended per pixel.

    For every input channel and scale: gradient magnitude and the two Hessian
    eigenvalues (the structure-tensor-free part of what ilastik computes), times
    ``gain``. They combine the derivative responses *at the same pixel* only, so the
    dense network stays exact; they let a thin ridge or edge be recognised whatever
    its direction.
    """

    def __init__(self, in_channels: int, num_scales: int, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = float(gain)
        per_channel = 1 + len(_DERIVATIVE_ORDERS) * num_scales
        bases = [
            c * per_channel + 1 + len(_DERIVATIVE_ORDERS) * s
            for c in range(in_channels)
            for s in range(num_scales)
        ]
        # offsets of Gx, Gy, Gxx, Gxy, Gyy after G within each scale's block
        for name, offset in zip(
            ("gx", "gy", "gxx", "gxy", "gyy"), range(1, 6), strict=True
        ):
            self.register_buffer(
                f"_{name}", torch.tensor([b + offset for b in bases]), persistent=False
            )
        self.extra = 3 * len(bases)

    def out_channels(self, in_channels: int) -> int:
        return in_channels + self.extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C', H, W)
        gx, gy = x[:, self._gx], x[:, self._gy]
        gxx, gxy, gyy = x[:, self._gxx], x[:, self._gxy], x[:, self._gyy]
        gradient = torch.sqrt(gx * gx + gy * gy + 1e-12)
        half_trace = 0.5 * (gxx + gyy)
        radius = torch.sqrt(0.25 * (gxx - gyy) ** 2 + gxy * gxy + 1e-12)
        invariants = torch.cat([gradient, half_trace + radius, half_trace - radius], 1)
        return torch.cat([x, self.gain * invariants], 1)


class FeatureScale(PixelwiseModule):
    """Fixed standardisation of the filter-bank features: ``(x - shift) * scale``.

    The filter responses differ in offset and spread by orders of magnitude (a
    smoothed intensity around 0.5, a second derivative around 0.01). Adam moves
    every weight by about the same amount per step, so the trainable layer after
    the bank learns fast only when its inputs are standardised. The buffers are
    fitted once to the image a model is first trained on
    (:meth:`napari_dsparse.model.Classifier.fit_feature_scale`), then frozen and
    saved with the model; ``fitted`` records that this happened. Per pixel, so the
    dense network stays exact.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("fitted", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, *spatial)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.shift.view(view)) * self.scale.view(view)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """Standardise ``(N, C, *spatial)`` features to zero mean, unit spread."""
        per_channel = features.transpose(0, 1).flatten(1)  # (C, pixels)
        self.shift.copy_(per_channel.mean(1))
        self.scale.copy_(1 / per_channel.std(1).clamp(min=1e-3))
        self.fitted.fill_(1.0)


class ClassPrior(PixelwiseModule):
    """Adds ``log_ratio[k]`` to class ``k``'s logit: a change of class prior.

    Training weighs the painted classes about equally (label-histogram
    equalisation) and paints them in other shares than the image holds them, so the
    network learns posteriors under the prior of its batches. Adding ``log(image
    prior / training prior)`` turns them into posteriors under the image's own
    prior (Saerens, Latinne & Decaestecker, Neural Computation 14, 2002).
    :meth:`napari_dsparse.train.Trainer.fit_class_prior` estimates it; training
    subtracts it again, so it never changes a gradient. Zero (no change) until
    fitted; saved with the model.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("log_ratio", torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, K, *spatial) or (N, K)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x + self.log_ratio.view(view).to(x.dtype)


def build_patch_net(
    preset: Preset | str, in_channels: int, num_classes: int
) -> nn.Sequential:
    """The patch classifier of ``preset`` for the given inputs and classes."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    filters = _fixed_filters(in_channels, preset)
    layers: list[nn.Module] = [filters]
    features = filters.out_channels
    if preset.invariants:
        invariants = FilterInvariants(
            in_channels, len(preset.filter_scales), preset.invariant_gain
        )
        layers.append(invariants)
        features = invariants.out_channels(features)
    if preset.standardize:
        layers.append(FeatureScale(features))
    if not preset.context_widths:
        head = _pixel_head(features, preset, num_classes)
        return nn.Sequential(*layers, *head, ClassPrior(num_classes))
    layers += [
        nn.Conv2d(features, preset.mix_width, 1),
        nn.ReLU(),
        nn.Conv2d(preset.mix_width, preset.mix_width, 3),
        nn.ReLU(),
    ]
    width = preset.mix_width
    for next_width in preset.context_widths:
        layers += [nn.Conv2d(width, next_width, 3, stride=2), nn.ReLU()]
        width = next_width
    side = _FINAL_MAP_SIDE
    layers += [
        nn.Flatten(),
        nn.Linear(width * side * side, preset.head_width),
        nn.ReLU(),
        nn.Linear(preset.head_width, num_classes),
        ClassPrior(num_classes),
    ]
    return nn.Sequential(*layers)


def _pixel_head(features: int, preset: Preset, num_classes: int) -> list[nn.Module]:
    """A per-pixel perceptron: 1 x 1 convolutions only."""
    return [
        nn.Conv2d(features, preset.mix_width, 1),
        nn.ReLU(),
        nn.Conv2d(preset.mix_width, preset.head_width, 1),
        nn.ReLU(),
        nn.Conv2d(preset.head_width, num_classes, 1),
    ]


def macs_per_pixel(patch_net: nn.Sequential) -> int:
    """Multiply-accumulates per output pixel of the dense network."""
    return sum(
        module.weight.numel()
        for module in patch_net.modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    )


def describe_presets(in_channels: int = 1, num_classes: int = 2) -> list[str]:
    """One line per preset: name, P, MACs per pixel and summary."""
    lines = []
    for preset in PRESETS.values():
        net = build_patch_net(preset, in_channels, num_classes)
        dense: DenseNet = to_dense(net)
        macs = macs_per_pixel(net)
        lines.append(
            f"{preset.name}: P = {dense.patch_size}, {macs / 1e3:.0f} k MACs/pixel "
            f"({in_channels} channel{'s' * (in_channels > 1)}); {preset.summary}"
        )
    return lines
