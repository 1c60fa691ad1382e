"""Command line: ``napari-dsparse demo|...``.

Each subcommand parses its arguments and calls :mod:`napari_dsparse.workflows` (or,
for ``demo``, opens napari); errors the user can fix (``InputError``) become a
one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from napari_dsparse import __version__


def say(text: str) -> None:
    """Print a line; once stdout's reader has gone (``| head``), go on silently.

    The work goes on: a model piped into ``head`` is still trained and written.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's recipe: stdout to /dev/null, so no later write or flush fails.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run_train(args: argparse.Namespace) -> int:
    from napari_dsparse.workflows import train_from_pairs

    train_from_pairs(
        _training_pairs(args),
        args.output,
        seconds=args.seconds,
        steps=args.steps,
        preset=args.preset,
        device=args.device,
        seed=args.seed,
        channel_axis=args.channel_axis,
        report=say,
        normalization=args.normalization.replace("-", "_"),
        prior_strength=args.prior_strength,
        focal_gamma=args.focal_gamma,
        warn=lambda text: _to_stderr("train", f"warning: {text}"),
    )
    return 0


def _training_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``IMAGE LABELS`` (if given), then every ``--pair IMAGE LABELS``."""
    from napari_dsparse.data import InputError

    pairs = [tuple(pair) for pair in args.pair or []]
    if args.image is not None and args.labels is None:
        raise InputError(f"{args.image}: give its labels file too (IMAGE LABELS)")
    if args.image is not None:
        pairs.insert(0, (args.image, args.labels))
    if not pairs:
        raise InputError("give IMAGE LABELS or one or more --pair IMAGE LABELS")
    return pairs


def _run_predict(args: argparse.Namespace) -> int:
    from napari_dsparse.workflows import predict_many

    summary = predict_many(
        args.model,
        args.images,
        args.output,
        probabilities=args.probabilities,
        uncertainty=args.uncertainty,
        device=args.device,
        channel_axis=args.channel_axis,
        progress=not args.quiet,
        memory=args.memory,
        scheduler=args.scheduler or args.dask,
        warn=lambda text: _to_stderr("predict", f"warning: {text}"),
    )
    for line in summary.failure_lines():  # errors on stderr, the totals on stdout
        _to_stderr("predict", line)
    say(summary.text())
    return 1 if summary.failed else 0


def _to_stderr(command: str, line: str) -> None:
    """``line`` on stderr as ``napari-dsparse COMMAND: line``."""
    print(f"napari-dsparse {command}: {line}", file=sys.stderr, flush=True)


def _run_export(args: argparse.Namespace) -> int:
    from napari_dsparse.bioimageio_export import export_bioimageio

    export_bioimageio(args.model, args.bioimageio, report=say)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    if args.headless:
        from napari_dsparse.demo import run_headless_demo

        run_headless_demo(
            args.output,
            rounds=args.rounds,
            round_seconds=args.round_seconds,
            device=args.device,
            report=say,
        )
        return 0
    _check_display()
    from napari_dsparse._demo import run_gui_demo

    run_gui_demo()
    return 0


def _check_display() -> None:
    """``InputError`` on Linux without a display for Qt, where Qt would abort."""
    platform = (os.environ.get("QT_QPA_PLATFORM") or "xcb").split(":")[0]
    if not sys.platform.startswith("linux") or platform not in ("xcb", "wayland"):
        return  # other systems have one; offscreen, vnc, eglfs... need none
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        from napari_dsparse.data import InputError

        raise InputError(
            "no display to open napari on: run `napari-dsparse demo --headless`, "
            "or under a virtual display: `xvfb-run -a napari-dsparse demo`"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="napari-dsparse",
        description="Live pixel classification with exact d-regularly sparse kernels.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="open napari with the sample image, its scribbles and the widget"
    )
    demo.add_argument(
        "--headless",
        action="store_true",
        help="run the loop without a window, with simulated correction strokes",
    )
    demo.add_argument(
        "--output",
        "-o",
        default="dsparse-demo",
        help="folder for --headless results (default %(default)s)",
    )
    demo.add_argument(
        "--rounds",
        type=_positive(int),
        default=4,
        help="--headless rounds (default %(default)s)",
    )
    demo.add_argument(
        "--round-seconds",
        type=_positive(float, finite=True),
        default=5.0,
        help="training per round (default %(default)s)",
    )
    demo.add_argument("--device", help="cpu, cuda, mps (default: best)")
    demo.set_defaults(func=_run_demo)
    _add_train_parser(commands)
    _add_predict_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from napari_dsparse.nets import DEFAULT_PRESET, PRESETS
    from napari_dsparse.train import TrainConfig

    train = commands.add_parser(
        "train",
        help="train a model from images and their painted labels",
        description="Train one model on one or more images and their painted labels "
        "(0 unpainted, 1..K classes). Images may differ in size; their channels "
        "must agree.",
    )
    train.add_argument(
        "image", nargs="?", help="image file (.tif, .tiff, .npy, .png, .jpg) or .zarr"
    )
    train.add_argument("labels", nargs="?", help="labels: 0 unpainted, 1..K classes")
    train.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("IMAGE", "LABELS"),
        help="one more image and its labels (repeat for each image)",
    )
    train.add_argument(
        "--normalization",
        choices=("per-image", "fixed"),
        default="per-image",
        help="per-image: each image by its own 1st-99.8th percentiles, also when "
        "predicting (default); fixed: the training images' pooled percentiles for "
        "every image",
    )
    train.add_argument("--output", "-o", required=True, help="model file to write")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument(
        "--seconds",
        type=_positive(float),
        help="training time (default: 30 s; inf: until Ctrl-C, then the model is "
        "written)",
    )
    budget.add_argument("--steps", type=_positive(int), help="number of training steps")
    train.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help="network; "
        + "; ".join(f"{name}: {PRESETS[name].summary}" for name in sorted(PRESETS)),
    )
    train.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best)")
    train.add_argument(
        "--seed", type=_seed, default=0, help="random seed, 0 to 2**32 - 1 (default 0)"
    )
    train.add_argument(
        "--prior-strength",
        type=_prior_strength,
        default=TrainConfig.prior_strength,
        metavar="S",
        help="0-1: how far predictions move from the painted class shares to those "
        "estimated in the images; 0 keeps the painted ones (default %(default)s)",
    )
    train.add_argument(
        "--focal-gamma",
        type=_focal_gamma,
        default=TrainConfig.focal_gamma,
        metavar="G",
        help="0 or 1-10: focusing of the loss on the painted pixels the model gets "
        "wrong; 0 is the plain cross-entropy (default %(default)s)",
    )
    _add_channel_axis(
        train,
        "the one the file's metadata names, else the last axis if it has 3 or 4 "
        "entries in a 3D array",
    )
    train.set_defaults(func=_run_train)


def _number(
    kind: type[int] | type[float], valid: Callable[[float], bool], bound: str
) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` for which ``valid`` holds; else the
    error says it "must be ``bound``"."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' * (kind is int)}number, got {text!r}"
            ) from None
        if not valid(value):  # nan fails every bound below
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _positive(
    kind: type[int] | type[float], finite: bool = False
) -> Callable[[str], int | float]:
    """A number of ``kind`` above 0 (floats: ``inf`` unless ``finite``)."""
    if finite:
        return _number(kind, lambda v: 0 < v < math.inf, "a finite number above 0")
    return _number(kind, lambda v: v > 0, "above 0")


_seed = _number(int, lambda v: 0 <= v < 2**32, "from 0 to 4294967295")  # NumPy, torch
_prior_strength = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")
_focal_gamma = _number(float, lambda v: v == 0 or 1 <= v <= 10, "0 or between 1 and 10")


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="apply a model to images, folders or glob patterns",
        description="Predict every image with one progress bar, then print a summary "
        "(files, pixels, seconds). Files that cannot be read are skipped and listed; "
        "the exit code is then 1.",
    )
    predict.add_argument("model", help="model file written by 'train'")
    predict.add_argument(
        "images",
        nargs="+",
        help="image files or zarr stores, folders (their .tif/.tiff/.npy/.png/.jpg "
        "files and .zarr stores) or quoted glob patterns such as 'data/*.tif'",
    )
    predict.add_argument(
        "--output",
        "-o",
        required=True,
        help="a .tif file or .zarr store for one image, a folder for several",
    )
    predict.add_argument(
        "--probabilities", action="store_true", help="also write class probabilities"
    )
    predict.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write 1 - max probability, rescaled to 0-1 (1: all classes equal)",
    )
    predict.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best)")
    _add_channel_axis(
        predict,
        "the one the file's metadata names, else the model's training axis for "
        "files laid out alike, else the last axis if it has 3 or 4 entries in a 3D "
        "array",
    )
    _add_large_image_options(predict)
    predict.set_defaults(func=_run_predict)


def _add_large_image_options(predict: argparse.ArgumentParser) -> None:
    from napari_dsparse.large import parse_memory

    predict.add_argument(
        "--memory",
        type=_input_error_to_usage(parse_memory),
        default="1GB",
        help="memory for one tile's computation, e.g. 512MB, 4GB (default 1GB)",
    )
    predict.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    cluster = predict.add_mutually_exclusive_group()
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the dask cluster whose scheduler is at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786)",
    )
    cluster.add_argument(
        "--dask",
        choices=["local"],
        help="'local': run on a dask cluster started on this machine",
    )


def _input_error_to_usage(parse):
    """An argparse type from a parser that raises ``InputError``."""
    from napari_dsparse.data import InputError

    def convert(text: str):
        try:
            return parse(text)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    convert.__name__ = parse.__name__
    return convert


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="convert a model file for other tools (bioimage.io)"
    )
    export.add_argument("model", help="model file written by 'train' or napari")
    export.add_argument(
        "--bioimageio",
        metavar="OUT.zip",
        required=True,
        help="write a bioimage.io model package (spec 0.5, TorchScript weights)",
    )
    export.set_defaults(func=_run_export)


def _add_channel_axis(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--channel-axis", type=int, help=f"axis of the channels (default: {default})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-dsparse`` console script."""
    args = build_parser().parse_args(argv)
    from napari_dsparse.data import InputError
    from napari_dsparse.export import WriteError
    from napari_dsparse.train import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as error:
        reason = f"training diverged ({error.reason}); no model was written"
        _to_stderr(args.command, f"error: {reason}")
        return 1
    except WriteError as error:  # an output the system refuses to write
        _to_stderr(args.command, f"error: {error}")
        return 1
    except InputError as error:
        _to_stderr(args.command, f"error: {error}")
        return 2
    except OSError as error:  # e.g. an output path that is a folder, a full disk
        _to_stderr(args.command, f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _to_stderr(args.command, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
