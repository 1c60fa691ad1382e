"""d-regularly sparse kernels: a patch classifier becomes an exact dense network.

A patch network ``f`` maps a P x P patch (P x P x P in 3D) to the class scores of its
centre pixel. :func:`to_dense` removes every stride and multiplies the dilation of
each later kernel by it (Li, Zhao & Wang 2014), turns each ``Linear`` into a dilated
convolution over the remaining map, and runs everything at stride 1. The resulting
:class:`DenseNet` maps a whole image to a score map in one pass, and every pixel's
score equals ``f`` applied to the patch centred on it, exactly. It holds the very
modules of the patch network, so both share their parameters.

Two exact execution strategies exist:

- ``"dilated"``: native dilated convolution and max pooling (average pooling as a
  sum of dilated shifts), stride 1 throughout.
- ``"space_to_batch"``: after each stride-``s`` layer the ``s x s`` phase offsets are
  folded into the batch dimension ("shift and stitch"); every layer then runs
  undilated on smaller maps, and the phases are unfolded at the end.

:func:`patchwise` is the independent patch-by-patch reference with the same
semantics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "DenseNet",
    "PixelwiseModule",
    "Strategy",
    "choose_strategy",
    "iter_patches",
    "patchwise",
    "to_dense",
]

Strategy = Literal["auto", "dilated", "space_to_batch"]
OpKind = Literal["conv", "max", "avg", "pointwise"]


class PixelwiseModule(nn.Module):
    """Base of modules that map each pixel's channel vector on its own.

    Such a module may change the number of channels (say so in
    :meth:`out_channels`) but must never mix pixels: then it is the same on a
    patch's feature map and on a dense map, and the conversion stays exact. After a
    ``Linear`` it sees a patch's ``(N, F)`` features and the dense ``(N, F, *map)``
    ones, so its ``forward`` must act on axis 1 of either.
    """

    def out_channels(self, in_channels: int) -> int:
        """Channels of the output for ``in_channels`` input channels."""
        return in_channels


# Element-wise layers: identical on a patch's features and on a dense map.
_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    _DropoutNd,  # identity in eval mode, where dense == patch-by-patch holds
)
# Normalisation mixes values across pixels, channels or the batch: never exact.
_NORMS: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# Above this fraction of masked pixels, DenseNet.pixels runs the Linear head densely:
# gathering f x f features per pixel then costs more memory than it saves work.
_SPARSE_HEAD_MAX = 0.25
_CONVS = {nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOLS = {nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOLS = {nn.AvgPool2d: 2, nn.AvgPool3d: 3}


@dataclass(frozen=True)
class _Op:
    """One layer of the dense network, with its patch-network geometry."""

    kind: OpKind
    module: nn.Module
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()  # the layer's own dilation in the patch network
    groups: int = 1
    weight_shape: tuple[int, ...] | None = None  # Linear: view as (O, C, *f)

    def weight(self) -> torch.Tensor:
        """The (possibly reshaped) weight, a view of the shared parameter."""
        w = self.module.weight
        return w if self.weight_shape is None else w.view(self.weight_shape)


@dataclass(frozen=True)
class _Plan:
    """Everything :class:`DenseNet` needs: ops and the patch geometry."""

    ops: tuple[_Op, ...]
    ndim: int
    in_channels: int
    num_classes: int
    patch_size: int
    final_map: int  # side f of the map the first Linear flattens (1 without one)
    head: int  # index in ops of the first Linear; without one, of the per-pixel
    # tail (the 1 x 1 convolutions and pixel-wise layers that end the network)
    total_stride: tuple[int, ...]  # product of all strides per axis

    @property
    def trunk_patch(self) -> tuple[int, ...]:
        """Receptive field of the layers before the first Linear, per axis."""
        return tuple(
            self.patch_size - d * (self.final_map - 1) for d in self.total_stride
        )


@dataclass
class _Parser:
    """Walks a patch network, checking each layer and collecting ops."""

    ops: list[_Op] = field(default_factory=list)
    ndim: int | None = None
    in_channels: int | None = None
    channels: int | None = None  # channels of the current spatial map
    features: int | None = None  # feature count once flattened
    final_map: int | None = None  # map size the first Linear consumes

    def fail(self, name: str, module: nn.Module, reason: str) -> ValueError:
        return ValueError(f"layer {name} ({type(module).__name__}): {reason}")

    def set_ndim(self, name: str, module: nn.Module, ndim: int) -> None:
        if self.features is not None:
            raise self.fail(name, module, "spatial layers must come before Flatten")
        if self.ndim is not None and self.ndim != ndim:
            raise self.fail(name, module, f"mixes {ndim}D with {self.ndim}D layers")
        self.ndim = ndim

    def add(self, name: str, module: nn.Module) -> None:
        if isinstance(module, _NORMS):
            raise self.fail(
                name,
                module,
                "normalisation layers are not supported: they mix pixels of "
                "different patches, so dense and patch-by-patch results differ; "
                "remove it (or fold it into the preceding convolution)",
            )
        for kinds, add in (
            (_CONVS, self.add_conv),
            (_MAXPOOLS, self.add_pool),
            (_AVGPOOLS, self.add_pool),
        ):
            if type(module) in kinds:
                self.set_ndim(name, module, kinds[type(module)])
                add(name, module)
                return
        if isinstance(module, nn.Linear):
            self.add_linear(name, module)
        elif isinstance(module, nn.Flatten):
            self.add_flatten(name, module)
        elif isinstance(module, _POINTWISE):
            self.ops.append(_Op("pointwise", module))
        elif isinstance(module, PixelwiseModule):
            if self.features == -1:
                # between Flatten and the first Linear a patch's features are a
                # flattened map, not one vector per pixel
                message = "pixel-wise layers cannot sit between Flatten and Linear"
                raise self.fail(name, module, message)
            self.ops.append(_Op("pointwise", module))
            if self.features is not None:  # after a Linear: (N, F) per patch
                self.features = module.out_channels(self.features)
            elif self.channels is not None:
                self.channels = module.out_channels(self.channels)
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            if module.dim != 1:
                raise self.fail(name, module, "only dim=1 (the class axis) is exact")
            self.ops.append(_Op("pointwise", module))
        elif not isinstance(module, nn.Identity):
            raise self.fail(name, module, "unsupported module for dense conversion")

    def add_conv(self, name: str, conv: nn.Module) -> None:
        if conv.padding != "valid" and any(p != 0 for p in conv.padding):
            raise self.fail(name, conv, f"padding={conv.padding!r}: must be 0")
        if conv.padding_mode != "zeros":
            raise self.fail(
                name, conv, f"padding_mode={conv.padding_mode!r}: must be 'zeros'"
            )
        if self.channels is not None and conv.in_channels != self.channels:
            raise self.fail(
                name, conv, f"in_channels={conv.in_channels}, map has {self.channels}"
            )
        if self.in_channels is None:
            self.in_channels = conv.in_channels
        self.channels = conv.out_channels
        self.ops.append(
            _Op("conv", conv, conv.kernel_size, conv.stride, conv.dilation, conv.groups)
        )

    def add_pool(self, name: str, pool: nn.Module) -> None:
        nd = self.ndim
        if any(p != 0 for p in _tuple(pool.padding, nd)):
            raise self.fail(name, pool, f"padding={pool.padding}: must be 0")
        if pool.ceil_mode:
            raise self.fail(name, pool, "ceil_mode=True: must be False")
        if getattr(pool, "return_indices", False):
            raise self.fail(name, pool, "return_indices=True is not supported")
        if getattr(pool, "divisor_override", None) is not None:
            raise self.fail(name, pool, "divisor_override is not supported")
        kind: OpKind = "max" if type(pool) in _MAXPOOLS else "avg"
        kernel = _tuple(pool.kernel_size, nd)
        stride = _tuple(pool.stride if pool.stride is not None else kernel, nd)
        dilation = _tuple(getattr(pool, "dilation", 1), nd)
        self.ops.append(_Op(kind, pool, kernel, stride, dilation))

    def add_flatten(self, name: str, flatten: nn.Flatten) -> None:
        if flatten.start_dim != 1 or flatten.end_dim != -1:
            raise self.fail(name, flatten, "only Flatten(start_dim=1, end_dim=-1)")
        if self.features is None:
            self.features = -1  # known once the first Linear fixes the map size

    def add_linear(self, name: str, linear: nn.Linear) -> None:
        if self.features is None:
            raise self.fail(
                name, linear, "applied to a spatial map: put nn.Flatten() before it"
            )
        if self.features == -1:
            f = self.linear_map_size(name, linear)
            self.final_map = f
            shape = (linear.out_features, self.channels, *(f,) * self.ndim)
        else:
            if linear.in_features != self.features:
                raise self.fail(
                    name,
                    linear,
                    f"in_features={linear.in_features}, expected "
                    f"{self.features} from the previous Linear",
                )
            shape = (linear.out_features, linear.in_features, *(1,) * self.ndim)
        self.features = linear.out_features
        ones = (1,) * self.ndim
        self.ops.append(_Op("conv", linear, shape[2:], ones, ones, 1, shape))

    def linear_map_size(self, name: str, linear: nn.Linear) -> int:
        """The side f of the map that the first Linear flattens: C * f**ndim."""
        if self.channels is None:
            raise self.fail(
                name,
                linear,
                "cannot tell the input channels and spatial dims: start the patch "
                "network with a Conv2d or Conv3d",
            )
        c, nd, n = self.channels, self.ndim, linear.in_features
        f = max(1, round((n / c) ** (1 / nd)))
        if c * f**nd != n:
            raise self.fail(
                name,
                linear,
                f"in_features={n} does not match the patch geometry: the map before "
                f"it has {c} channels, so in_features must be {c} * f**{nd} for a "
                f"map of side f",
            )
        return f

    def finish(self, patch_size: int | None) -> _Plan:
        if self.ndim is None or self.in_channels is None:
            raise ValueError(
                "the patch network has no Conv2d/Conv3d: cannot tell its input "
                "channels and spatial dims; start it with a convolution"
            )
        final_map = self.final_map or 1
        spatial = [op for op in self.ops if op.kind != "pointwise"]
        if self.final_map is not None:
            spatial = spatial[: _first_linear(spatial)]
        p = _receptive_field(spatial, final_map, self.ndim)
        if patch_size is not None:
            _check_patch_size(spatial, patch_size, p, final_map, self.ndim)
        if p % 2 == 0:
            raise ValueError(
                f"patch size {p} is even, so a patch has no centre pixel: change "
                "one kernel size by one (or the map size the first Linear expects)"
            )
        flat = self.features is not None and self.features > 0
        head = next(
            (i for i, op in enumerate(self.ops) if op.weight_shape is not None),
            None,
        )
        if head is None:
            head = _pixel_tail(self.ops)
        stride = tuple(
            math.prod(op.stride[a] for op in spatial) for a in range(self.ndim)
        )
        return _Plan(
            ops=tuple(self.ops),
            ndim=self.ndim,
            in_channels=self.in_channels,
            num_classes=self.features if flat else self.channels,
            patch_size=p,
            final_map=final_map,
            head=head,
            total_stride=stride,
        )


def _pixel_tail(ops: list[_Op]) -> int:
    """Start of the longest run of per-pixel ops that ends the network.

    Per pixel: element-wise and pixel-wise layers and 1 x 1 convolutions at stride
    1 without groups. ``len(ops)`` when the last op is spatial.
    """
    start = len(ops)
    while start > 0 and _is_per_pixel(ops[start - 1]):
        start -= 1
    return start


def _is_per_pixel(op: _Op) -> bool:
    if op.kind == "pointwise":
        return True
    return (
        op.kind == "conv"
        and op.groups == 1
        and all(k == 1 for k in op.kernel)
        and all(s == 1 for s in op.stride)
    )


def _tuple(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim


def _first_linear(ops: list[_Op]) -> int:
    return next(i for i, op in enumerate(ops) if op.weight_shape is not None)


def _receptive_field(ops: list[_Op], final_map: int, ndim: int) -> int:
    """Minimal patch side whose last map is ``final_map``: no row is dropped."""
    sizes = []
    for axis in range(ndim):
        size = final_map
        for op in reversed(ops):
            k, s, d = op.kernel[axis], op.stride[axis], op.dilation[axis]
            size = (size - 1) * s + d * (k - 1) + 1
        sizes.append(size)
    if len(set(sizes)) > 1:
        raise ValueError(
            f"the receptive field differs between axes ({sizes}): patches must be "
            "square (cubic); use the same kernel sizes and strides on every axis"
        )
    return sizes[0]


def _map_size(ops: list[_Op], size: int, axis: int = 0) -> int:
    """Size of the last map for an input of side ``size`` (floor division)."""
    for op in ops:
        k, s, d = op.kernel[axis], op.stride[axis], op.dilation[axis]
        size = (size - d * (k - 1) - 1) // s + 1
        if size < 1:
            return 0
    return size


def _check_patch_size(
    ops: list[_Op], patch_size: int, p: int, final_map: int, ndim: int
) -> None:
    """Reject a stated patch size that drops rows or gives the wrong final map."""
    for axis in range(ndim):
        got = _map_size(ops, patch_size, axis)
        if got != final_map:
            what = "a 1 x 1 map" if final_map == 1 else f"a map of side {final_map}"
            raise ValueError(
                f"a {patch_size}-pixel patch gives a final map of side {got}, but "
                f"the patch network needs {what} (its true patch size is {p})"
            )
    if patch_size != p:
        raise ValueError(
            f"patch size {patch_size} drops {patch_size - p} border rows in "
            f"floor-division pooling/strides: the true patch size is {p}"
        )


def _named_layers(net: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Leaf layers of (nested) Sequentials, named by their index path."""
    for name, child in net.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _named_layers(child, f"{path}.")
        else:
            yield path, child


