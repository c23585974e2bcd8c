"""The `keras-psp` command line."""

from __future__ import annotations

import argparse
import sys

from keras_psp._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-psp",
        description="Parameterized Structured Pruning for Keras 3: wrap, "
        "train, slim and export smaller networks.",
    )
    parser.add_argument("--version", action="version", version=f"keras-psp {__version__}")
    parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
