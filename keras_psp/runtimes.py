"""Run a model the way it is deployed: Keras under XLA, a SavedModel, LiteRT.

Every runner has the same small interface, so that `keras_psp.export` can
check a written file against the Keras model and `keras-psp bench` can time
any two of them side by side:

- `inputs`: the input specs, a list of `(name, shape, dtype)` with `None`
  for unknown dimensions (the batch);
- `prepare(arrays)`: turns a list of float (or integer) numpy arrays, one per
  input in that order, into whatever the runtime takes, done once outside
  any timing;
- `run(prepared)`: runs the model and returns its outputs as a list of numpy
  arrays (float32 for quantized LiteRT outputs: they are dequantized);
- `__call__(arrays)`: `run(prepare(arrays))`.
"""

from __future__ import annotations

import os
import re

import keras
import numpy as np

#: The SavedModel / LiteRT signature that `keras_psp.export` writes and reads.
SIGNATURE = "serving_default"


def tensor_name(name: str) -> str:
    """`name` with every character TensorFlow refuses in a signature replaced."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return name if re.match(r"[A-Za-z]", name) else f"input_{name}"


def input_structure(model: keras.Model):
    """The nested structure of `model`'s input tensors, as `model(...)` takes it."""
    if isinstance(model, keras.Sequential):
        return model.inputs[0]
    return model.input


def input_specs(model: keras.Model) -> list[tuple[str, tuple, np.dtype]]:
    """`(name, shape, dtype)` of each input of `model`, in `keras.tree.flatten`
    order (`KerasRunner`'s; the file runners sort by name: see `by_name`)."""
    return [
        (tensor_name(t.name), tuple(t.shape), np.dtype(t.dtype))
        for t in keras.tree.flatten(input_structure(model))
    ]