class DenseNet(nn.Module):
    """A patch network run densely: every pixel's logits in one pass, exactly.

    Holds ``patch_net`` itself, so ``parameters()`` are exactly the patch network's
    and an optimiser step on either updates both. Equality with :func:`patchwise`
    holds in eval mode (``Dropout`` is then the identity).

    Attributes
    ----------
    patch_size, halo
        The patch side P (odd, the true receptive field) and ``P // 2``.
    ndim, in_channels, num_classes
        Spatial dims (2 or 3), input channels C and classes K.
    strategy
        ``"auto"`` (default), ``"dilated"`` or ``"space_to_batch"``. ``"auto"``
        applies :func:`choose_strategy`: on the CPU space-to-batch when gradients
        are enabled (it never meets oneDNN's slow dilated backward), native
        dilation for prediction; native dilation on other devices.
    """

    def __init__(self, patch_net: nn.Sequential, plan: _Plan) -> None:
        super().__init__()
        self.patch_net = patch_net
        self._plan = plan
        self.strategy: Strategy = "auto"

    @property
    def patch_size(self) -> int:
        return self._plan.patch_size

    @property
    def halo(self) -> int:
        return self._plan.patch_size // 2

    @property
    def ndim(self) -> int:
        return self._plan.ndim

    @property
    def in_channels(self) -> int:
        return self._plan.in_channels

    @property
    def num_classes(self) -> int:
        return self._plan.num_classes

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of all strides per axis: the dilation of the last layers."""
        return self._plan.total_stride

    def layer_geometry(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """(layer type, kernel, dilation in the dense net) of each spatial layer."""
        rows, d = [], (1,) * self.ndim
        for op in self._plan.ops:
            if op.kind != "pointwise":
                dil = _mul(d, op.dilation)
                rows.append((type(op.module).__name__, op.kernel, dil))
                d = _mul(d, op.stride)
        return rows

    def macs_per_patch(self) -> int:
        """Multiply-accumulates of ``patch_net`` on one P x P patch."""
        size, total = (self.patch_size,) * self.ndim, 0
        for op in self._plan.ops:
            if op.kind != "pointwise":
                size = _pooled(size, op)
                total += _op_macs(op) * math.prod(size)
        return total

    def macs(self, size: tuple[int, ...] | None = None) -> int:
        """Multiply-accumulates of one dense pass.

        Per output pixel when ``size`` is None; else for one image of that
        spatial size in "same" mode, counting every layer's map with its halo.
        """
        if size is None:
            return sum(_op_macs(op) for op in self._plan.ops)
        size = tuple(s + 2 * self.halo for s in size)
        d, total = (1,) * self.ndim, 0
        for op in self._plan.ops:
            if op.kind != "pointwise":
                dilation = _mul(d, op.dilation)
                size = tuple(
                    s - di * (k - 1)
                    for s, di, k in zip(size, dilation, op.kernel, strict=True)
                )
                total += _op_macs(op) * math.prod(size)
                d = _mul(d, op.stride)
        return total

    def forward(
        self, x: torch.Tensor, valid: bool = False, strategy: Strategy | None = None
    ) -> torch.Tensor:
        """Logits of every pixel.

        Parameters
        ----------
        x
            ``(N, C, H, W)`` (or ``(N, C, D, H, W)``) image batch.
        valid
            False: ``x`` is reflect-padded by ``halo`` here and the output has its
            size. True: ``x`` already holds its halo (e.g. a crop of a larger
            image) and only pixels whose whole patch lies inside are returned,
            ``(N, K, H - P + 1, W - P + 1)``.
        strategy
            Overrides ``self.strategy`` for this call.

        Returns
        -------
        torch.Tensor
            ``(N, K, *spatial)`` logits, equal to ``patch_net`` on each patch.
        """
        x = self._prepare(x, valid)
        out_size = _shrink(x.shape[2:], self.patch_size)
        chosen = _resolve(strategy or self.strategy, x)
        y = _run(self._plan.ops, _layout(x), out_size, chosen)
        return y.contiguous()  # (N, K, *out_size)

    def pixels(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        valid: bool = False,
        strategy: Strategy | None = None,
    ) -> torch.Tensor:
        """Logits of the pixels in ``mask`` only: for masked training.

        The layers before the head run densely; the head runs only on the
        features gathered for the masked pixels. The head is the first ``Linear``
        and what follows it or, in a network without one, the per-pixel tail: the
        1 x 1 convolutions and pixel-wise layers that end it. The result equals
        ``self(x).movedim(1, -1)[mask]`` and its gradients the sum of the
        per-patch gradients, at a fraction of the cost when few pixels are
        masked (the head is most of the work in typical patch networks). With
        more than a quarter of the pixels masked, a ``Linear`` head that reads
        more than one cell runs densely (gathering its cells would cost more).

        Parameters
        ----------
        x
            As in :meth:`forward`.
        mask
            Boolean ``(N, *out_spatial)``: the output pixels to compute.
        valid, strategy
            As in :meth:`forward`.

        Returns
        -------
        torch.Tensor
            ``(M, K)`` logits, in the order of ``mask.nonzero()``.
        """
        x = self._prepare(x, valid)
        out_size = _shrink(x.shape[2:], self.patch_size)
        if mask.dtype != torch.bool or mask.shape != (x.shape[0], *out_size):
            raise ValueError(
                f"mask must be a bool tensor of shape {(x.shape[0], *out_size)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        plan, chosen = self._plan, _resolve(strategy or self.strategy, x)
        mask = mask.to(x.device)
        many = plan.final_map > 1 and mask.float().mean() > _SPARSE_HEAD_MAX
        if plan.head == len(plan.ops) or many:
            dense = _run(plan.ops, _layout(x), out_size, chosen)  # (N, K, *out)
            return dense.movedim(1, -1)[mask]
        size = _shrink(x.shape[2:], plan.trunk_patch)
        trunk = _run_phased(plan.ops[: plan.head], _layout(x), size, chosen)
        return _head(*trunk, mask, plan)

    def _prepare(self, x: torch.Tensor, valid: bool) -> torch.Tensor:
        """Check the input and reflect-pad it unless it already has its halo."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            want = "(N, C, H, W)" if self.ndim == 2 else "(N, C, D, H, W)"
            raise ValueError(
                f"expected a {want} tensor with C={self.in_channels}, got shape "
                f"{tuple(x.shape)}"
            )
        if not valid:
            return _reflect_pad(x, self.halo)
        if min(x.shape[2:]) < self.patch_size:
            raise ValueError(
                f"valid mode needs every spatial size >= the patch size "
                f"{self.patch_size}, got {tuple(x.shape[2:])}: include a halo of "
                f"{self.halo} pixels on each side of the crop"
            )
        return x

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, ndim={self.ndim}, "
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"total_stride={self.total_stride}, strategy={self.strategy!r}"
        )


