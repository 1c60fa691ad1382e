"""File-to-file workflows behind the command line: train a model, predict images."""

from __future__ import annotations

import contextlib
import glob
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from napari_dsparse import __version__
from napari_dsparse.data import (
    InputError,
    Normalization,
    NormalizationPolicy,
    as_channels_first,
    check_labels,
    check_trainable_image,
    class_counts,
    class_id_ranges,
)
from napari_dsparse.export import (
    check_output_folder,
    load_classifier,
    save_classifier,
)
from napari_dsparse.files import (
    IMAGE_SUFFIXES,
    channel_axis_of,
    check_not_overwriting,
    check_pairs_distinct,
    is_zarr,
    other_tiff_series,
    read_array,
    read_labels,
)
from napari_dsparse.interrupts import interrupts_between_steps, take_interrupt
from napari_dsparse.large import (
    DEFAULT_MEMORY,
    OUTPUT_SUFFIXES,
    TILE_MULTIPLE,
    Outputs,
    open_lazy,
    predict_file,
    progress_bar,
    result_paths,
    smallest_tile_memory,
)
from napari_dsparse.model import Classifier, pick_device
from napari_dsparse.nets import DEFAULT_PRESET
from napari_dsparse.train import TrainConfig, Trainer, iter_train
from napari_dsparse.training_set import TrainingSet

__all__ = [
    "PredictSummary",
    "expand_images",
    "predict_files",
    "predict_many",
    "train_from_files",
    "train_from_pairs",
]

Report = Callable[[str], None]
DEFAULT_SECONDS = 30.0
SAVING = "stopping after this step to save the model (Ctrl-C again: quit, save nothing)"


def _silent(_message: str) -> None:
    pass


def _device(requested: str | None):
    try:
        return pick_device(requested)
    except (ValueError, RuntimeError) as error:
        raise InputError(str(error)) from error


def train_from_files(
    image_path: str | Path,
    labels_path: str | Path,
    output: str | Path,
    seconds: float | None = None,
    steps: int | None = None,
    preset: str = DEFAULT_PRESET,
    device: str | None = None,
    seed: int = 0,
    channel_axis: int | None = None,
    report: Report = _silent,
    normalization: NormalizationPolicy = "per_image",
) -> Classifier:
    """Train on an image and its painted labels; write the model to ``output``."""
    return train_from_pairs(
        [(image_path, labels_path)],
        output,
        seconds=seconds,
        steps=steps,
        preset=preset,
        device=device,
        seed=seed,
        channel_axis=channel_axis,
        report=report,
        normalization=normalization,
    )


