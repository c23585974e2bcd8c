"""What the `keras-psp` commands do; `keras_psp.cli` parses the arguments.

Each command takes the parsed `argparse.Namespace`, prints its result and
returns the exit status. Bad input raises `CommandError` (or a `ValueError`,
`FileExistsError`, ... from the library), which the command line turns into
one line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import os
import zipfile

import keras
import numpy as np

from keras_psp.runtimes import (
    KerasRunner,
    LiteRTRunner,
    SavedModelRunner,
    by_name,
    input_specs,
    input_structure,
    random_inputs,
)
from keras_psp.timing import interleaved, medians_ms

#: Random inputs `slim` is verified on.
SLIM_CHECK_SAMPLES = 32


class CommandError(Exception):
    """Bad input to a command: printed as one line, exit status 2."""


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_keras(path: str) -> keras.Model:
    """Loads a `.keras` (or legacy `.h5`) model file, with clear errors.

    PSP wrappers load because importing keras_psp registers them.
    """
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file.")
    if os.path.isdir(path):
        what = "a SavedModel directory" if os.path.exists(os.path.join(path, "saved_model.pb")) else "a directory"
        raise CommandError(f"{path} is {what}; this command needs a .keras model file.")
    if not path.endswith((".keras", ".h5")):
        raise CommandError(
            f"{path} is not a .keras file: save the model with model.save('model.keras')."
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise CommandError(f"{path} is not a valid .keras archive (not a zip file: truncated or corrupt?).")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # a broken archive, unknown layers, ...
        raise CommandError(f"cannot load {path}: {one_line(error)}") from error


def _output_path(path: str, overwrite: bool) -> str:
    if os.path.lexists(path) and not overwrite:
        raise CommandError(f"{path} already exists: pass --overwrite to replace it.")
    return path


def summary(args: argparse.Namespace) -> int:
    from keras_psp.report import summary as table

    table(load_keras(args.model))
    return 0


def slim(args: argparse.Namespace) -> int:
    from keras_psp.cloning import psp_layers
    from keras_psp.flops import count_flops
    from keras_psp.surgery.slim import slim as slim_model
    from keras_psp.verify import verify

    model = load_keras(args.model)
    wrapped = psp_layers(model)
    if not wrapped:
        raise CommandError(
            f"{args.model} has no PSP layers, so slim would remove nothing: wrap the "
            "model with keras_psp.wrap and train it first."
        )
    output = args.output or os.path.splitext(args.model)[0] + "_slim.keras"
    if not output.endswith(".keras"):
        raise CommandError(f"-o {output}: the slim model is saved as a .keras file; end the name with .keras.")
    _output_path(output, args.overwrite)
    arrays = random_inputs(input_specs(model), SLIM_CHECK_SAMPLES, seed=0)
    x = keras.tree.pack_sequence_as(input_structure(model), arrays)
    small = slim_model(model, check_inputs=x, gather=not args.no_gather, multiple_of=args.multiple_of)
    diff = verify(model, small, x)
    small.save(output)
    alphas = sum(layer.own_param_count() for layer in wrapped)
    rows = [
        ("parameters", model.count_params() - alphas, small.count_params()),
        ("FLOPs (MACs)", count_flops(model), count_flops(small)),
    ]
    print(f"slim: {args.model} → {output}")
    width = max(len(f"{b:,}") for _, b, _ in rows)
    for name, before, after in rows:
        ratio = f"{after / before:.3f}" if before else "n/a"
        print(f"  {name:<13}{before:>{width},} → {after:>{width},}  ({ratio})")
    print(f"  verified on {SLIM_CHECK_SAMPLES} random inputs: max |difference| {diff:.2g}")
    return 0


def _load_npy(path: str, flag: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise CommandError(f"{flag} {path}: no such file.")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise CommandError(f"{flag} {path} is not a .npy file: save the array with numpy.save.")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"{flag} {path}: cannot read the array: {one_line(error)}") from error


def export(args: argparse.Namespace) -> int:
    from keras_psp.cloning import psp_layers
    from keras_psp.export import export as export_model

    model = load_keras(args.model)
    if psp_layers(model):
        raise CommandError(
            f"{args.model} still contains PSP wrappers: run `keras-psp slim {args.model} "
            "-o SLIM.keras` first and export SLIM.keras."
        )
    fmt = args.format or ("tflite" if args.output.endswith(".tflite") else "saved_model")
    report = export_model(
        model,
        args.output,
        format=fmt,
        quantize=args.quantize,
        representative_data=_load_npy(args.calibration, "--calibration") if args.calibration else None,
        check_inputs=_load_npy(args.check, "--check") if args.check else None,
        verify=not args.no_verify,
        jit_compile=args.jit_compile,
        allow_select_ops=args.allow_select_ops,
        int8_io=args.int8_io,
        overwrite=args.overwrite,
    )
    print(report)
    return 0


def open_runner(path: str, threads: int | None = None):
    """A runner for a `.keras` file (XLA), a SavedModel directory or a `.tflite` file."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise CommandError(f"{path} is a directory without saved_model.pb: not a SavedModel.")
        try:
            return SavedModelRunner(path)
        except Exception as error:
            raise CommandError(f"cannot load SavedModel {path}: {one_line(error)}") from error
    if path.endswith(".tflite"):
        if not os.path.isfile(path):
            raise CommandError(f"{path}: no such file.")
        try:
            return LiteRTRunner(path, threads=threads)
        except Exception as error:
            raise CommandError(f"cannot load LiteRT file {path}: {one_line(error)}") from error
    if not os.path.exists(path) or path.endswith((".keras", ".h5")):
        return KerasRunner(load_keras(path), jit_compile=True)
    raise CommandError(f"{path}: expected a .keras file, a SavedModel directory or a .tflite file.")


