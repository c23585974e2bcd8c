"""`export`: write a deployable SavedModel or LiteRT file, verified.

The file is written to a staging folder next to `path`, reloaded with the
runtime that will serve it (`tf.saved_model.load`, or `ai_edge_litert`'s
interpreter), compared with the Keras model, and only then moved to `path`.
A file that does not compute what the Keras model computes never appears at
`path`: `export` raises `VerificationError` with the measured difference.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import tempfile

import keras
import numpy as np

from keras_psp._modules import callable_module
from keras_psp.cloning import psp_layers
from keras_psp.formats import FORMATS, Options
from keras_psp.runtimes import by_name, input_specs, input_structure, random_inputs
from keras_psp.samples import collect
from keras_psp.verify import check_inputs_argument, compare_outputs, non_finite_error

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
#: Default `atol` (relative to the largest |output|) of the float formats.
DEFAULT_ATOL = {None: 1e-4, "float16": 1e-2}
#: Examples of `representative_data` used to calibrate and verify (at most).
MAX_SAMPLES = 256
#: Random verification examples when the user gives no data.
RANDOM_SAMPLES = 16


class VerificationError(RuntimeError):
    """An exported file does not compute what the Keras model computes."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and how closely it matches the Keras model.

    Attributes:
        path: Where the file (LiteRT) or directory (SavedModel) is.
        format: "saved_model" or "tflite".
        quantize: None, "dynamic", "float16" or "int8".
        size: Bytes on disk (all files of a SavedModel directory).
        ops: Operator counts, e.g. {"CONV_2D": 57, ...} (SavedModel: the
            serving graph's compute ops).
        jit_compile: Whether the SavedModel's serving function is XLA-compiled.
        int8_io: Whether the LiteRT file takes and returns int8 tensors.
        checked: Examples compared with the Keras model (0: not verified).
        checked_on: Where they came from: "check_inputs",
            "representative_data" or "random inputs".
        max_diff: Largest |difference| of any output element.
        relative_error: RMS of the differences over RMS of the Keras outputs.
        agreement: Fraction of examples with the same top-1 class, for
            classifier-like outputs (rank 2, two or more classes); the
            worst output's. None otherwise.
        criterion: The check that passed, in words.
    """

    path: str
    format: str
    quantize: str | None
    size: int
    ops: dict[str, int]
    jit_compile: bool = False
    int8_io: bool = False
    checked: int = 0
    checked_on: str | None = None
    max_diff: float | None = None
    relative_error: float | None = None
    agreement: float | None = None
    criterion: str | None = None

    def __str__(self) -> str:
        if self.format == "saved_model":
            kind = "SavedModel" + (" + XLA" if self.jit_compile else "")
        else:
            io = "int8" if self.int8_io else "float32"
            kind = "LiteRT " + (self.quantize or "float32") + (
                f" ({io} inputs/outputs)" if self.quantize == "int8" else ""
            )
        top = sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = ", ".join(f"{op} {n}" for op, n in top[:6]) + (", …" if len(top) > 6 else "")
        lines = [
            f"{self.path}: {kind}, {self.size:,} bytes, {sum(self.ops.values())} ops ({listed})"
        ]
        if not self.checked:
            lines.append("not verified (verify=False)")
        else:
            check = (
                f"verified on {self.checked} examples ({self.checked_on}): "
                f"max |difference| {self.max_diff:.3g}, "
                f"relative RMS error {self.relative_error:.3g}"
            )
            if self.agreement is not None:
                check += f", top-1 agreement {self.agreement:.1%}"
            lines.append(f"{check}; passed {self.criterion}")
        return "\n".join(lines)


def _fail(message: str) -> ValueError:
    return ValueError(f"export: {message}")


def _check_arguments(
    model, path, format, quantize, representative_data, options: dict, tolerances: dict
) -> None:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "export needs the TensorFlow backend (KERAS_BACKEND=tensorflow): "
            "SavedModel and LiteRT are TensorFlow formats. Save the model with "
            "model.save('model.keras') and export it in a TensorFlow process."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(f"export expects a keras.Model, got {type(model).__name__}.")
    functional = keras.src.models.functional.Functional
    if not isinstance(model, (keras.Sequential, functional)) or not model.inputs:
        raise _fail(
            f"model '{model.name}' has no functional graph with defined inputs. "
            "Export a Sequential or functional model (give it a keras.Input)."
        )
    wrapped = psp_layers(model)
    if wrapped:
        names = ", ".join(layer.name for layer in wrapped[:5]) + (", …" if len(wrapped) > 5 else "")
        raise _fail(
            f"model '{model.name}' still contains {len(wrapped)} PSP wrapper(s) ({names}). "
            "Export the deployable model: keras_psp.slim(model) (physically smaller) "
            "or keras_psp.strip(model) (same shapes, α folded into the kernels)."
        )
    if format not in FORMATS:
        raise _fail(f"unknown format {format!r}; choose one of {tuple(FORMATS)}.")
    if quantize not in QUANTIZE_MODES:
        raise _fail(f"unknown quantize mode {quantize!r}; choose one of {QUANTIZE_MODES}.")
    if quantize not in FORMATS[format].quantize:
        able = [name for name, f in FORMATS.items() if quantize in f.quantize]
        raise _fail(
            f"quantize={quantize!r} needs format={able[0]!r}: format {format!r} keeps "
            "the Keras model's float32 weights."
        )
    if quantize == "int8" and representative_data is None:
        raise _fail(
            "quantize='int8' needs representative_data: a few hundred typical inputs "
            "(array, tf.data.Dataset or generator) to calibrate the activation ranges."
        )
    for option, value in options.items():
        if value and option not in FORMATS[format].options:
            able = [name for name, f in FORMATS.items() if option in f.options]
            raise _fail(f"{option}=True applies to format={able[0]!r} only.")
    if options.get("int8_io") and quantize != "int8":
        raise _fail("int8_io=True applies to quantize='int8' only.")
    if format != "tflite" and str(path).endswith(".tflite"):
        raise _fail(
            f"format={format!r} writes a directory, but the path '{path}' ends with "
            ".tflite: pass format='tflite'."
        )
    for name, value in tolerances.items():
        if value is not None and not 0 <= value < float("inf"):
            raise _fail(f"{name} must be a non-negative number, got {value!r}.")


def _staging(path: str, overwrite: bool) -> str:
    """Checks `path` and returns a fresh staging folder next to it."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"export: '{path}' already exists. Pass overwrite=True to replace it, "
            "or choose another path."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise PermissionError(
            f"export: cannot write to '{path}': '{parent}' is a file, not a directory."
        )
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=".keras_psp_export_", dir=parent)
    except OSError as error:
        raise PermissionError(
            f"export: cannot write to the output directory '{parent}' "
            f"({error.strerror or error}). Choose a writable location."
        ) from error