def train_from_pairs(
    pairs: Sequence[tuple[str | Path, str | Path]],
    output: str | Path,
    seconds: float | None = None,
    steps: int | None = None,
    preset: str = DEFAULT_PRESET,
    device: str | None = None,
    seed: int = 0,
    channel_axis: int | None = None,
    report: Report = _silent,
    normalization: NormalizationPolicy = "per_image",
    prior_strength: float = TrainConfig.prior_strength,
    focal_gamma: float = TrainConfig.focal_gamma,
    warn: Report = _silent,
) -> Classifier:
    """Train one model on several ``(image, labels)`` files; write it to ``output``.

    Images may differ in size but must have the same channels. ``normalization``
    is ``"per_image"`` (each image by its own percentiles, also at prediction) or
    ``"fixed"`` (the percentiles of all training images pooled, for every image).
    ``prior_strength`` and ``focal_gamma`` are ``TrainConfig``'s. ``warn`` hears of
    TIFFs holding more image series than the first, which is the one read. A Ctrl-C
    in the main thread stops training after the step under way; the model trained so
    far is written, then ``KeyboardInterrupt`` is raised.
    """
    if not pairs:
        raise InputError("give at least one image and its labels")
    check_not_overwriting([Path(output)], [path for pair in pairs for path in pair])
    _check_model_output(Path(output))
    check_pairs_distinct((Path(image), Path(labels)) for image, labels in pairs)
    for path in dict.fromkeys(Path(path) for pair in pairs for path in pair):
        if skipped := other_tiff_series(path):
            warn(_series_warning(path, skipped, used="read"))
    read = [_read_pair(image, labels, channel_axis) for image, labels in pairs]
    loaded = [(image, labels) for image, labels, _ in read]
    num_classes = max(int(labels.max()) for _, labels in loaded)
    counts = sum(class_counts(labels, num_classes) for _, labels in loaded)
    if (counts > 0).sum() < 2:
        raise InputError(
            "fewer than two classes are painted; paint strokes of at least two "
            "classes (labels 1..K, 0 = unpainted)"
        )
    if seconds is None and steps is None:
        seconds = DEFAULT_SECONDS
    target = _device(device)
    classifier = Classifier.create(
        loaded[0][0].shape[0],
        tuple(f"class {k}" for k in range(1, num_classes + 1)),
        Normalization.from_images([image for image, _ in loaded], policy=normalization),
        preset=preset,
        seed=seed,
    ).to(target)
    names = _pair_names([Path(image) for image, _ in pairs])
    classifier.provenance.update(
        seed=seed,
        package_version=__version__,
        image=names[0],
        images=names,
    )
    layout = _shared_channel_axis([layout for *_, layout in read])
    if layout is not None:  # predict reads images laid out alike the same way
        classifier.provenance["channel_axis"] = layout
    training_set = TrainingSet(classifier.normalization, num_classes)
    for name, (image, labels) in zip(names, loaded, strict=True):
        training_set.add(name, image, labels)
    painted = [f"class {k} {n} px" for k, n in enumerate(counts.tolist(), 1) if n]
    report(
        f"training {classifier.preset.name} (P = {classifier.patch_size}) on {target} "
        f"from {len(loaded)} image(s), painted: {', '.join(painted)}"
    )
    unpainted = [k for k, n in enumerate(counts.tolist(), 1) if not n]
    if unpainted:
        report(
            f"no strokes of class {class_id_ranges(unpainted)}: the model keeps "
            f"classes 1..{num_classes} but has nothing to learn those from"
        )
    config = TrainConfig(
        seed=seed, prior_strength=prior_strength, focal_gamma=focal_gamma
    )
    trainer = Trainer.from_set(classifier, training_set, config)
    stopped = _drive(iter_train(trainer, steps=steps, seconds=seconds), report)
    if stopped:
        trainer.fit_class_prior()  # iter_train fits it only when its budget runs out
    if trainer.image_prior is not None:
        shares = zip(classifier.class_names, trainer.image_prior, counts, strict=True)
        report(
            "class shares estimated in the training images: "
            + ", ".join(f"{name} {100 * p:.1f} %" for name, p, n in shares if n)
        )
    save_classifier(classifier, output)
    report(f"wrote {output}")
    if stopped:
        raise KeyboardInterrupt
    return classifier


def _check_model_output(output: Path) -> None:
    """``InputError`` before training if the model could not be written to
    ``output``, or would be taken for an image there (``predict folder/``)."""
    if output.is_dir():
        raise InputError(
            f"{output} is a folder; give the model a file name, such as "
            f"{output / 'model.pt'}"
        )
    if output.name.lower().endswith((*IMAGE_SUFFIXES, *OUTPUT_SUFFIXES)):
        raise InputError(
            f"a model named {output.name} would pass for an image; name it "
            f"{output.with_suffix('.pt').name}"
        )
    check_output_folder(output)


def _read_pair(
    image_path: str | Path, labels_path: str | Path, channel_axis: int | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int | None]]:
    """The image as ``(C, Z, Y, X)``, its labels, and the file's dimensions with the
    channel axis that was given or named in it (``None``: inferred)."""
    with _naming(image_path):
        channel_axis = channel_axis_of(image_path, channel_axis)
        raw = read_array(image_path)
        image = as_channels_first(raw, channel_axis)  # (C, Z, Y, X)
        check_trainable_image(image)
    with _naming(labels_path):
        labels = check_labels(read_labels(labels_path), image.shape[1:])
    axis = None if channel_axis is None else channel_axis % raw.ndim
    return image, labels, (raw.ndim, axis)


