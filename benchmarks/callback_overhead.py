"""Epoch-time overhead of SeparationMonitor on a ResNet-8 16-32-64 (the main job's model at half width).

Two separately compiled copies of that PSP-wrapped ResNet-8
(Fashion-MNIST, 28×28, stem stride 2; identical initial weights) train
one epoch each in turn, A B B A A B ... (neither always first), one with `SeparationMonitor()` (a check
at every epoch end, with the slimmed model's FLOPs and parameters) and one
without; default: the main job's epoch of 60 000 images. An epoch is timed
from `on_epoch_begin` to the end of the last `on_epoch_end` (the monitor's
work included, `fit`'s setup not). The monitor's cost is a fixed time per
check (one `slim` when the cut set changed, as it does early in training),
so its ratio shrinks with the epoch: the table gives that time too, and how
many timed epochs changed the cut set. Prints a table and, last, the ratio.

    python benchmarks/callback_overhead.py            # the full benchmark
    python benchmarks/callback_overhead.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median, print_table  # noqa: E402


def build(seed: int):
    import keras

    import keras_psp
    from keras_psp.models import cifar_resnet

    keras.utils.set_random_seed(seed)
    base = cifar_resnet(8, (16, 32, 64), input_shape=(28, 28, 1), stem_stride=2, name="resnet")
    model = keras_psp.wrap(base, structure="channel")
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main():
    import keras

    import keras_psp
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from _local_data import load_fashion_mnist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=60_000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7, help="timed epochs per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per model first")
    p.add_argument("--quick", action="store_true", help="2000 images, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.images, args.rounds = 2000, 2

    (x, y), _ = load_fashion_mnist()
    x, y = x[: args.images], y[: args.images]
    models = {"without": build(0), "with": build(0)}
    models["with"].set_weights(models["without"].get_weights())

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    samples = {name: [] for name in models}
    changed = 0
    monitor = keras_psp.SeparationMonitor(verbose=0)  # one monitor, as in one long fit
    for epoch in range(args.warmup + args.rounds):
        order = ("without", "with") if epoch % 2 == 0 else ("with", "without")  # A B B A ...
        for name in order:
            model = models[name]
            timer = EpochTimer()
            callbacks = [monitor, timer] if name == "with" else [timer]
            model.fit(x, y, batch_size=args.batch_size, epochs=epoch + 1, initial_epoch=epoch,
                      verbose=0, callbacks=callbacks)
            if epoch >= args.warmup:
                samples[name].append(timer.seconds)
                changed += name == "with" and monitor.history[-1]["psp_changed"] > 0
    probe = keras_psp.SeparationMonitor(verbose=0)  # the cost of one check, slim included
    probe.set_model(models["with"])
    probe.on_train_begin()
    check = []
    for epoch in range(5):
        probe._cost._key = None  # forget the cached cost: slim again
        start = time.perf_counter()
        probe.on_epoch_end(epoch, {})
        check.append(time.perf_counter() - start)
    without, with_ = median(samples["without"]), median(samples["with"])
    print_table(
        f"Epoch time, ResNet-8 (16,32,64) wrapped, {args.images} Fashion-MNIST images, batch "
        f"{args.batch_size}, backend {keras.backend.backend()}, median of {args.rounds} "
        f"interleaved epochs (s)",
        [(f"{without:.3f}", f"{with_:.3f}", f"{median(check):.3f}",
          f"{changed}/{args.rounds}", f"{with_ / without:.3f}")],
        ("without monitor", "with monitor", "one check, slim incl.", "epochs the cut set changed",
         "ratio"),
    )
    print(f"\nratio with/without monitor: {with_ / without:.3f}")


if __name__ == "__main__":
    main()
