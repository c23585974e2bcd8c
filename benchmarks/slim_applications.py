"""slim() on every architecture in keras.applications (weights=None).

Wraps each model with `channel` α, cuts 40 % of them at random (keeping at
least one per layer), randomizes BatchNormalization statistics so that cut
channels emit non-zero constants, slims, and reports the largest output
difference relative to the largest output, parameters and FLOPs before →
after, and slim's wall time. Ends with the number of exact architectures.

    python benchmarks/slim_applications.py [--only ResNet50,VGG16]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import print_table  # noqa: E402

from keras_psp import count_flops, slim, wrap  # noqa: E402
from keras_psp.cloning import iter_layers, psp_layers  # noqa: E402

#: name -> input size (the smallest each architecture accepts, rounded up).
ARCHITECTURES = {
    "ConvNeXtTiny": 64, "DenseNet121": 64, "EfficientNetB0": 64, "EfficientNetV2B0": 64,
    "InceptionResNetV2": 96, "InceptionV3": 96, "MobileNet": 64, "MobileNetV2": 64,
    "MobileNetV3Small": 64, "MobileNetV3Large": 64, "NASNetMobile": 64, "ResNet50": 64,
    "ResNet50V2": 64, "VGG16": 64, "VGG19": 64, "Xception": 96,
}
TOLERANCE = 1e-4


def prune(model, rng, cut=0.4):
    for layer in psp_layers(model):
        alpha = rng.uniform(0.2, 1.5, size=layer.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        alpha.flat[rng.integers(alpha.size)] = 1.0
        layer.alpha.assign(alpha)
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            draw = {"gamma": lambda n: rng.uniform(0.5, 1.5, n),
                    "beta": lambda n: rng.normal(size=n) * 0.5,
                    "moving_mean": lambda n: rng.normal(size=n) * 0.1,
                    "moving_variance": lambda n: rng.uniform(0.5, 1.5, n)}
            layer.set_weights([draw[w.name](w.shape[0]) for w in layer.weights])


def check(name: str, size: int, rng) -> tuple:
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10)
    base = getattr(keras.applications, name)(**kwargs, classifier_activation=None)
    model = wrap(base)
    prune(model, rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        small = slim(model)
        seconds = time.perf_counter() - start
    barriers = [str(w.message).split("layer(s) ")[1].split("; structures")[0][:40]
                for w in caught if "does not know" in str(w.message)]
    x = rng.random((2, size, size, 3)).astype("float32") * 255.0
    reference = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(small(x, training=False))
    rel = float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-12))
    return (
        name, size, f"{rel:.1e}", "yes" if rel <= TOLERANCE else "NO",
        f"{base.count_params():,} → {small.count_params():,}",
        f"{count_flops(base) / 1e6:.1f} → {count_flops(small) / 1e6:.1f}",
        f"{seconds:.2f}", f"barrier: {barriers[0]}" if barriers else "",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    rows = []
    for name in names:
        rows.append(check(name, ARCHITECTURES.get(name, 96), np.random.default_rng(0)))
        print(*rows[-1], flush=True)
        keras.backend.clear_session()
    print_table(
        "slim on keras.applications (weights=None, channel α, 40 % cut, random BN)",
        rows,
        ("model", "input", "rel. diff", "exact", "params", "MFLOPs", "slim s", "note"),
    )
    exact = sum(row[3] == "yes" for row in rows)
    print(f"\nexact (≤ {TOLERANCE:g} relative): {exact}/{len(rows)}")


if __name__ == "__main__":
    main()