@contextlib.contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """Prefix an ``InputError`` with the file it is about, unless it names it."""
    try:
        yield
    except InputError as error:
        if str(path) in str(error):
            raise
        raise InputError(f"{path}: {error}") from error


def _shared_channel_axis(
    layouts: Sequence[tuple[int, int | None]],
) -> dict[str, int] | None:
    """``{"ndim", "axis"}`` when every training file has that many dimensions and
    its channels on that axis, given or named in the file; else ``None``."""
    if len(set(layouts)) != 1 or layouts[0][1] is None:
        return None
    ndim, axis = layouts[0]
    return {"ndim": ndim, "axis": axis}


def _pair_names(images: Sequence[Path]) -> list[str]:
    """File names, made unique with a number where two images share one."""
    names: list[str] = []
    for image in images:
        name, number = image.name, 2
        while name in names:
            name, number = f"{image.name} ({number})", number + 1
        names.append(name)
    return names


def _drive(statuses, report: Report, every: float = 1.0) -> bool:
    """Run a training generator, reporting at most once per ``every`` seconds.

    Returns whether a Ctrl-C stopped it, between two steps, before its end.
    """
    last = 0.0
    status = None
    stopped = False
    with interrupts_between_steps(SAVING):
        for status in statuses:
            if time.perf_counter() - last >= every:
                last = time.perf_counter()
                report(
                    f"step {status.step:6d}  loss {status.loss_text}  "
                    f"{status.steps_per_second:5.1f} steps/s  "
                    f"rate {status.learning_rate:.1e}"
                )
            if take_interrupt():
                stopped = True
                break
        stopped = take_interrupt() or stopped  # pressed as the budget ran out
    if status is not None:
        done = "stopped by Ctrl-C" if stopped else "done"
        report(f"{done}: {status.step} steps, last loss {status.loss_text}")
    return stopped


def predict_files(
    model_path: str | Path,
    image_paths: Sequence[str | Path],
    output: str | Path,
    probabilities: bool = False,
    uncertainty: bool = False,
    device: str | None = None,
    channel_axis: int | None = None,
    report: Report = _silent,
    memory: int = DEFAULT_MEMORY,
    scheduler: str | None = None,
    show_progress: bool = False,
) -> list[Path]:
    """Predict each image with the model; returns the class files written.

    :func:`predict_many` without its summary: ``InputError`` (the first file's
    reason) if any image failed, after the others were predicted.
    """
    summary = predict_many(
        model_path,
        image_paths,
        output,
        probabilities=probabilities,
        uncertainty=uncertainty,
        device=device,
        channel_axis=channel_axis,
        progress=show_progress,
        memory=memory,
        scheduler=scheduler,
    )
    for path in summary.written:
        report(f"wrote {path}")
    if summary.failed:
        raise InputError(summary.failed[0][1])
    return summary.written


def _output_paths(images: Sequence[str | Path], output: Path) -> list[Path]:
    """One .tif for a single image, else ``output/<image stem>.tif`` for each.

    The folder is not made here (:func:`_make_folder`), so a run refused by a later
    check leaves nothing behind.
    """
    suffix = output.suffix.lower()
    if suffix in IMAGE_SUFFIXES and suffix not in OUTPUT_SUFFIXES:
        if not output.is_dir():  # else a folder that happens to have that name
            raise InputError(
                f"cannot write results as {suffix}: give a "
                f"{', '.join(OUTPUT_SUFFIXES)} file or a folder, not {output}"
            )
    elif suffix in OUTPUT_SUFFIXES:
        if len(images) == 1:
            return [output]
        raise InputError(
            f"{len(images)} images need an output folder, not the file {output}"
        )
    if output.exists() and not output.is_dir():
        raise InputError(
            f"{output} is a file, not a folder: give a "
            f"{', '.join(OUTPUT_SUFFIXES)} file or a folder for the results"
        )
    return [output / f"{_result_stem(Path(image))}.tif" for image in images]


