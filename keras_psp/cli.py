"""The `keras-psp` command line: summary, slim, export and bench.

    keras-psp summary MODEL.keras
    keras-psp slim MODEL.keras -o SLIM.keras
    keras-psp export SLIM.keras -o model.tflite [--quantize int8 --calibration X.npy]
    keras-psp bench A [B] [--batch-size 1] [--rounds 20]

Bad input (a missing or corrupt file, a model without PSP layers for `slim`,
...) prints one line, `keras-psp: error: ...`, on stderr and exits with
status 2; a file that fails verification exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from keras_psp import commands
from keras_psp._version import __version__


def _add_summary(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="per-layer table of what slimming saves",
        description="Print the per-layer table of keras_psp.summary: structures kept, "
        "FLOPs and parameters before → after slimming.",
    )
    p.add_argument("model", help="a .keras model file (PSP-wrapped or plain)")
    p.set_defaults(run=commands.summary)


def _add_slim(sub) -> None:
    p = sub.add_parser(
        "slim",
        help="rebuild a PSP-wrapped model physically smaller, verified",
        description="Slim a PSP-wrapped model (keras_psp.slim), verify it against the "
        f"pruned model on {commands.SLIM_CHECK_SAMPLES} random inputs and save it as a "
        "plain .keras file. Prints parameters and FLOPs before → after.",
    )
    p.add_argument("model", help="a .keras file with PSP layers")
    p.add_argument("-o", "--output", help="where to save the slim model (default: MODEL_slim.keras)")
    p.add_argument("--multiple-of", type=int, metavar="N",
                   help="round every width up to a multiple of N (8 suits CPU kernels)")
    p.add_argument("--no-gather", action="store_true",
                   help="keep zero weights instead of gathering a consumer's own channels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=commands.slim)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a verified SavedModel or LiteRT file",
        description="Export a plain (slim) .keras model with keras_psp.export and print "
        "the report: size, ops, and its difference from the Keras model.",
    )
    p.add_argument("model", help="a .keras file without PSP layers (run `keras-psp slim` first)")
    p.add_argument("-o", "--output", required=True,
                   help="the SavedModel directory or .tflite file to write")
    p.add_argument("--format", choices=["saved_model", "tflite"],
                   help="default: tflite for a .tflite output, else saved_model")
    p.add_argument("--quantize", choices=["dynamic", "float16", "int8"],
                   help="LiteRT quantization (int8 needs --calibration)")
    p.add_argument("--calibration", metavar="DATA.npy",
                   help="typical inputs (N, ...) to calibrate int8 and to verify on")
    p.add_argument("--check", metavar="DATA.npy", help="inputs (N, ...) to verify on")
    p.add_argument("--jit-compile", action="store_true",
                   help="XLA-compile the SavedModel's serving function")
    p.add_argument("--allow-select-ops", action="store_true",
                   help="let the LiteRT file use TensorFlow (Flex) ops")
    p.add_argument("--int8-io", action="store_true",
                   help="int8 inputs and outputs for an int8 file (default: float32)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison (not advised)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(run=commands.export)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="interleaved latency of one or two models",
        description="Time one or two models on the same random inputs, interleaved "
        "(A B A B …), and print the median latencies and their ratio B/A. A model is a "
        ".keras file (run with XLA, tf.function(jit_compile=True)), a SavedModel "
        "directory or a .tflite file (LiteRT).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="A, and optionally B")
    p.add_argument("-b", "--batch-size", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("-r", "--rounds", type=int, default=20, help="timed rounds (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    p.add_argument("--threads", type=int, help="LiteRT interpreter threads (default: LiteRT's)")
    p.set_defaults(run=commands.bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-psp",
        description="Parameterized Structured Pruning for Keras 3: wrap, "
        "train, slim and export smaller networks.",
        epilog="Run `keras-psp COMMAND --help` for a command's options. Bad input "
        "exits with status 2, a failed verification with 1.",
    )
    parser.add_argument("--version", action="version", version=f"keras-psp {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback instead of a one-line error")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add in (_add_summary, _add_slim, _add_export, _add_bench):
        add(sub)
    return parser


def _error(message: str, status: int) -> int:
    print(f"keras-psp: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    from keras_psp.export import VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench" and len(args.models) > 2:
        parser.error("bench takes one or two models (A [B]).")
    try:
        return args.run(args)
    except Exception as error:
        if args.traceback:
            raise
        message = commands.one_line(error)
        if isinstance(error, (VerificationError, RuntimeError)):
            return _error(message, 1)
        if isinstance(error, (commands.CommandError, ValueError, TypeError, OSError, ImportError)):
            return _error(message, 2)
        raise


if __name__ == "__main__":
    sys.exit(main())
