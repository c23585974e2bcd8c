"""Compiled runners for latency benchmarks: XLA (TensorFlow) and LiteRT."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np


def xla_runner(model: keras.Model, x: np.ndarray):
    """A zero-argument callable running `model` on `x`, XLA-compiled."""
    import tensorflow as tf

    fn = tf.function(lambda t: model(t, training=False), jit_compile=True)
    x = tf.constant(x)
    return lambda: np.asarray(fn(x))


def tflite_bytes(model: keras.Model, batch: int = 1) -> bytes:
    """Converts `model` to a float32 LiteRT flatbuffer with a fixed batch."""
    spec = [keras.InputSpec(shape=(batch,) + tuple(t.shape[1:]), dtype=t.dtype)
            for t in model.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        model.export(path, format="litert", input_signature=spec, verbose=False)
        with open(path, "rb") as f:
            return f.read()


def litert_runner(content: bytes, x: np.ndarray, invokes: int = 10, threads: int = 1):
    """A callable running the LiteRT model `invokes` times on `x` (batch 1)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, x)

    def run():
        for _ in range(invokes):
            interpreter.invoke()

    return run


def litert_predict(content: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
