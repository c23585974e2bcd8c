"""Training-step overhead of PSP under each distribution path: wrapped vs plain ResNet-56.

Paths (each on this machine's CPU):
- jax: two processes, `keras_psp.distributed.initialize` + DataParallel, `train_on_batch`;
- multi_worker: two MultiWorkerMirroredStrategy workers on 127.0.0.1, the step
  of `keras_psp.distributed.train`;
- mirrored: one process, MirroredStrategy over two logical CPUs, `train_on_batch`.

Every process builds the plain and the PSP-wrapped CIFAR ResNet-56 and times
`--steps` steps of each, interleaved A B A B for `--rounds` rounds after a
warm-up; process 0's medians are reported (the processes step in lockstep).
Prints a table and, last, the key ratio per path (target ≤ 1.05).

    python benchmarks/distributed_overhead.py            # the full benchmark
    python benchmarks/distributed_overhead.py --quick    # ResNet-20, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, median, print_table  # noqa: E402

PATHS = ("jax", "multi_worker", "mirrored")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(config: dict) -> None:
    """One process: set up the path, build both models, time them interleaved."""
    path, index = config["path"], config["index"]
    strategy = None
    if path == "multi_worker":
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in config["ports"]]},
            "task": {"type": "worker", "index": index}})
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif path == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif path == "jax":
        import keras_psp

        keras_psp.distributed.initialize(config["address"], 2, index)
        import keras

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(auto_shard_dataset=False))
    import contextlib

    import keras
    import numpy as np

    import keras_psp
    from keras_psp.distributed.loop import _StepFunction
    from keras_psp.models import cifar_resnet

    batch = config["batch"] * (2 if path == "mirrored" else 1)  # per process
    rng = np.random.default_rng(index)
    x = rng.random((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype("int32")
    runners = {}
    for name in ("plain", "psp"):
        keras.utils.set_random_seed(0)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = cifar_resnet(config["depth"])
            if name == "psp":
                model = keras_psp.wrap(model, structure="channel")
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                          "sparse_categorical_crossentropy")
        if path == "multi_worker":
            import tensorflow as tf

            data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF)  # each worker its own batches
            iterator = iter(strategy.experimental_distribute_dataset(data.with_options(options)))
            step = _StepFunction(model, strategy).build()

            def run(step=step, iterator=iterator):
                for _ in range(config["steps"]):
                    float(step(next(iterator)))
        else:
            def run(model=model):
                for _ in range(config["steps"]):
                    model.train_on_batch(x, y)
        runners[name] = run
    samples = interleaved(runners, config["rounds"])
    if index == 0:
        print("RESULT " + json.dumps(samples), flush=True)


def launch(path: str, args) -> dict:
    count = 1 if path == "mirrored" else 2
    base = {"path": path, "depth": args.depth, "batch": args.batch, "steps": args.steps,
            "rounds": args.rounds, "address": f"127.0.0.1:{_port()}",
            "ports": [_port(), _port()]}
    env = {**os.environ, "KERAS_BACKEND": "jax" if path == "jax" else "tensorflow"}
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker",
                               json.dumps({**base, "index": i})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(count)]
    try:
        outputs = [p.communicate(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{path}: a process failed ({p.returncode}):\n{err[-3000:]}")
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--batch", type=int, default=32, help="batch per process (per replica)")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed sample")
    p.add_argument("--rounds", type=int, default=7, help="interleaved samples per model")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " +
                   ", ".join(PATHS))
    p.add_argument("--timeout", type=float, default=1200, help="seconds per path")
    p.add_argument("--quick", action="store_true", help="ResNet-20, batch 8, 2 rounds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.depth, args.batch, args.steps, args.rounds = 20, 8, 1, 2
    rows, ratios = [], {}
    for path in args.paths.split(","):
        start = time.perf_counter()
        samples = launch(path, args)
        plain, psp = (args.steps / median(samples[k]) for k in ("plain", "psp"))
        ratios[path] = plain / psp  # time per step, wrapped / plain
        rows.append((path, f"{plain:.2f}", f"{psp:.2f}", f"{ratios[path]:.3f}",
                     f"{time.perf_counter() - start:.0f}"))
    print_table(f"Training steps per second, ResNet-{args.depth}, batch {args.batch} per "
                f"replica, 2 replicas, median of {args.rounds} interleaved samples of "
                f"{args.steps} steps", rows, ("path", "plain", "psp", "psp/plain time", "wall s"))
    print("\nratio psp/plain (time per step): " + ", ".join(
        f"{k} {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
