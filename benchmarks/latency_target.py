"""Does a latency target land? `prune_to(latency=...)` on ResNet-56, measured.

CIFAR ResNet-56 with group α (`wrap(structure="group")`), α set at random
(seeded), is profiled on a runtime (`keras_psp.latency.profile`, no cache:
the build time is part of the result), then cut by
`prune_to(latency=target, profile=table)` for each target. Each slim model is
converted and timed against the unpruned one, interleaved A B A B ...;
the table prints the predicted and the measured latency fraction, their
ratio, and the FLOPs fraction for comparison. A FLOPs cut to the same
predicted latency (`prune_to(flops=...)` at the FLOPs the latency cut left)
is timed alongside, to show what ordering the cut by ms saved buys.

    python benchmarks/latency_target.py [--runtime litert|xla] [--targets 0.6,0.4]

LiteRT: ai-edge-litert interpreter, batch 1, one thread. XLA: TensorFlow,
jit_compile, batch 128. The last line is the key ratio: measured over target
at the first target (goal: within 1 ± 0.10).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _deploy import litert_runner, tflite_bytes, xla_runner  # noqa: E402
from _timing import interleaved, median, print_table  # noqa: E402

import keras_psp  # noqa: E402
from keras_psp.cloning import psp_layers  # noqa: E402
from keras_psp.models import cifar_resnet  # noqa: E402


def _random_groups(seed: int) -> keras.Model:
    model = keras_psp.wrap(cifar_resnet(56, (16, 32, 64)), structure="group")
    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        layer.alpha.assign(rng.random(tuple(layer.alpha.shape)).astype("float32"))
    return model


def _runner(model, runtime: str, x):
    if runtime == "litert":
        return litert_runner(tflite_bytes(model), x[:1])
    return xla_runner(model, x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", default="litert", choices=keras_psp.latency.RUNTIMES)
    p.add_argument("--targets", default="0.6,0.4")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, default=3, help="latency.profile's widths per axis")
    args = p.parse_args(argv)
    batch = 1 if args.runtime == "litert" else 128
    targets = [float(t) for t in args.targets.split(",")]

    base = _random_groups(args.seed)
    start = time.perf_counter()
    table = keras_psp.latency.profile(base, runtime=args.runtime, batch_size=batch,
                                      levels=args.levels, cache=False)
    build_s = time.perf_counter() - start
    x = np.random.default_rng(1).random((batch, 32, 32, 3)).astype("float32")
    cases, cuts = {"dense": _runner(keras_psp.slim(base), args.runtime, x)}, {}
    for target in targets:
        model = _random_groups(args.seed)
        cut = keras_psp.prune_to(model, latency=target, profile=table)
        flops_model = _random_groups(args.seed)
        keras_psp.prune_to(flops_model, flops=cut.flops)
        cuts[target] = (cut, table.predict(flops_model) / table.dense_ms)
        cases[f"latency {target}"] = _runner(keras_psp.slim(model), args.runtime, x)
        cases[f"flops {target}"] = _runner(keras_psp.slim(flops_model), args.runtime, x)
    per_call = 10 if args.runtime == "litert" else 1  # litert_runner invokes 10 times
    samples = {k: median(v) / per_call for k, v in interleaved(cases, args.rounds).items()}
    dense = samples["dense"]
    rows = [("unpruned", "1.000", "1.000", "1.000", f"{dense * 1e3:.3f}", "")]
    for target, (cut, flops_predicted) in cuts.items():
        measured = samples[f"latency {target}"] / dense
        rows.append((f"prune_to(latency={target})", f"{cut.flops:.3f}", f"{cut.latency:.3f}",
                     f"{measured:.3f}", f"{samples[f'latency {target}'] * 1e3:.3f}",
                     f"{measured / target:.3f}"))
        flops_measured = samples[f"flops {target}"] / dense
        rows.append((f"prune_to(flops={cut.flops:.3f})", f"{cut.flops:.3f}",
                     f"{flops_predicted:.3f}", f"{flops_measured:.3f}",
                     f"{samples[f'flops {target}'] * 1e3:.3f}", ""))
    print_table(f"ResNet-56, group α at random, {args.runtime} batch {batch}; profile built in "
                f"{build_s:.1f} s ({table})", rows,
                ("cut", "FLOPs", "predicted", "measured", "ms / call", "measured / target"))
    first = targets[0]
    print(f"key ratio: measured latency / target at {first}: "
          f"{samples[f'latency {first}'] / dense / first:.3f}")


if __name__ == "__main__":
    main()
