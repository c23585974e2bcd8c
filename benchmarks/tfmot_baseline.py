"""The incumbent: tensorflow-model-optimization magnitude pruning, 50 %.

Builds the CIFAR ResNet-56 in tf_keras (Keras 2; tfmot does not support
Keras 3), prunes every conv and dense kernel to 50 % sparsity with
`prune_low_magnitude`, strips the pruning wrappers and converts to LiteRT
twice: plain float32, and with `Optimize.EXPERIMENTAL_SPARSITY` (sparse
kernels where the runtime supports them). LiteRT batch-1 latency against the
unpruned model, interleaved, medians. Runs in its own process because
importing tfmot switches `tf.keras` to Keras 2 for the whole process.

    python benchmarks/tfmot_baseline.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402
from _deploy import litert_runner  # noqa: E402
from _timing import interleaved, median, print_table  # noqa: E402

L = tf_keras.layers


def resnet(depth: int = 56, widths=(16, 32, 64)) -> tf_keras.Model:
    """keras_psp.models.cifar_resnet, in tf_keras."""

    def conv_bn(x, filters, stride, relu=True, kernel=3):
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=0.9)(x)
        return L.ReLU()(x) if relu else x

    inputs = tf_keras.Input((32, 32, 3))
    x = conv_bn(inputs, widths[0], 1)
    for stage, width in enumerate(widths):
        for block in range((depth - 2) // 6):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(conv_bn(x, width, stride), width, 1, relu=False)
            if stride != 1 or x.shape[-1] != width:
                x = conv_bn(x, width, stride, relu=False, kernel=1)
            x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, L.Dense(10, activation="softmax")(x))


def prune_50(model: tf_keras.Model) -> tf_keras.Model:
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((8, 32, 32, 3)).astype("float32")
    pruned.fit(x, np.zeros(8), batch_size=8, epochs=1, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned)


def to_tflite(model, sparse: bool = False) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return converter.convert()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print a JSON line last")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    base = resnet()
    pruned = prune_50(base)
    kernels = [w for w in pruned.weights if "kernel" in w.name]
    sparsity = float(np.mean(np.concatenate([np.ravel(w.numpy() == 0) for w in kernels])))
    x = np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")
    contents = {"unpruned": to_tflite(base), "pruned": to_tflite(pruned),
                "pruned_sparse": to_tflite(pruned, sparse=True)}
    samples = interleaved({k: litert_runner(c, x) for k, c in contents.items()}, rounds)
    ms = {k: median(v) * 1e3 / 10 for k, v in samples.items()}
    rows = [(k, f"{len(c) / 1e6:.2f}", f"{ms[k]:.2f}", f"{ms['unpruned'] / ms[k]:.2f}x")
            for k, c in contents.items()]
    print_table(f"tfmot magnitude pruning, ResNet-56, kernel sparsity {sparsity:.3f}, "
                f"LiteRT batch 1, medians of {rounds}", rows,
                ("model", "MB", "ms", "speedup"))
    print(f"\npruned / unpruned latency: {ms['pruned'] / ms['unpruned']:.3f}")
    if args.json:
        print(json.dumps({
            "sparsity": sparsity, "unpruned_ms": ms["unpruned"], "pruned_ms": ms["pruned"],
            "pruned_sparse_ms": ms["pruned_sparse"], "pruned_label": "float32",
            "pruned_sparse_label": "EXPERIMENTAL_SPARSITY",
        }))


if __name__ == "__main__":
    main()