def _result_stem(image: Path) -> str:
    """The name of an image's results: its stem, and for an array or group inside a
    zarr store the store's stem and the path in it (``plate.zarr/A/1``: plate_A_1)."""
    parts = image.parts
    in_store = (i for i, p in enumerate(parts[:-1]) if p.lower().endswith(".zarr"))
    store = next(in_store, None)
    if store is None:
        return image.stem
    return "_".join([Path(parts[store]).stem, *parts[store + 1 :]])


def _make_folder(folder: Path) -> bool:
    """Make the output folder and its parents; ``InputError`` if that fails.
    Returns whether the folder was made (it did not exist)."""
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create output folder {folder}: {error}") from error
    return not existed


def _check_distinct(results: list[tuple[Path, Path]]) -> None:
    """``InputError`` if two ``(result, image)`` would go to one file: inputs of one
    name (``a.tif``, ``a.png``), ``a_probabilities.tif`` of ``a.tif`` and the classes
    of an input named ``a_probabilities.tif``, or names that differ only in case
    (``a.tif``, ``A.tif``: one file on macOS and Windows)."""
    seen: dict[str, tuple[Path, Path]] = {}
    for path, image in results:
        other, other_image = seen.setdefault(str(path).casefold(), (path, image))
        if other is path:
            continue
        if other == path:
            raise InputError(
                f"the results of {other_image} and {image} would both be written to "
                f"{path}; rename one of the inputs or predict them into separate "
                "folders"
            )
        raise InputError(
            f"the results {other} (of {other_image}) and {path} (of {image}) differ "
            "only in case, which macOS and Windows take for one file; rename one of "
            "the inputs or predict them into separate folders"
        )