def _fixed_shapes(model, format, specs, check_inputs, data) -> tuple | None:
    """Example shapes for a LiteRT file of a model whose inputs have unknown
    sizes (beyond the batch): those of the check inputs or representative data.
    XNNPACK plans its buffers for fixed sizes, so the file needs them."""
    unknown = [(name, shape) for name, shape, _ in specs if None in shape[1:]]
    if format != "tflite" or not unknown:
        return None
    if check_inputs is not None:
        arrays = collect(check_inputs, specs, None, "check_inputs")
    elif data is not None:
        arrays = data
    else:
        listed = ", ".join(f"'{name}' {shape}" for name, shape in unknown)
        raise _fail(
            f"model '{model.name}' has input(s) of unknown size ({listed}), but a LiteRT "
            "file needs fixed sizes (XNNPACK plans its buffers for them). Pass "
            "check_inputs (or representative_data) of the size you deploy: the file takes "
            "their shapes."
        )
    return tuple(tuple(int(d) for d in np.shape(a)[1:]) for a in arrays)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _judge(measured: dict, quantize, atol, quantized_tolerance, min_agreement) -> tuple[bool, str]:
    """Whether `measured` passes, and the criterion in words."""
    if quantize in DEFAULT_ATOL:
        atol = DEFAULT_ATOL[quantize] if atol is None else atol
        allowed = atol * measured["scale"]
        return measured["max_diff"] <= allowed, f"max |difference| ≤ {allowed:.3g} ({atol:g} × max |output|)"
    passed = measured["relative_error"] <= quantized_tolerance
    criterion = f"relative RMS error ≤ {quantized_tolerance:g}"
    if min_agreement is not None and measured["agreement"] is not None:
        passed = passed and measured["agreement"] >= min_agreement
        criterion += f" and top-1 agreement ≥ {min_agreement:.1%}"
    return passed, criterion


