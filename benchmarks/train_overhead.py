"""Training-step overhead of PSP: wrapped vs plain CIFAR ResNet-56.

Times training steps (batch 128, 32×32×3) of a PSP-wrapped ResNet-56 and the
same plain model, interleaved A B A B ..., in graph mode and with XLA
(`jit_compile=True`); then the peak memory of a few training steps, each
variant in its own fresh process (interleaved too). Prints a table and, last,
the key ratios.

    python benchmarks/train_overhead.py               # the full benchmark
    python benchmarks/train_overhead.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, median, print_table  # noqa: E402


def build(wrapped: bool, jit: bool, depth: int):
    import keras

    import keras_psp
    from keras_psp.models import cifar_resnet

    keras.utils.set_random_seed(0)
    model = cifar_resnet(depth)
    if wrapped:
        model = keras_psp.wrap(model, structure="channel")
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "sparse_categorical_crossentropy",
        jit_compile=jit,
    )
    return model


def batch(size: int):
    rng = np.random.default_rng(0)
    x = rng.random((size, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, size).astype("int32")
    return x, y


def step_times(args) -> list[tuple]:
    x, y = batch(args.batch)
    rows = []
    ratios = {}
    for jit in (False, True):
        models = {name: build(name == "psp", jit, args.depth) for name in ("plain", "psp")}

        def runner(model):
            def run():
                for _ in range(args.steps):
                    model.train_on_batch(x, y)
            return run

        samples = interleaved({k: runner(m) for k, m in models.items()}, args.rounds)
        mode = "xla" if jit else "graph"
        plain = median(samples["plain"]) / args.steps
        psp = median(samples["psp"]) / args.steps
        ratios[mode] = psp / plain
        rows.append((mode, f"{plain * 1e3:.1f}", f"{psp * 1e3:.1f}", f"{psp / plain:.3f}"))
    return rows, ratios


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory_child(wrapped: bool, depth: int, size: int, steps: int) -> None:
    """Runs in a fresh process: prints resident memory before and the peak
    during a few training steps (first-step tracing included), in KiB."""
    model = build(wrapped, False, depth)
    x, y = batch(size)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the high-water mark VmHWM to the current RSS
    base = _proc_status_kib("VmRSS")
    for _ in range(steps):
        model.train_on_batch(x, y)
    print(f"PEAK {base} {_proc_status_kib('VmHWM')}")


def peak_memory(args):
    samples = {"plain": [], "psp": []}
    for _ in range(args.memory_rounds):
        for name in samples:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, "--depth", str(args.depth),
                 "--batch", str(args.batch)],
                capture_output=True, text=True, check=True,
            ).stdout
            base, peak = (int(v) for v in out.split("PEAK")[1].split())
            samples[name].append((base, peak))
    result = {}
    for name, values in samples.items():
        result[name] = (
            median([p for _, p in values]) / 1024,  # MiB, whole process
            median([p - b for b, p in values]) / 1024,  # MiB, growth during training
        )
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="train steps per timed sample")
    p.add_argument("--rounds", type=int, default=7, help="interleaved samples per model")
    p.add_argument("--memory-rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="ResNet-20, batch 32, few rounds")
    p.add_argument("--only", choices=["time", "memory"], help="run one half only")
    p.add_argument("--memory-child", choices=["plain", "psp"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.depth, args.batch, args.steps, args.rounds, args.memory_rounds = 20, 32, 1, 2, 1
    if args.memory_child:
        peak_memory_child(args.memory_child == "psp", args.depth, args.batch, 4)
        return

    summary = []
    if args.only in (None, "time"):
        rows, ratios = step_times(args)
        print_table(
            f"Training step, ResNet-{args.depth}, batch {args.batch}, median of {args.rounds} "
            f"interleaved samples of {args.steps} steps (ms/step)",
            rows, ("mode", "plain", "psp", "psp/plain"),
        )
        summary += [f"step graph {ratios['graph']:.3f}", f"step xla {ratios['xla']:.3f}"]
    if args.only in (None, "memory"):
        memory = peak_memory(args)
        print_table(
            f"Memory of 4 training steps, median of {args.memory_rounds} fresh processes (MiB)",
            [(name, f"{peak:.0f}", f"{growth:.0f}") for name, (peak, growth) in memory.items()],
            ("model", "peak RSS", "peak growth during training"),
        )
        summary += [
            f"peak memory {memory['psp'][0] / memory['plain'][0]:.3f}",
            f"peak growth {memory['psp'][1] / max(memory['plain'][1], 1e-9):.3f}",
        ]
    print("\nratio psp/plain: " + ", ".join(summary))


if __name__ == "__main__":
    main()