def choose_strategy(
    x: torch.Tensor, grad: bool | None = None
) -> Literal["dilated", "space_to_batch"]:
    """The strategy ``"auto"`` picks for input ``x``.

    The rule, backed by ``benchmarks/bench_sparse.py`` (docs/algorithm.md):

    - CPU, gradients enabled (training): ``"space_to_batch"``. Forward + backward
      took the time of native dilation within noise (±15 %) for the measured 2D
      networks, a quarter to a half of it for 3D (dilated backward also degrades
      badly when another process competes for a core), and it never calls
      oneDNN's dilated backward, whose NCHW path is ~50x slower at 512 x 512
      and above: training cannot fall off that cliff whatever the layout.
    - CPU, no gradients (prediction): ``"dilated"`` (in ``channels_last``,
      re-asserted after every layer): 0-20 % faster, no phase-folding copies.
    - Other devices: ``"dilated"``, which cuDNN runs natively (not measured here).

    Parameters
    ----------
    x
        The input batch (only its device is used).
    grad
        Whether a backward pass will follow; ``torch.is_grad_enabled()`` if None.
    """
    grad = torch.is_grad_enabled() if grad is None else grad
    if x.device.type == "cpu" and grad:
        return "space_to_batch"
    return "dilated"


def _resolve(strategy: str, x: torch.Tensor) -> Literal["dilated", "space_to_batch"]:
    if strategy == "auto":
        return choose_strategy(x)
    if strategy not in get_args(Strategy):
        raise ValueError(
            f"unknown strategy {strategy!r}: use one of {get_args(Strategy)}"
        )
    return strategy


