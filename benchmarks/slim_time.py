"""How long `slim` takes, and how it grows with the number of layers.

Targets: ResNet50 < 1 s, DenseNet121 < 2 s (issue 15), linear in the number of layers
(ResNet50 → 101 → 152: seconds per layer about constant). Each model is
wrapped (`channel` α), 40 % of α cut at random; median of `--repeats` runs.

    python benchmarks/slim_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import median, print_table  # noqa: E402

from keras_psp import slim, wrap  # noqa: E402
from keras_psp.cloning import iter_layers, psp_layers  # noqa: E402

MODELS = ("ResNet50", "ResNet101", "ResNet152", "DenseNet121")
TARGETS = {"ResNet50": 1.0, "DenseNet121": 2.0}


def pruned(name: str, rng) -> keras.Model:
    model = wrap(getattr(keras.applications, name)(weights=None))
    for layer in psp_layers(model):
        alpha = rng.uniform(0.2, 1.5, size=layer.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < 0.4] = 0.0
        alpha.flat[0] = 1.0
        layer.alpha.assign(alpha)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows, per_layer = [], {}
    for name in MODELS:
        model = pruned(name, np.random.default_rng(0))
        layers = len(list(iter_layers(model)))
        slim(model)  # first call: imports, tracing caches
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            slim(model)
            times.append(time.perf_counter() - start)
        seconds = median(times)
        per_layer[name] = seconds / layers
        target = TARGETS.get(name)
        verdict = "" if target is None else ("ok" if seconds < target else "SLOW")
        rows.append((name, layers, f"{seconds:.2f}", f"{per_layer[name] * 1e3:.2f}",
                     f"< {target:g} s {verdict}" if target else ""))
        print(*rows[-1], flush=True)
        keras.backend.clear_session()
    print_table(f"slim wall time, median of {args.repeats} (224×224 inputs)", rows,
                ("model", "layers", "seconds", "ms / layer", "target"))
    print(f"\nms per layer, ResNet152 / ResNet50 (1.0 = linear): "
          f"{per_layer['ResNet152'] / per_layer['ResNet50']:.2f}")


if __name__ == "__main__":
    main()