@dataclass
class PredictSummary:
    """What :func:`predict_many` did: outputs written, files that failed, figures."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    pixels: int = 0  # pixels predicted (all slices) in the files written
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return len(self.written) + len(self.failed)

    def text(self) -> str:
        """The totals in one line: files, predicted, failed, pixels, rate."""
        rate = self.pixels / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (
            f"{self.files} file(s): {len(self.written)} predicted, "
            f"{len(self.failed)} failed; {self.pixels:,} pixels in "
            f"{self.seconds:.1f} s ({rate:.2f} Mpx/s)"
        )

    def failure_lines(self) -> list[str]:
        """One line per failed file: ``failed: FILE: reason``, or ``failed: reason``
        where the reason names the file already."""
        return [
            f"failed: {reason}" if str(path) in reason else f"failed: {path}: {reason}"
            for path, reason in self.failed
        ]


def expand_images(sources: Sequence[str | Path]) -> list[Path]:
    """Images named by ``sources``: files, zarr stores, folders or glob patterns.

    A folder gives its images (files with an image suffix and ``.zarr`` stores),
    sorted; a pattern with ``*``, ``?`` or ``[`` gives its sorted matching images. A
    name that is none of these is kept, so that it is reported as missing.
    ``InputError`` if nothing is left.
    """
    images: list[Path] = []
    for source in map(str, sources):
        path = Path(source)
        if path.is_dir() and not is_zarr(path):
            images += sorted(p for p in path.iterdir() if _is_image(p))
        elif not path.exists() and any(c in source for c in "*?["):
            images += sorted(Path(p) for p in glob.glob(source) if _is_image(Path(p)))
        else:
            images.append(path)
    if not images:
        raise InputError(f"no image files in {', '.join(map(str, sources))}")
    return list(dict.fromkeys(images))  # each file once, in order


def _is_image(path: Path) -> bool:
    """An image file (by suffix) or a zarr store or node (:func:`files.is_zarr`)."""
    if path.is_dir():
        return is_zarr(path)
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def predict_many(
    model_path: str | Path,
    sources: Sequence[str | Path],
    output: str | Path,
    probabilities: bool = False,
    uncertainty: bool = False,
    device: str | None = None,
    channel_axis: int | None = None,
    progress: bool = True,
    memory: int = DEFAULT_MEMORY,
    scheduler: str | None = None,
    warn: Report | None = None,
) -> PredictSummary:
    """Predict every image of ``sources`` (files, folders, globs) into ``output``.

    Each image goes through :func:`napari_dsparse.large.predict_file`: read lazily,
    predicted tile by tile within ``memory`` bytes (or on the dask cluster
    ``scheduler``), normalised as the model's policy says. Progress bars on stderr
    (``progress=False`` hides them): one over the files when there are several, and
    one over the tiles of the file being predicted. A file that cannot be read,
    predicted or written (``InputError``) is skipped, gets no output and is listed
    in the summary's ``failed``; the others go on. ``warn`` hears, before any
    work, of a ``memory`` too small for even the smallest tile, and of each TIFF
    whose series after the first are not predicted.
    """
    start = time.perf_counter()
    images = expand_images(sources)
    targets = _output_paths(images, Path(output))
    outputs = Outputs(probabilities=probabilities, uncertainty=uncertainty)
    produced = [  # (result, the image it comes from)
        (path, image)
        for image, target in zip(images, targets, strict=True)
        for path in result_paths(target, outputs).values()
    ]
    check_not_overwriting([path for path, _ in produced], [Path(model_path), *images])
    _check_distinct(produced)
    one_file = targets == [Path(output)]  # else one result per image in ``output``
    if one_file:
        check_output_folder(Path(output))  # before the model is loaded
    classifier = load_classifier(model_path, _device(device))
    if warn is not None:
        need = smallest_tile_memory(classifier)
        if memory < need:
            warn(_memory_warning(memory, need, classifier.halo))
    made = False if one_file else _make_folder(Path(output))
    summary = PredictSummary()
    bar = tqdm(
        total=len(images),
        unit="file",
        desc="predict",
        disable=not progress or len(images) == 1,
    )
    with bar:
        for image_path, classes_path in zip(images, targets, strict=True):
            bar.set_postfix_str(image_path.name, refresh=False)
            skipped = other_tiff_series(image_path) if warn is not None else []
            if skipped:
                with tqdm.external_write_mode(file=sys.stderr):
                    warn(_series_warning(image_path, skipped))
            try:
                with progress_bar(image_path.name, progress) as tiles:
                    predict_file(
                        classifier,
                        image_path,
                        classes_path,
                        outputs,
                        memory=memory,
                        channel_axis=channel_axis,
                        progress=tiles,
                        scheduler=scheduler,
                    )
                pixels = _pixels_written(classes_path)
            except InputError as error:
                summary.failed.append((image_path, str(error)))
            else:
                summary.written.append(classes_path)
                summary.pixels += pixels
            bar.update()
    if made and not summary.written:  # every image failed: leave no empty folder
        with contextlib.suppress(OSError):
            Path(output).rmdir()
    summary.seconds = time.perf_counter() - start
    return summary


def _series_warning(image: Path, skipped: list[str], used: str = "predicted") -> str:
    """That only the first of a TIFF's image series is ``used``."""
    return (
        f"{image} holds {len(skipped) + 1} image series; only the first is "
        f"{used}, not {', '.join(skipped)}"
    )


def _memory_warning(memory: int, need: int, halo: int) -> str:
    """Why a ``memory`` budget below the smallest tile's ``need`` will be exceeded."""
    return (
        f"a memory budget of {memory / 2**20:.3g} MB is below the smallest tile's "
        f"need for this model ({need / 2**20:.3g} MB for {TILE_MULTIPLE} px and its "
        f"{halo} px halo); predicting in tiles of {TILE_MULTIPLE} px, over the budget"
    )


def _pixels_written(classes_path: Path) -> int:
    """Pixels of every slice of a classes result, from its header: the image itself
    is not read again (a PNG or JPEG would be decoded a second time)."""
    in_zarr = classes_path.name.lower().endswith(".zarr")
    result = open_lazy(classes_path / "classes" if in_zarr else classes_path)
    return int(np.prod(result.shape))