def _mul(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i * j for i, j in zip(a, b, strict=True))


def _shrink(size: tuple[int, ...], patch: int | tuple[int, ...]) -> tuple[int, ...]:
    """Valid output size for an input of ``size`` and a receptive field."""
    patch = _tuple(patch, len(size))
    return tuple(s - p + 1 for s, p in zip(size, patch, strict=True))


def _op_macs(op: _Op) -> int:
    """Multiply-accumulates per output position (0 for pooling)."""
    return op.module.weight.numel() if op.kind == "conv" else 0


def _pooled(size: tuple[int, ...], op: _Op) -> tuple[int, ...]:
    """Map size after ``op`` at its stride, with floor division."""
    return tuple(
        (n - d * (k - 1) - 1) // s + 1
        for n, k, s, d in zip(size, op.kernel, op.stride, op.dilation, strict=True)
    )


def _reflect_pad(x: torch.Tensor, halo: int) -> torch.Tensor:
    """Reflect-pad every spatial axis by ``halo`` (the patch semantics)."""
    if halo == 0:
        return x
    if min(x.shape[2:]) <= halo:
        raise ValueError(
            f"image of spatial size {tuple(x.shape[2:])} is too small to reflect-pad "
            f"by the halo of {halo} pixels: every side must be at least {halo + 1}; "
            "pad it yourself (e.g. F.pad(..., mode='replicate')) and call with "
            "valid=True, or use a network with a smaller patch"
        )
    return F.pad(x, (halo,) * (2 * (x.dim() - 2)), mode="reflect")


