"""Segmentation tasks with known ground truth, rebuilt offline from scikit-image.

Every task is deterministic (fixed seeds) and uses only data bundled with
scikit-image, so anyone can regenerate the benchmark figures. Ground truth holds
classes 1..K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import color, data, filters, morphology, segmentation, transform, util

__all__ = ["TASKS", "Task", "make_task", "textures_two_scales"]


@dataclass(frozen=True)
class Task:
    """An image, its ground truth and what makes it hard."""

    name: str
    image: np.ndarray  # (Y, X) or (Y, X, 3)
    truth: np.ndarray  # (Y, X) int32, classes 1..K
    class_names: tuple[str, ...]
    channel_axis: int | None  # -1 for RGB, else None
    summary: str


def coins() -> Task:
    """Coins vs background: the gallery's watershed on the Sobel elevation map."""
    image = data.coins()
    elevation = filters.sobel(image)
    markers = np.zeros(image.shape, np.int32)
    markers[image < 30] = 1
    markers[image > 150] = 2
    coins_mask = segmentation.watershed(elevation, markers) == 2
    coins_mask = ndi.binary_fill_holes(coins_mask)
    coins_mask = morphology.remove_small_objects(coins_mask, max_size=20)
    truth = coins_mask.astype(np.int32) + 1
    return Task(
        "coins", image, truth, ("background", "coin"), None, "objects on a gradient"
    )


def blobs(size: int = 512) -> Task:
    """Noisy ``binary_blobs``: per-pixel intensity is useless, local averages work."""
    rng = np.random.default_rng(1)
    mask = data.binary_blobs(
        size, blob_size_fraction=30 / size, volume_fraction=0.4, rng=1
    )
    clean = filters.gaussian(mask.astype(np.float64), sigma=1.5)
    image = clean + rng.normal(0.0, 0.6, mask.shape)
    truth = mask.astype(np.int32) + 1
    return Task(
        "blobs", _to_uint8(image), truth, ("out", "in"), None, "SNR ~ 1.7 per pixel"
    )


def textures() -> Task:
    """Grass, gravel and brick in a mosaic of smooth random regions, equalised."""
    rng = np.random.default_rng(2)
    fields = filters.gaussian(rng.normal(size=(3, 512, 512)), sigma=(0, 40, 40))
    truth = fields.argmax(axis=0).astype(np.int32) + 1  # (Y, X) classes 1..3
    sources = [_standardise(getattr(data, name)()) for name in ("grass", "gravel")]
    sources.append(_standardise(data.brick()))
    image = np.choose(truth - 1, sources)
    return Task(
        "textures",
        _to_uint8(image),
        truth,
        ("grass", "gravel", "brick"),
        None,
        "same mean/std, only texture differs",
    )


def membranes() -> Task:
    """Cell boundaries 1-2 px wide among bright vesicles, like an EM section."""
    rng = np.random.default_rng(3)
    shape = (512, 512)
    seeds = np.zeros(shape, bool)
    seeds[tuple(rng.integers(0, 512, size=(2, 90)))] = True
    _, (rows, cols) = ndi.distance_transform_edt(~seeds, return_indices=True)
    cells = rows * 512 + cols  # (Y, X) Voronoi cell ids
    membrane = _one_sided_boundaries(cells)
    thick = rng.random(cells.max() + 1)[cells] < 0.4  # 40% of cells get 2-px walls
    membrane |= thick & segmentation.find_boundaries(cells, mode="inner")
    vesicles = _vesicles(shape, rng) & ~ndi.binary_dilation(membrane, iterations=2)
    clean = 0.9 * membrane + 0.9 * vesicles + 0.25 * _smooth_noise(shape, rng, 6)
    image = filters.gaussian(clean, sigma=0.7) + rng.normal(0.0, 0.12, shape)
    truth = membrane.astype(np.int32) + 1
    return Task(
        "membranes",
        _to_uint8(image),
        truth,
        ("cell", "membrane"),
        None,
        "thin lines vs bright dots",
    )


def ihc() -> Task:
    """Immunohistochemistry (RGB): nuclei, DAB stain and background from colour."""
    image = data.immunohistochemistry()
    hed = color.rgb2hed(image)
    stain = [filters.gaussian(hed[..., i], sigma=1.5) for i in (0, 2)]
    nuclei, dab = (_clean_mask(s > filters.threshold_otsu(s)) for s in stain)
    truth = np.ones(image.shape[:2], np.int32)
    truth[nuclei] = 2
    truth[dab] = 3
    return Task(
        "ihc-rgb",
        image,
        truth,
        ("background", "nuclei", "DAB"),
        -1,
        "RGB; classes by colour",
    )


