"""Data, model, training, accuracy, costs and LiteRT conversion for the study."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import keras
import numpy as np
from _local_data import load_fashion_mnist  # examples/ is on sys.path

import keras_psp
from keras_psp.models import cifar_resnet


@dataclasses.dataclass
class Config:
    """Settings shared by every method of the study (see the script's --help)."""

    train_limit: int | None = 30000
    test_limit: int | None = None
    epochs: int = 6  # N: training epochs of the unpruned model (and BN-slimming)
    finetune_epochs: int = 3  # k: what every method gets after the N
    batch_size: int = 128
    lr: float = 0.1
    finetune_lr: float = 0.03  # every method's k epochs (keras_psp.prune's default)
    depth: int = 8
    widths: tuple[int, ...] = (16, 32, 64)
    stem_stride: int = 2
    bn_l1: float | None = None  # network slimming's L1 on γ; None: see bn_l1_strength
    verbose: int = 0


@dataclasses.dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(config: Config) -> Data:
    """Fashion-MNIST, the first `train_limit` training and `test_limit` test images."""
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    n, m = config.train_limit or len(x_train), config.test_limit or len(x_test)
    return Data(x_train[:n], y_train[:n], x_test[:m], y_test[:m])


def build_resnet(config: Config, seed: int) -> keras.Model:
    """The main job's ResNet (cifar_resnet, 28×28×1 input), initialised from `seed`."""
    keras.utils.set_random_seed(seed)
    return cifar_resnet(config.depth, config.widths, input_shape=(28, 28, 1),
                        stem_stride=config.stem_stride, name="resnet")


def steps_per_epoch(config: Config, data: Data) -> int:
    return math.ceil(len(data.x_train) / config.batch_size)


def compile_sgd(model: keras.Model, config: Config, data: Data, lr: float, epochs: int) -> None:
    """SGD, momentum 0.9, cosine decay from `lr` over `epochs` (the main job's)."""
    steps = max(1, epochs * steps_per_epoch(config, data))
    model.compile(
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, steps),
                                       momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def fit(model, config: Config, data: Data, epochs: int, seed: int, callbacks=()) -> float:
    """Trains (batches shuffled from `seed`); returns the seconds it took."""
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model.fit(data.x_train, data.y_train, batch_size=config.batch_size, epochs=epochs,
              callbacks=list(callbacks), verbose=config.verbose)
    return time.perf_counter() - start


def accuracy(model: keras.Model, data: Data) -> float:
    """Test accuracy in percent (inference mode)."""
    predictions = model.predict(data.x_test, batch_size=1000, verbose=0)
    return float(100.0 * np.mean(np.argmax(predictions, axis=-1) == data.y_test))


def costs(model: keras.Model) -> dict:
    """Dense MACs (`count_flops`), MACs of non-zero weights, parameters, non-zero ones.

    `model` is plain Keras (a slim or stripped model). Non-zero MACs count,
    per conv/dense layer, its MACs times the fraction of non-zero kernel
    entries: what a sparse kernel would have to compute.
    """
    dense = keras_psp.count_flops(model)
    nonzero = 0.0
    for name, macs in keras_psp.flops.layer_flops(model).items():
        kernel = keras.ops.convert_to_numpy(model.get_layer(name).kernel)
        nonzero += macs * np.count_nonzero(kernel) / kernel.size
    weights = model.get_weights()
    return {"flops": int(dense), "nonzero_macs": float(nonzero),
            "params": int(sum(w.size for w in weights)),
            "nonzero_params": int(sum(np.count_nonzero(w) for w in weights))}


def tflite_bytes(model: keras.Model) -> bytes:
    """The model as a float32 LiteRT flatbuffer with batch 1 (`model.export`)."""
    spec = [keras.InputSpec(shape=(1,) + tuple(t.shape[1:]), dtype=t.dtype)
            for t in model.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        model.export(path, format="litert", input_signature=spec, verbose=False)
        with open(path, "rb") as f:
            return f.read()


def litert_accuracy(content: bytes, data: Data, limit: int = 500) -> float:
    """Accuracy (%) of a LiteRT model on the first `limit` test images, batch 1."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    hits = 0
    for x, y in zip(data.x_test[:limit], data.y_test[:limit], strict=True):
        interpreter.set_tensor(source, x[None])
        interpreter.invoke()
        hits += int(np.argmax(interpreter.get_tensor(target)) == y)
    return 100.0 * hits / min(limit, len(data.x_test))


def save_tflite(content: bytes, folder: str, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.tflite")
    with open(path, "wb") as f:
        f.write(content)
    return path
