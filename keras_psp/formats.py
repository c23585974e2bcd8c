"""Export formats: how each writes a file and which runner reads it back.

`FORMATS` maps a format name to a `Format`: its writer, the runner from
`keras_psp.runtimes` that loads what it wrote (for verification), the
quantization modes and the options it accepts. A new format is one writer
and one entry here; `keras_psp.export` does the checks, staging and
verification for all of them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import keras
import numpy as np

from keras_psp.runtimes import (
    SIGNATURE,
    LiteRTRunner,
    SavedModelRunner,
    input_specs,
    input_structure,
)
from keras_psp.samples import examples


@dataclasses.dataclass(frozen=True)
class Options:
    """What `keras_psp.export` passes to a writer (see its Args)."""

    quantize: str | None = None
    calibration: list[np.ndarray] | None = None
    jit_compile: bool = False
    allow_select_ops: bool = False
    int8_io: bool = False
    #: Fixed example shapes (no batch axis), one per input, for inputs with
    #: unknown sizes; None: the model's own input shapes.
    shapes: tuple | None = None


def write_saved_model(model: keras.Model, path: str, options: Options, workdir: str) -> None:
    """A SavedModel with one endpoint "serve" (also the "serving_default"
    signature): inference mode, dynamic batch size, inputs named after the
    Keras inputs, XLA-compiled with `options.jit_compile`."""
    import tensorflow as tf

    structure = input_structure(model)
    flat = keras.tree.flatten(structure)
    names = {id(t): name for t, (name, _, _) in zip(flat, input_specs(model), strict=True)}
    shapes = {id(t): tuple(t.shape[1:]) for t in flat}
    if options.shapes is not None:
        shapes = {id(t): tuple(s) for t, s in zip(flat, options.shapes, strict=True)}
    signature = keras.tree.map_structure(
        lambda t: tf.TensorSpec((None,) + shapes[id(t)], t.dtype, name=names[id(t)]),
        structure,
    )
    serve = tf.function(
        lambda inputs: model(inputs, training=False),
        jit_compile=options.jit_compile,
        autograph=False,
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[signature])
    archive.write_out(path, verbose=False)


def write_tflite(model: keras.Model, path: str, options: Options, workdir: str) -> None:
    """A LiteRT flatbuffer converted from a float SavedModel in `workdir`
    (Keras 3 models cannot use `TFLiteConverter.from_keras_model`)."""
    import tensorflow as tf

    saved = os.path.join(workdir, "saved_model")
    write_saved_model(model, saved, Options(shapes=options.shapes), workdir)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
    builtins = (
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if options.quantize == "int8"
        else tf.lite.OpsSet.TFLITE_BUILTINS
    )
    ops = [builtins] + ([tf.lite.OpsSet.SELECT_TF_OPS] if options.allow_select_ops else [])
    converter.target_spec.supported_ops = ops
    if options.quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if options.quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if options.quantize == "int8":
        names = [name for name, _, _ in input_specs(model)]
        converter.representative_dataset = examples(options.calibration, names)
        if options.int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():  # the int8 calibrator uses tf.lite.Interpreter
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            content = converter.convert()
    except Exception as error:  # ConverterError and friends, with the converter's log
        hint = "" if options.allow_select_ops else (
            " If it names ops that LiteRT lacks, allow_select_ops=True adds TensorFlow "
            "ops (the file then needs a runtime with the Flex delegate)."
        )
        raise ValueError(
            f"export: LiteRT conversion of model '{model.name}' failed: {error}{hint}"
        ) from error
    with open(path, "wb") as f:
        f.write(content)


@dataclasses.dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        write: `write(model, path, options, workdir)` writes the file or
            directory at `path`; `workdir` is a scratch folder.
        runner: Loads what `write` wrote, as a `keras_psp.runtimes` runner.
        quantize: The quantization modes it supports (None: float32).
        options: The `Options` flags (besides `quantize`) it accepts.
    """

    write: Callable[[keras.Model, str, Options, str], None]
    runner: Callable[[str], object]
    quantize: tuple[str | None, ...]
    options: frozenset[str]


FORMATS: dict[str, Format] = {
    "saved_model": Format(write_saved_model, SavedModelRunner, (None,), frozenset({"jit_compile"})),
    "tflite": Format(
        write_tflite,
        LiteRTRunner,
        (None, "dynamic", "float16", "int8"),
        frozenset({"allow_select_ops", "int8_io"}),
    ),
}