TASKS: dict[str, Callable[[], Task]] = {
    "coins": coins,
    "blobs": blobs,
    "textures": textures,
    "membranes": membranes,
    "ihc-rgb": ihc,
}


def textures_two_scales() -> tuple[Task, Task, Task]:
    """Three texture mosaics: training images A and B, held-out image C.

    The classes are grass, gravel and brick as in ``textures``, but A shows them at
    their own scale and B zoomed 2x; the held-out C shows the left half at scale 1
    and the right half at scale 2. Scribbles on A alone never show the zoomed
    textures, so a model needs both A and B to do well on C. Sizes differ (A
    384 x 448, B 320 x 512, C 448 x 448); every mosaic has its own regions and takes
    its textures from other parts of the source images.
    """
    sources = [_standardise(getattr(data, name)()) for name in ("grass", "gravel")]
    sources.append(_standardise(data.brick()))
    zoomed = [transform.rescale(source, 2, order=1) for source in sources]
    names = ("grass", "gravel", "brick")

    def mosaic(shape, seed, offset, scale_of_column):
        rng = np.random.default_rng(seed)
        fields = filters.gaussian(rng.normal(size=(3, *shape)), sigma=(0, 32, 32))
        truth = fields.argmax(axis=0).astype(np.int32) + 1
        r0, c0 = offset  # of the zoomed textures; clipped for the 512 x 512 ones
        window = (slice(r0, r0 + shape[0]), slice(c0, c0 + shape[1]))
        r0, c0 = min(r0, 512 - shape[0]), min(c0, 512 - shape[1])
        small_window = (slice(r0, r0 + shape[0]), slice(c0, c0 + shape[1]))
        small = np.choose(truth - 1, [source[small_window] for source in sources])
        large = np.choose(truth - 1, [source[window] for source in zoomed])
        columns = np.arange(shape[1])[None, :].repeat(shape[0], 0)
        image = np.where(scale_of_column(columns) == 2, large, small)
        return _to_uint8(image), truth

    image_a, truth_a = mosaic((384, 448), 10, (0, 64), lambda c: np.ones_like(c))
    image_b, truth_b = mosaic((320, 512), 11, (400, 300), lambda c: 2 + 0 * c)
    image_c, truth_c = mosaic((448, 448), 12, (64, 0), lambda c: 1 + (c >= 224))
    return (
        Task("A: scale 1", image_a, truth_a, names, None, "textures at scale 1"),
        Task("B: scale 2", image_b, truth_b, names, None, "textures zoomed 2x"),
        Task("C: both", image_c, truth_c, names, None, "held out: half each"),
    )


def make_task(name: str) -> Task:
    """Build the task called ``name`` (see ``TASKS``)."""
    return TASKS[name]()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, (0.5, 99.5))
    return util.img_as_ubyte(np.clip((image - low) / (high - low), 0, 1))


def _standardise(image: np.ndarray) -> np.ndarray:
    values = image.astype(np.float64)
    return (values - values.mean()) / values.std()


def _one_sided_boundaries(cells: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a larger id: walls one pixel wide."""
    wall = np.zeros(cells.shape, bool)
    wall[:-1] |= cells[:-1] < cells[1:]
    wall[1:] |= cells[1:] < cells[:-1]
    wall[:, :-1] |= cells[:, :-1] < cells[:, 1:]
    wall[:, 1:] |= cells[:, 1:] < cells[:, :-1]
    return wall


def _vesicles(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Round dots of radius 1-3 px."""
    dots = np.zeros(shape, bool)
    for radius in (1, 2, 3):
        centres = np.zeros(shape, bool)
        centres[tuple(rng.integers(0, shape[0], size=(2, 120)))] = True
        dots |= ndi.binary_dilation(centres, morphology.disk(radius))
    return dots


def _smooth_noise(
    shape: tuple[int, int], rng: np.random.Generator, sigma: float
) -> np.ndarray:
    noise = filters.gaussian(rng.normal(size=shape), sigma=sigma)
    return noise / noise.std()


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    mask = ndi.binary_opening(mask, morphology.disk(1))
    return morphology.remove_small_objects(mask, max_size=30)
