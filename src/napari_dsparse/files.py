"""Reading images and labels, writing results: .tif/.tiff, .npy and .png."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from napari_dsparse.data import InputError
from napari_dsparse.export import write_atomically

__all__ = ["IMAGE_SUFFIXES", "read_array", "write_tif"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".png")


def read_array(path: str | Path) -> np.ndarray:
    """Read an image or label file; ``InputError`` says why if impossible."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix!r} "
            f"(use {', '.join(IMAGE_SUFFIXES)})"
        )
    try:
        if suffix in (".tif", ".tiff"):
            return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from skimage.io import imread

        return imread(path)
    except Exception as error:
        raise InputError(f"cannot read {path}: {error}") from error


def write_tif(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as (Big)TIFF atomically: never a partial file."""
    path = Path(path)
    write_atomically(
        path,
        lambda temporary: tifffile.imwrite(
            temporary, array, bigtiff=array.nbytes > 2**31, compression="zlib"
        ),
    )
    return path
