"""Command line: ``napari-dsparse demo|...``.

Each subcommand parses its arguments, calls the Qt-free core (or, for ``demo``,
opens napari) and turns the core's errors into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from napari_dsparse import __version__


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _run_demo(args: argparse.Namespace) -> int:
    from napari_dsparse._demo import run_gui_demo

    run_gui_demo()
    return 0


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
    demo.set_defaults(func=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-dsparse`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as error:
        print(f"napari-dsparse {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-dsparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