def _keras_call(model: keras.Model):
    """The Keras model as a runner: eager calls in inference mode."""
    structure = input_structure(model)

    def run(arrays):
        outputs = model(keras.tree.pack_sequence_as(structure, arrays), training=False)
        return [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(outputs)]

    return run


def _predict(runner, arrays: list[np.ndarray], batch: int = 64) -> list[np.ndarray]:
    parts = [runner([a[i : i + batch] for a in arrays]) for i in range(0, len(arrays[0]), batch)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def export(
    model: keras.Model,
    path: str | os.PathLike,
    format: str = "saved_model",
    quantize: str | None = None,
    representative_data=None,
    verify: bool = True,
    check_inputs=None,
    atol: float | None = None,
    quantized_tolerance: float = 0.1,
    min_agreement: float | None = None,
    jit_compile: bool = False,
    allow_select_ops: bool = False,
    int8_io: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Writes `model` as a SavedModel or LiteRT file and checks it.

    The file is written next to `path`, reloaded with the runtime that will
    serve it and compared with the Keras model (inference mode); it is moved
    to `path` only when it passes. What passes:

    | quantize | compared on | passes when |
    |---|---|---|
    | None | `check_inputs`, else `representative_data`, else 16 seeded random inputs | max \\|diff\\| ≤ `atol` (1e-4) × max \\|output\\| |
    | "float16" | same | max \\|diff\\| ≤ `atol` (1e-2) × max \\|output\\| |
    | "dynamic" | same | relative RMS error ≤ `quantized_tolerance` (0.1) |
    | "int8" | `check_inputs`, else `representative_data` | relative RMS error ≤ `quantized_tolerance` (0.1) |

    Quantized files are approximations: for them the report gives the top-1
    agreement of classifier outputs and the largest difference, and
    `min_agreement` adds a floor on the agreement. Random inputs are uniform
    in [0, 1); pass your own data when the model expects something else.

    Formats:

    - "saved_model": a directory with one endpoint `serve` (also the
      "serving_default" signature), inference mode, dynamic batch size,
      inputs named after the Keras inputs; `jit_compile=True` compiles the
      serving function with XLA. Built with `keras.export.ExportArchive`.
    - "tflite": a LiteRT flatbuffer, converted from a temporary SavedModel
      with builtin ops only (`allow_select_ops=True` adds TensorFlow ops).
      "dynamic" stores int8 weights, "float16" float16 weights; "int8" is
      full-integer quantization calibrated on `representative_data`. An int8
      file keeps float32 inputs and outputs (quantize/dequantize ops at the
      edges), so it is a drop-in replacement for the float one;
      `int8_io=True` makes them int8, for integer-only hardware.

    Args:
        model: A Sequential or functional model without PSP wrappers (slim
            or strip a wrapped model first).
        path: The SavedModel directory or `.tflite` file to write.
        format: "saved_model" or "tflite".
        quantize: None, "dynamic", "float16" or "int8" (tflite only).
        representative_data: Typical inputs: an array, a list/dict of arrays
            for several inputs, a `tf.data.Dataset` (`(x, y)` elements are
            fine), a generator or a callable returning one. The first 256
            examples calibrate int8 and serve as verification inputs.
        verify: Compare the written file with the model (recommended).
        check_inputs: Verification inputs (same forms as
            `representative_data`).
        atol: Tolerance of the float formats, relative to the largest
            |output|; None: 1e-4 (float32) or 1e-2 (float16).
        quantized_tolerance: Largest relative RMS error of "dynamic" and
            "int8" files.
        min_agreement: Optional lowest top-1 agreement for quantized files.
        jit_compile: XLA-compile the SavedModel's serving function.
        allow_select_ops: Let the LiteRT file use TensorFlow (Flex) ops.
        int8_io: With "int8", int8 inputs and outputs instead of float32.
        overwrite: Replace an existing `path`.

    Returns:
        An `ExportReport` (print it for a summary).

    Raises:
        ValueError: for a model with PSP wrappers, an unknown format or mode,
            an option that does not fit the format, int8 without
            representative data, or a failed LiteRT conversion.
        FileExistsError: if `path` exists and `overwrite` is False.
        PermissionError: if the output directory cannot be written.
        VerificationError: if the file does not match the model; nothing is
            written to `path` then.

    Example:

    ```python
    small = keras_psp.slim(wrapped)
    print(keras_psp.export(small, "serving", jit_compile=True))
    keras_psp.export(small, "model.tflite", format="tflite", quantize="int8",
                     representative_data=x_train[:256])
    ```
    """
    flags = dict(jit_compile=jit_compile, allow_select_ops=allow_select_ops, int8_io=int8_io)
    path = os.fspath(path)
    tolerances = dict(
        atol=atol, quantized_tolerance=quantized_tolerance, min_agreement=min_agreement
    )
    _check_arguments(model, path, format, quantize, representative_data, flags, tolerances)
    specs = input_specs(model)
    data = None
    if representative_data is not None:
        data = collect(representative_data, specs, MAX_SAMPLES, "representative_data")
    shapes = _fixed_shapes(model, format, specs, check_inputs, data)
    stage = _staging(path, overwrite)
    try:
        staged = os.path.join(stage, os.path.basename(os.path.normpath(path)) or "export")
        FORMATS[format].write(model, staged, Options(quantize, data, shapes=shapes, **flags), stage)
        runner = FORMATS[format].runner(staged)
        fields = dict(
            path=path,
            format=format,
            quantize=quantize,
            size=_size(staged),
            ops=dict(collections.Counter(runner.ops())),
            jit_compile=bool(getattr(runner, "jit_compile", False)),
            int8_io=int8_io,
        )
        if verify:
            if check_inputs is not None:
                inputs, source = collect(check_inputs, specs, None, "check_inputs"), "check_inputs"
                check_inputs_argument(inputs, "export")
            elif data is not None:
                inputs, source = data, "representative_data"
            else:
                inputs, source = random_inputs(specs, RANDOM_SAMPLES), "random inputs"
            names = [name for name, _, _ in specs]
            expected = _predict(_keras_call(model), inputs)
            if not all(np.all(np.isfinite(e)) for e in expected):
                error = non_finite_error(model, "export", f"the {len(inputs[0])} {source}")
                raise VerificationError(f"{error} Nothing was written to '{path}'.")
            try:
                measured = compare_outputs(
                    expected, _predict(runner, by_name(inputs, names, runner))
                )
            except ValueError as error:  # other outputs: as wrong as it gets
                raise VerificationError(f"export: the {format} file {error}") from error
            passed, criterion = _judge(measured, quantize, atol, quantized_tolerance, min_agreement)
            agreement = measured["agreement"]
            if not passed:
                raise VerificationError(
                    f"export: the {format} file differs from model '{model.name}': max "
                    f"|difference| {measured['max_diff']:.3g}, relative RMS error "
                    f"{measured['relative_error']:.3g}"
                    + (f", top-1 agreement {agreement:.1%}" if agreement is not None else "")
                    + f" on {len(inputs[0])} examples; required {criterion}. Nothing was "
                    f"written to '{path}'"
                    + (" (the existing one is unchanged)." if os.path.lexists(path) else ".")
                )
            fields.update(
                checked=len(inputs[0]),
                checked_on=source,
                max_diff=measured["max_diff"],
                relative_error=measured["relative_error"],
                agreement=agreement,
                criterion=criterion,
            )
        del runner
        if os.path.isdir(path) and not os.path.islink(path):  # overwrite=True (see _staging)
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        os.replace(staged, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportReport(**fields)


callable_module(__name__, export)