def _layout(x: torch.Tensor) -> torch.Tensor:
    """channels_last on the CPU: 1.2-1.6x faster convolutions, 10x max pooling.

    Applied after every layer: a one-channel input is ambiguous, and torch may
    return NCHW from it, which would send dilated layers down oneDNN's ~50x
    slower NCHW backward path. A no-op when the layout is already right.
    """
    if x.device.type != "cpu":
        return x.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def _conv(op: _Op, x: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(x, op.weight(), op.module.bias, 1, 0, dilation, op.groups)


def _max_pool(op: _Op, x: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
    return pool(x, op.kernel, 1, 0, dilation)


def _avg_pool(op: _Op, x: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """Average pooling at stride 1; torch's has no dilation, so sum shifts."""
    if all(d == 1 for d in dilation):
        pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
        return pool(x, op.kernel, 1)
    for axis, (k, d) in enumerate(zip(op.kernel, dilation, strict=True)):
        dim, n = axis + 2, x.shape[axis + 2] - d * (k - 1)
        total = x.narrow(dim, 0, n)
        for i in range(1, k):
            total = total + x.narrow(dim, i * d, n)
        x = total
    return x / math.prod(op.kernel)


_APPLY = {"conv": _conv, "max": _max_pool, "avg": _avg_pool}


def _pointwise(op: _Op, x: torch.Tensor, fresh: bool) -> torch.Tensor:
    """Apply an element-wise layer; ReLU in place on a fresh conv/pool output.

    In place is safe there: convolution and pooling do not save their output for
    backward, and it saves a pass over memory on the largest maps.
    """
    if fresh and type(op.module) is nn.ReLU:
        return torch.relu_(x)
    return op.module(x)


def _run(
    ops: tuple[_Op, ...],
    x: torch.Tensor,
    out_size: tuple[int, ...],
    strategy: Literal["dilated", "space_to_batch"],
) -> torch.Tensor:
    """Run ``ops`` at stride 1 on a padded input: ``(N, C, *S) -> (N, K, *out)``."""
    y, phases = _run_phased(ops, x, out_size, strategy)
    if any(p > 1 for p in phases):
        y = _merge_phases(y, phases)  # (N, K, *S'')
    for axis, size in enumerate(out_size):
        y = y.narrow(axis + 2, 0, size)
    return y


def _run_phased(
    ops: tuple[_Op, ...],
    x: torch.Tensor,
    out_size: tuple[int, ...],
    strategy: Literal["dilated", "space_to_batch"],
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Run ``ops``; the result may still hold its stride phases in the batch.

    Returns ``(y, phases)``: ``y`` is ``(prod(phases) * N, K, *m)`` and its
    element ``j`` of phase ``p`` is output position ``p + phases * j``.
    """
    if strategy == "dilated":
        return _run_dilated(ops, x), (1,) * (x.dim() - 2)
    return _run_space_to_batch(ops, x, out_size)


def _run_dilated(ops: tuple[_Op, ...], x: torch.Tensor) -> torch.Tensor:
    """Stride 1 throughout; each stride multiplies the later dilations."""
    d, fresh = (1,) * (x.dim() - 2), False
    for op in ops:
        if op.kind == "pointwise":
            x, fresh = _pointwise(op, x, fresh), False
            continue
        x = _layout(_APPLY[op.kind](op, x, _mul(d, op.dilation)))
        d, fresh = _mul(d, op.stride), True
    return x


def _run_space_to_batch(
    ops: tuple[_Op, ...], x: torch.Tensor, out_size: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Fold stride phases into the batch and run every layer undilated."""
    x = _pad_end(x, _space_to_batch_size(ops, out_size))  # (N, C, *S')
    phases, fresh = (1,) * (x.dim() - 2), False
    for op in ops:
        if op.kind == "pointwise":
            x, fresh = _pointwise(op, x, fresh), False
            continue
        x, fresh = _layout(_APPLY[op.kind](op, x, op.dilation)), True
        if any(s > 1 for s in op.stride):
            x = _split_phases(x, op.stride, phases)
            phases = _mul(phases, op.stride)
    return x, phases  # (prod(phases) * N, K, *m)


def _space_to_batch_size(
    ops: tuple[_Op, ...], out_size: tuple[int, ...]
) -> tuple[int, ...]:
    """Input size for which every phase split divides evenly, covering out_size.

    Outputs depend only on inputs at the same or larger positions, so padding the
    end of each axis changes nothing but the extra outputs, which are cropped.
    """
    spatial = [op for op in ops if op.kind != "pointwise"]
    sizes = []
    for axis, size in enumerate(out_size):
        m = -(-size // math.prod(op.stride[axis] for op in spatial))
        for op in reversed(spatial):
            m = m * op.stride[axis] + op.dilation[axis] * (op.kernel[axis] - 1)
        sizes.append(m)
    return tuple(sizes)


def _pad_end(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    pad = []
    for axis in reversed(range(len(size))):
        pad += [0, size[axis] - x.shape[axis + 2]]
    return _layout(F.pad(x, pad)) if any(pad) else x


def _split_phases(
    x: torch.Tensor, stride: tuple[int, ...], phases: tuple[int, ...]
) -> torch.Tensor:
    """(prod(phases) * N, C, *S) -> (prod(phases * stride) * N, C, *S / stride).

    Element ``j`` of phase ``p`` sits at position ``p + D * j`` of the full map
    (``D`` = phases). Splitting ``j = s * j' + a`` gives phase ``p + D * a``, so the
    sub-phase ``a`` becomes the major index of the new phase.
    """
    nd = len(stride)
    xl = x.movedim(1, -1)  # (B, *S, C): a view when x is channels_last
    shape = [*phases, -1]
    for size, s in zip(xl.shape[1:-1], stride, strict=True):
        shape += [size // s, s]
    xl = xl.reshape(*shape, xl.shape[-1])  # (*D, N, m0, s0, m1, s1, .., C)
    order = [d for i in range(nd) for d in (nd + 2 + 2 * i, i)]
    order += [nd, *(nd + 1 + 2 * i for i in range(nd)), 3 * nd + 1]
    xl = xl.permute(order)  # (s0, D0, s1, D1, .., N, m0, m1, .., C)
    batch = math.prod(xl.shape[: 2 * nd + 1])
    xl = xl.reshape(batch, *xl.shape[2 * nd + 1 :])  # the one copy
    return _layout(xl.movedim(-1, 1))


def _merge_phases(x: torch.Tensor, phases: tuple[int, ...]) -> torch.Tensor:
    """(prod(phases) * N, K, *m) -> (N, K, *m * phases): inverse of all splits."""
    nd = len(phases)
    xl = x.movedim(1, -1)  # (B, *m, K)
    m = xl.shape[1:-1]
    xl = xl.reshape(*phases, -1, *m, xl.shape[-1])  # (*D, N, *m, K)
    order = [nd, *(d for i in range(nd) for d in (nd + 1 + i, i)), 2 * nd + 1]
    xl = xl.permute(order)  # (N, m0, D0, m1, D1, .., K)
    full = _mul(tuple(m), phases)
    return xl.reshape(xl.shape[0], *full, xl.shape[-1]).movedim(-1, 1)


def _head(
    features: torch.Tensor,
    phases: tuple[int, ...],
    mask: torch.Tensor,
    plan: _Plan,
) -> torch.Tensor:
    """Gather each masked pixel's f x f map and run the Linear head on it.

    ``features`` is the map before the first Linear, still folded into
    ``phases`` (see :func:`_run_phased`). Pixel ``q`` reads it at ``q + D * t``
    for the taps ``t`` of the f x f grid, which is exactly what ``nn.Flatten``
    hands the first Linear in the patch network.
    """
    taps = torch.cartesian_prod(
        *[torch.arange(plan.final_map, device=features.device)] * plan.ndim
    ).reshape(-1, plan.ndim)  # (T, nd), row-major as nn.Flatten
    coords = mask.nonzero()  # (M, 1 + nd)
    positions = [  # where each pixel's taps sit in the full map, (M, T) per axis
        coords[:, a + 1 : a + 2] + plan.total_stride[a] * taps[:, a]
        for a in range(plan.ndim)
    ]
    batch = torch.zeros_like(positions[0])  # phases are folded as (p0, p1, .., n)
    for pos, phase in zip(positions, phases, strict=True):
        batch = batch * phase + pos % phase
    batch = batch * mask.shape[0] + coords[:, :1]
    index = [pos // phase for pos, phase in zip(positions, phases, strict=True)]
    channels_last = features.movedim(1, -1)  # (N', *S', C)
    linear = batch
    for idx, size in zip(index, channels_last.shape[1:-1], strict=True):
        linear = linear * size + idx
    # index_select: its backward (index_add) is deterministic on the CPU, unlike
    # advanced indexing's accumulating index_put
    gathered = channels_last.reshape(-1, channels_last.shape[-1]).index_select(
        0, linear.flatten()
    )
    gathered = gathered.reshape(*linear.shape, gathered.shape[-1])  # (M, T, C)
    flat = gathered.transpose(1, 2).flatten(1)  # (M, C * T)
    head = plan.ops[plan.head :]
    if head[0].weight_shape is not None:  # a Linear head: written for (M, F)
        for op in head:
            flat = op.module(flat)
        return flat  # (M, K)
    return _pixel_tail_on_rows(head, flat, plan.ndim)


def _pixel_tail_on_rows(
    tail: tuple[_Op, ...], flat: torch.Tensor, ndim: int
) -> torch.Tensor:
    """Run a per-pixel tail on ``(M, C)`` features, one pixel per row.

    1 x 1 convolutions become matrix products; the other layers were written for
    spatial maps, so they see each pixel as an ``(M, C, 1, 1)`` map.
    """
    ones = (1,) * ndim
    for op in tail:
        if op.kind == "conv":
            flat = F.linear(flat, op.module.weight.flatten(1), op.module.bias)
        else:
            flat = op.module(flat.view(*flat.shape, *ones)).flatten(1)
    return flat  # (M, K)


def iter_patches(
    x: torch.Tensor, patch_size: int, batch_size: int = 4096
) -> Iterator[torch.Tensor]:
    """Yield every pixel's patch of the reflect-padded ``x``, in batches.

    Parameters
    ----------
    x
        ``(N, C, H, W)`` (or ``(N, C, D, H, W)``) image batch.
    patch_size
        Odd patch side P; ``x`` is reflect-padded by ``P // 2``.
    batch_size
        Patches per yielded batch.

    Yields
    ------
    torch.Tensor
        ``(B, C, P, P)`` (or ``(B, C, P, P, P)``) patches in row-major pixel
        order (batch, then spatial axes); channels_last on the CPU.
    """
    nd = x.dim() - 2
    windows = _reflect_pad(x, patch_size // 2)
    for axis in range(nd):
        windows = windows.unfold(2 + axis, patch_size, 1)  # (N, C, *S, *P)
    windows = windows.movedim(1, 1 + nd)  # (N, *S, C, *P), a view
    grid, total = windows.shape[: nd + 1], math.prod(windows.shape[: nd + 1])
    for start in range(0, total, batch_size):
        flat = torch.arange(start, min(start + batch_size, total), device=x.device)
        yield _layout(windows[torch.unravel_index(flat, grid)])  # (B, C, *P)


def patchwise(
    patch_net: nn.Sequential,
    x: torch.Tensor,
    batch_size: int = 4096,
    patch_size: int | None = None,
) -> torch.Tensor:
    """Reference: run ``patch_net`` on every pixel's patch, in batches.

    Parameters
    ----------
    patch_net
        The patch classifier.
    x
        ``(N, C, H, W)`` (or ``(N, C, D, H, W)``), reflect-padded here by P // 2.
    batch_size
        Patches per call of ``patch_net``.
    patch_size
        P; computed from the layers when omitted.

    Returns
    -------
    torch.Tensor
        ``(N, K, *spatial)``: ``out[n, :, i, j] == patch_net(xpad[n:n+1, :,
        i:i+P, j:j+P])``.
    """
    p = patch_size or to_dense(patch_net).patch_size
    outs = [
        patch_net(patches).reshape(len(patches), -1)  # (B, K)
        for patches in iter_patches(x, p, batch_size)
    ]
    grid = (x.shape[0], *x.shape[2:])
    return torch.cat(outs).reshape(*grid, -1).movedim(-1, 1)  # (N, K, *S)


def to_dense(patch_net: nn.Sequential, patch_size: int | None = None) -> DenseNet:
    """Convert a patch classifier into an exact dense network sharing its weights.

    Parameters
    ----------
    patch_net
        A ``Sequential`` of ``Conv2d``/``Conv3d`` (no padding), ``MaxPool``/
        ``AvgPool`` (no padding, no ``ceil_mode``), element-wise activations,
        ``Dropout``, ``Flatten`` and ``Linear`` layers, classifying the centre pixel
        of a P x P (x P) patch. Nested ``Sequential`` s are walked.
    patch_size
        Optional check: the patch side the caller expects. It must equal the true
        receptive field computed from the layers.

    Returns
    -------
    DenseNet
        ``(N, C, *S) -> (N, K, *S)`` logits, holding ``patch_net`` itself.

    Raises
    ------
    ValueError
        Naming the offending layer (index and type) and why it cannot be exact.
    """
    if not isinstance(patch_net, nn.Sequential):
        raise ValueError(
            f"expected an nn.Sequential patch network, got {type(patch_net).__name__}"
        )
    parser = _Parser()
    for name, module in _named_layers(patch_net):
        parser.add(name, module)
    return DenseNet(patch_net, parser.finish(patch_size))
