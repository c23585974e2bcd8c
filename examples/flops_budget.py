"""PSP on Fashion-MNIST aiming at a FLOPs budget: FlopsBudget + SeparationMonitor.

The main job's data and its ResNet-8 at half the width (16-32-64 on 28×28
Fashion-MNIST, stem stride 2, SGD momentum 0.9, cosine from 0.1, batch 128), wrapped with
input-channel PSP; `keras_psp.FlopsBudget` cuts the lowest-ranked structures
on a schedule so that the slimmed model ends at `--target` of the unpruned
FLOPs, and re-estimates BatchNormalization statistics before each validation.
Prints, per epoch, the slimmed model's FLOPs fraction, and at the end the
slim model's FLOPs fraction and test accuracy; writes `budget.json` to --out.

    python examples/flops_budget.py --target 0.5
    python examples/flops_budget.py --target 0.3 --epochs 16
    python examples/flops_budget.py --epochs 1 --train-limit 2000   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

import keras_psp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _local_data import load_fashion_mnist  # noqa: E402  (examples/)

from keras_psp.models import cifar_resnet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.5, help="FLOPs fraction to reach")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/flops_budget", help="output folder")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    base = cifar_resnet(8, (16, 32, 64), input_shape=(28, 28, 1), stem_stride=2, name="resnet")
    model = keras_psp.wrap(base, structure="channel")
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(args.lr, steps), momentum=0.9
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    monitor = keras_psp.SeparationMonitor()
    budget = keras_psp.FlopsBudget(target=args.target, recalibrate=x_train[:4096])
    print(f"FlopsBudget target {args.target} ± {args.tolerance}; {len(x_train)} training "
          f"images, {args.epochs} epochs", flush=True)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), callbacks=[monitor, budget],
              verbose=args.verbose)
    seconds = time.perf_counter() - start

    print(f"\n{'epoch':>5}{'FLOPs':>8}{'goal':>8}{'cut':>8}{'separation':>12}")
    for b, m in zip(budget.history, monitor.history, strict=True):
        print(f"{b['epoch'] + 1:>5}{b['psp_flops']:>8.3f}{b['goal']:>8.3f}"
              f"{m['psp_cut']:>8.3f}{m['psp_separation']:>12.3f}")
    small = keras_psp.slim(model, check_inputs=x_test[:256])
    fraction = keras_psp.count_flops(small) / keras_psp.count_flops(model)
    small.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, accuracy = small.evaluate(x_test, y_test, batch_size=512, verbose=0)
    ok = abs(fraction - args.target) <= args.tolerance
    print(f"\ntrained in {seconds:.0f} s; slim model: FLOPs fraction {fraction:.3f} (target "
          f"{args.target} ± {args.tolerance}: {'met' if ok else 'MISSED'}), test accuracy "
          f"{accuracy:.4f}")
    result = {"target": args.target, "tolerance": args.tolerance, "flops_fraction": fraction,
              "met": ok, "test_accuracy": accuracy, "epochs": args.epochs,
              "train_images": len(x_train), "seconds": seconds,
              "budget": budget.history, "monitor": [
                  {k: v for k, v in h.items() if k != "layers"} for h in monitor.history]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