def _output_order(name: str):
    """Sorts "output_0", "output_1", ..., "output_10" numerically, others by name."""
    match = re.fullmatch(r"output_(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


class KerasRunner:
    """A Keras model called in inference mode, XLA-compiled by default.

    Args:
        model: A built Sequential or functional model.
        jit_compile: Compile with XLA (`tf.function(jit_compile=True)`) on the
            TensorFlow backend; plain graph mode when False.

    Example:

    ```python
    [probabilities] = KerasRunner(model)([x_test[:128]])
    ```
    """

    kind = "Keras"

    def __init__(self, model: keras.Model, jit_compile: bool = True):
        import tensorflow as tf

        self.model = model
        self.structure = input_structure(model)
        self.inputs = input_specs(model)
        self.kind = "Keras + XLA" if jit_compile else "Keras (graph)"
        self._fn = tf.function(
            lambda x: model(x, training=False), jit_compile=jit_compile, autograph=False
        )

    def prepare(self, arrays: list[np.ndarray]):
        import tensorflow as tf

        return keras.tree.pack_sequence_as(self.structure, [tf.constant(a) for a in arrays])

    def run(self, prepared) -> list[np.ndarray]:
        return [np.asarray(y) for y in keras.tree.flatten(self._fn(prepared))]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.run(self.prepare(arrays))


class SavedModelRunner:
    """The "serving_default" signature of a SavedModel directory.

    Args:
        path: A SavedModel directory (from `keras_psp.export`, `model.export`
            or `tf.saved_model.save`).

    Example:

    ```python
    runner = SavedModelRunner("serving")
    [probabilities] = runner([x_test[:128]])
    ```
    """

    kind = "SavedModel"

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self.path = os.fspath(path)
        self.loaded = tf.saved_model.load(self.path)
        if SIGNATURE not in self.loaded.signatures:
            raise ValueError(
                f"SavedModel '{self.path}' has no '{SIGNATURE}' signature (it has "
                f"{sorted(self.loaded.signatures) or 'none'}). Export it with "
                "keras_psp.export or model.export(path)."
            )
        self._fn = self.loaded.signatures[SIGNATURE]
        _, specs = self._fn.structured_input_signature
        self.inputs = [
            (name, tuple(spec.shape), np.dtype(spec.dtype.as_numpy_dtype))
            for name, spec in sorted(specs.items())
        ]
        self.op_counts, self.jit_compile = _graph_ops(self._fn)
        if self.jit_compile:
            self.kind = "SavedModel + XLA"

    def ops(self) -> list[str]:
        """The compute ops of the serving graph, functions inlined (plumbing
        such as variable reads, constants and calls left out)."""
        return [op for op, n in sorted(self.op_counts.items()) for _ in range(n)]

    def prepare(self, arrays: list[np.ndarray]) -> dict:
        import tensorflow as tf

        return {name: tf.constant(a) for (name, _, _), a in zip(self.inputs, arrays, strict=True)}

    def run(self, prepared: dict) -> list[np.ndarray]:
        outputs = self._fn(**prepared)
        return [np.asarray(outputs[k]) for k in sorted(outputs, key=_output_order)]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.run(self.prepare(arrays))


#: Graph ops that move data around rather than compute; not counted.
_PLUMBING = frozenset(
    "Placeholder ReadVariableOp Identity IdentityN NoOp Const StatefulPartitionedCall "
    "PartitionedCall VarHandleOp".split()
)


def _graph_ops(fn) -> tuple[dict[str, int], bool]:
    """Op counts of a concrete function's graph and the functions it calls,
    and whether any of them must be compiled with XLA."""
    from collections import Counter

    graph = fn.graph.as_graph_def()
    counts = Counter(n.op for n in graph.node if n.op not in _PLUMBING)
    xla = False
    for function in graph.library.function:
        counts.update(n.op for n in function.node_def if n.op not in _PLUMBING)
        flag = function.attr.get("_XlaMustCompile")
        xla = xla or bool(flag is not None and flag.b)
    return dict(counts), xla


class LiteRTRunner:
    """A LiteRT (TFLite) flatbuffer run with `ai_edge_litert`'s interpreter.

    Inputs and outputs are float for the caller even when the file has int8
    inputs or outputs: inputs are quantized and outputs dequantized with the
    file's own scale and zero point. The batch dimension is resized when the
    inputs' batch changes.

    Args:
        model: A `.tflite` path, or the flatbuffer as bytes.
        threads: Interpreter threads (`None`: LiteRT's default).

    Example:

    ```python
    runner = LiteRTRunner("model.tflite", threads=1)
    inputs = runner.prepare([x_test[:1]])   # once, outside the timing
    [probabilities] = runner.run(inputs)
    ```
    """

    kind = "LiteRT"

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ImportError(
                "Running LiteRT files needs the ai-edge-litert package: "
                "pip install ai-edge-litert (or keras-psp[deploy])."
            ) from error
        if isinstance(model, bytes):
            self.interpreter = Interpreter(model_content=model, num_threads=threads)
        else:
            self.interpreter = Interpreter(model_path=os.fspath(model), num_threads=threads)
        signatures = self.interpreter.get_signature_list()
        if signatures:
            key = SIGNATURE if SIGNATURE in signatures else next(iter(signatures))
            runner = self.interpreter.get_signature_runner(key)
            ins = sorted(runner.get_input_details().items())
            outs = sorted(runner.get_output_details().items(), key=lambda kv: _output_order(kv[0]))
            del runner  # it holds the interpreter's internals, which blocks allocate_tensors
        else:  # a file written without signatures: tensor order
            ins = [(d["name"], d) for d in self.interpreter.get_input_details()]
            outs = [(d["name"], d) for d in self.interpreter.get_output_details()]
        self._in = [d for _, d in ins]
        self._out = [d for _, d in outs]
        self.inputs = [
            (name, tuple(None if s < 0 else int(s) for s in d["shape_signature"]), np.dtype(d["dtype"]))
            for name, d in ins
        ]
        self._shapes = [tuple(d["shape"]) for d in self._in]
        # Listed before allocate_tensors, which lets XNNPACK replace nodes by DELEGATE.
        self._ops = [op["op_name"] for op in self.interpreter._get_ops_details()]
        self.interpreter.allocate_tensors()

    def ops(self) -> list[str]:
        """The file's operators, one per node in execution order (e.g. "CONV_2D")."""
        return list(self._ops)

    def prepare(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        prepared, shapes = [], []
        for detail, a in zip(self._in, arrays, strict=True):
            dtype = np.dtype(detail["dtype"])
            scale, zero = detail["quantization"]
            if scale and np.issubdtype(dtype, np.integer) and not np.issubdtype(a.dtype, np.integer):
                info = np.iinfo(dtype)
                a = np.clip(np.round(a / scale + zero), info.min, info.max)
            prepared.append(np.ascontiguousarray(a, dtype=dtype))
            shapes.append(a.shape)
        if shapes != self._shapes:
            for detail, shape in zip(self._in, shapes, strict=True):
                self.interpreter.resize_tensor_input(detail["index"], list(shape))
            self.interpreter.allocate_tensors()
            self._shapes = shapes
        return prepared

    def run(self, prepared: list[np.ndarray]) -> list[np.ndarray]:
        for detail, a in zip(self._in, prepared, strict=True):
            self.interpreter.set_tensor(detail["index"], a)
        self.interpreter.invoke()
        outputs = []
        for detail in self._out:
            y = self.interpreter.get_tensor(detail["index"])
            scale, zero = detail["quantization"]
            if scale and np.issubdtype(y.dtype, np.integer):
                y = (y.astype("float32") - zero) * scale
            outputs.append(y)
        return outputs

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.run(self.prepare(arrays))


def by_name(arrays: list[np.ndarray], names: list[str], runner) -> list[np.ndarray]:
    """`arrays`, given in the order of `names`, in the order of `runner.inputs`.

    Raises:
        ValueError: if the runner's inputs have other names.
    """
    wanted = [name for name, _, _ in runner.inputs]
    if sorted(wanted) != sorted(names):
        raise ValueError(f"the inputs are named {names}, but the {runner.kind} file expects {wanted}.")
    return [arrays[names.index(name)] for name in wanted]


def random_inputs(specs, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random inputs for `specs` (`(name, shape, dtype)` triples).

    Floats are uniform in [0, 1) (image-like); integer inputs are 0 or 1, valid
    indices for any embedding.

    Raises:
        ValueError: if a dimension other than the batch is unknown.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for name, shape, dtype in specs:
        if any(d is None for d in shape[1:]):
            raise ValueError(
                f"Input '{name}' has shape {shape}: random inputs need every "
                "dimension but the batch. Pass inputs of your own."
            )
        full = (batch,) + tuple(shape[1:])
        if np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 2, full).astype(dtype))
        else:
            arrays.append(rng.random(full).astype(dtype))
    return arrays
