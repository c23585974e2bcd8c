"""How long `slim` takes, and how it grows with the number of layers.

Targets: ResNet50 < 1 s, DenseNet121 < 2 s (issue 15), linear in the number of layers
(ResNet50 → 101 → 152: seconds per layer about constant). Each model is
wrapped (`channel` α), 40 % of α cut at random. Printed: the model's first
`slim` in the process (after a warm-up slim of a small model, so that imports
are nobody's), whose kernel shapes and variable names are new to TensorFlow's
eager caches, and the median of `--repeats` more, which the targets apply to.
Garbage of earlier runs is collected before each timed call, not during it.

    python benchmarks/slim_time.py [--repeats 5] [--models ResNet50,DenseNet121]

`--against DIR` compares with another checkout of keras_psp (an earlier
commit: `git worktree add /tmp/old <commit>`): each model is timed in fresh
processes, that checkout and this one in turn, `--pairs` times, and the
medians and their ratio are printed (this machine is noisy: one run of each
is not a comparison).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
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


def _timed_slim(model) -> float:
    """Seconds of one `slim(model)`; earlier models' garbage is collected
    before the clock starts, and the slim model freed after it stops."""
    gc.collect()
    start = time.perf_counter()
    small = slim(model)
    seconds = time.perf_counter() - start
    del small
    return seconds


def _warm_up() -> None:
    """One slim of a small model: the process's one-off costs (imports,
    first kernels) are not any model's."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    slim(wrap(model))


def seconds_per_model(models, repeats: int) -> dict[str, tuple[float, float, int]]:
    """First and median `slim` time, and layer count, of each model (one process)."""
    _warm_up()
    out = {}
    for name in models:
        model = pruned(name, np.random.default_rng(0))
        first = _timed_slim(model)  # this model's shapes and names are new to TensorFlow
        times = [_timed_slim(model) for _ in range(repeats)]
        out[name] = (median(times), first, len(list(iter_layers(model))))
        keras.backend.clear_session()
    return out


def compare(models, repeats: int, pairs: int, against: str) -> None:
    """Times `against`'s keras_psp and this one's in turn, in fresh processes."""
    here = str(pathlib.Path(__file__).resolve().parents[1])
    roots = {"before": str(pathlib.Path(against).resolve()), "after": here}
    runs = {(label, kind): {name: [] for name in models}
            for label in roots for kind in ("median", "first")}
    for pair in range(pairs):
        for label, root in roots.items():
            env = {**os.environ, "PYTHONPATH": root}
            command = [sys.executable, __file__, "--json", "--repeats", str(repeats),
                       "--models", ",".join(models)]
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            for name, (seconds, first, _) in json.loads(result.stdout.splitlines()[-1]).items():
                runs[label, "median"][name].append(seconds)
                runs[label, "first"][name].append(first)
            print(f"pair {pair + 1} {label}:", {n: (round(runs[label, "first"][n][-1], 2),
                                                 round(v[-1], 2))
                                             for n, v in runs[label, "median"].items()},
                  flush=True)
    rows = []
    for name in models:
        for kind in ("first", "median"):
            before = median(runs["before", kind][name])
            after = median(runs["after", kind][name])
            rows.append((name, kind, f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}"))
    print_table(f"slim wall time, {pairs} interleaved pairs of processes, medians "
                f"(before: {against})", rows,
                ("model", "call", "before s", "after s", "after / before"))
    print(f"\nafter / before, {models[0]} median call: {rows[1][4]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--against", default=None, help="another keras_psp checkout")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(dir(keras.applications)))
    if unknown:
        parser.error(f"unknown keras.applications model(s): {', '.join(unknown)}")
    if args.against:
        return compare(models, args.repeats, args.pairs, args.against)
    measured = seconds_per_model(models, args.repeats)
    if args.json:
        print(json.dumps(measured))
        return None
    rows, per_layer = [], {}
    for name, (seconds, first, layers) in measured.items():
        per_layer[name] = seconds / layers
        target = TARGETS.get(name)
        verdict = "" if target is None else ("ok" if seconds < target else "SLOW")
        rows.append((name, layers, f"{first:.2f}", f"{seconds:.2f}",
                     f"{per_layer[name] * 1e3:.2f}", f"< {target:g} s {verdict}" if target else ""))
    print_table(f"slim wall time (224×224 inputs): the model's first slim in this process, "
                f"and the median of {args.repeats} more", rows,
                ("model", "layers", "first s", "median s", "ms / layer", "target (median)"))
    if "ResNet50" in per_layer and "ResNet152" in per_layer:
        print(f"\nms per layer, ResNet152 / ResNet50 (1.0 = linear): "
              f"{per_layer['ResNet152'] / per_layer['ResNet50']:.2f}")
    timed = [name for name in models if name in TARGETS]
    if timed:
        print("\n" + ", ".join(f"{name} median / target: {measured[name][0] / TARGETS[name]:.2f}"
                               for name in timed))
    return None


if __name__ == "__main__":
    main()
