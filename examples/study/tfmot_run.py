"""tensorflow-model-optimization rows of the study, in tf_keras, in its own process.

tfmot works only with tf_keras (Keras 2), and importing it switches
`tf.keras` to Keras 2 for the whole process, so the study runs this file as
a subprocess. It rebuilds the study's ResNet in tf_keras with the same layer
names, loads the trained Keras 3 baseline's weights (`--weights`, an .npz
of `layer/index` arrays), and for each mode prunes every Conv2D and Dense
kernel with `prune_low_magnitude`:

- `50`: 50 % unstructured magnitude pruning (`ConstantSparsity(0.5)`, masks
  updated every step);
- `2:4`: `sparsity_m_by_n=(2, 4)`, two zeros in every four consecutive input
  channels of TFLite's layout (mask fixed at the first step);

then fine-tunes with `UpdatePruningStep`, strips the wrappers and converts
to a float32 .tflite (`TFLiteConverter.from_keras_model`). Accuracy before
fine-tuning applies tfmot's own masks (the 2:4 helpers, or the per-layer
magnitude rule) to the baseline's kernels. Dense FLOPs are unchanged: the
kernels keep their shapes. Writes `tfmot.json` and the .tflite files to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils  # noqa: E402

L = tf_keras.layers
MODES = {"50": "tfmot_50", "2:4": "tfmot_2of4"}


def resnet(depth: int, widths, stem_stride: int, weight_decay: float = 5e-4) -> tf_keras.Model:
    """keras_psp.models.cifar_resnet (28×28×1), in tf_keras, with its layer names."""
    reg = tf_keras.regularizers.L2(weight_decay)

    def conv_bn(x, filters, stride, name, relu=True, kernel=3):
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                     kernel_regularizer=reg, name=f"{name}_conv")(x)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_bn")(x)
        return L.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = tf_keras.Input((28, 28, 1), name="image")
    x = conv_bn(inputs, widths[0], stem_stride, "stem")
    for stage, width in enumerate(widths):
        for block in range((depth - 2) // 6):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = conv_bn(conv_bn(x, width, stride, f"{prefix}a"), width, 1, f"{prefix}b", False)
            if stride != 1 or x.shape[-1] != width:
                x = conv_bn(x, width, stride, f"{prefix}p", relu=False, kernel=1)
            x = L.ReLU(name=f"{prefix}_out")(L.Add(name=f"{prefix}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return tf_keras.Model(inputs, L.Dense(10, activation="softmax", name="logits")(x))


def load_weights(model, arrays) -> None:
    for layer in model.layers:
        values = [arrays[f"{layer.name}/{i}"] for i in range(len(layer.weights))]
        if values:
            layer.set_weights(values)


def prunable(model):
    return [layer for layer in model.layers if isinstance(layer, (L.Conv2D, L.Dense))]


def mask(kernel: np.ndarray, mode: str) -> np.ndarray:
    """tfmot's mask of one kernel: per-layer magnitude (50 %) or its 2:4 helpers."""
    if mode == "2:4":
        w = tf.constant(kernel)
        m = pruning_utils.generate_m_by_n_mask(pruning_utils.weights_rearrange(w), (2, 4))
        return pruning_utils.m_by_n_sparsity_mask_prepare(m, w.shape).numpy().astype(bool)
    keep = max(1, int(round(kernel.size * 0.5)))
    flat = np.abs(kernel).ravel()
    out = np.zeros(kernel.size, bool)
    out[np.argsort(-flat, kind="stable")[:keep]] = True
    return out.reshape(kernel.shape)


def accuracy(model, x, y) -> float:
    return float(100.0 * np.mean(np.argmax(model.predict(x, batch_size=1000, verbose=0), -1) == y))


def costs(model) -> dict:
    """Dense MACs, MACs of non-zero weights, parameters and non-zero ones (as the study's)."""
    dense = nonzero = 0.0
    for layer in prunable(model):
        kernel = layer.kernel.numpy()
        positions = int(np.prod(layer.output.shape[1:-1])) if isinstance(layer, L.Conv2D) else 1
        dense += positions * kernel.size
        nonzero += positions * np.count_nonzero(kernel)
    weights = model.get_weights()
    return {"flops": int(dense), "nonzero_macs": float(nonzero),
            "params": int(sum(w.size for w in weights)),
            "nonzero_params": int(sum(np.count_nonzero(w) for w in weights))}


def to_tflite(model, path: str) -> None:
    with open(path, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help=".npz: x_train, y_train, x_test, y_test")
    p.add_argument("--weights", required=True, help=".npz of the baseline's weights")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="50,2:4")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--stem-stride", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # tf.function retracing notes of several small models
    os.makedirs(args.out, exist_ok=True)
    data = np.load(args.data)
    x_train, y_train = data["x_train"].astype("float32") / 255.0, data["y_train"]
    x_test, y_test = data["x_test"].astype("float32") / 255.0, data["y_test"]
    weights = np.load(args.weights)
    widths = tuple(int(w) for w in args.widths.split(","))

    def baseline():
        model = resnet(args.depth, widths, args.stem_stride)
        load_weights(model, weights)
        return model

    dense = baseline()
    result = {"dense": {"accuracy": accuracy(dense, x_test, y_test), **costs(dense)}}
    to_tflite(dense, os.path.join(args.out, "tfmot_dense.tflite"))
    for mode in args.modes.split(","):
        name = MODES[mode]
        model = baseline()
        for layer in prunable(model):
            layer.kernel.assign(layer.kernel.numpy() * mask(layer.kernel.numpy(), mode))
        before = accuracy(model, x_test, y_test)
        tf_keras.utils.set_random_seed(args.seed)
        model = baseline()
        schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
        pruned = tfmot.sparsity.keras.prune_low_magnitude(
            model, pruning_schedule=schedule, sparsity_m_by_n=(2, 4) if mode == "2:4" else None)
        steps = max(1, args.epochs * -(-len(x_train) // args.batch_size))
        pruned.compile(tf_keras.optimizers.SGD(
            tf_keras.optimizers.schedules.CosineDecay(args.lr, steps), momentum=0.9),
            "sparse_categorical_crossentropy")
        start = time.perf_counter()
        pruned.fit(x_train, y_train, batch_size=args.batch_size, epochs=max(1, args.epochs),
                   verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        seconds = time.perf_counter() - start
        stripped = tfmot.sparsity.keras.strip_pruning(pruned)
        result[name] = {"mode": mode, "accuracy": accuracy(stripped, x_test, y_test),
                        "accuracy_before_finetune": before, "finetune_seconds": seconds,
                        **costs(stripped)}
        to_tflite(stripped, os.path.join(args.out, f"{name}.tflite"))
    with open(os.path.join(args.out, "tfmot.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