def _aligned(a, b, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`arrays` (in `a`'s input order) in `b`'s input order, matched by name
    when both name the same inputs; checks the shapes agree."""
    names_a, names_b = [n for n, _, _ in a.inputs], [n for n, _, _ in b.inputs]
    if len(names_a) != len(names_b):
        raise CommandError(f"the models take {len(names_a)} and {len(names_b)} inputs: not comparable.")
    if sorted(names_a) == sorted(names_b):
        arrays = by_name(arrays, names_a, b)
    for (name, shape, _), x in zip(b.inputs, arrays, strict=True):
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape[1:], x.shape[1:], strict=True)):
            raise CommandError(f"the models take different inputs: '{name}' of shape {shape} vs {x.shape}.")
    return arrays


def bench(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.batch_size < 1 or args.warmup < 0:
        raise CommandError("--rounds and --batch-size must be positive, --warmup not negative.")
    runners = [open_runner(path, args.threads) for path in args.models]
    arrays = random_inputs(runners[0].inputs, args.batch_size, seed=0)
    prepared = [runners[0].prepare(arrays)]
    for runner in runners[1:]:
        prepared.append(runner.prepare(_aligned(runners[0], runner, arrays)))
    cases = {i: functools.partial(runner.run, inputs)
             for i, (runner, inputs) in enumerate(zip(runners, prepared, strict=True))}
    by_case = interleaved(cases, args.rounds, warmup=args.warmup)  # A B A B ...
    samples = list(by_case.values())
    medians = list(medians_ms(by_case).values())
    print(
        f"bench: batch {args.batch_size}, {args.rounds} interleaved rounds"
        + (" (A B A B …)" if len(runners) > 1 else "")
        + f", {args.warmup} warm-up runs each"
    )
    width = max(len(p) for p in args.models)
    for label, path, runner, median, times in zip("AB", args.models, runners, medians, samples, strict=False):
        print(
            f"  {label}  {path:<{width}}  {runner.kind:<16}  median {median:.3f} ms"
            f"  (min {min(times) * 1e3:.3f}, max {max(times) * 1e3:.3f})"
        )
    if len(medians) == 2:
        print(f"ratio B/A (median latency): {medians[1] / medians[0]:.3f}")
    return 0
