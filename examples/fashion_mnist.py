"""The main job: PSP training of a small ResNet on Fashion-MNIST, end to end.

Reads Fashion-MNIST offline (Debian's `dataset-fashion-mnist`), wraps every
convolution and the classifier of a ResNet-8 in `keras_psp.PSP`, trains with
SGD + momentum and a cosine schedule, prints per-epoch accuracy and how many
structures are below the pruning threshold, saves the trained wrapped
model (`.keras`), and slims it: a physically smaller plain Keras model,
verified against the pruned one, exported as a SavedModel (XLA) and a LiteRT
file (each verified after writing), with parameters, FLOPs, file size and
latency (XLA batch 128, LiteRT batch 1) before → after.

    python examples/fashion_mnist.py                 # the default run
    python examples/fashion_mnist.py --epochs 30     # train longer
"""

from __future__ import annotations

import argparse
import os
import time

import keras
import numpy as np

import keras_psp
from keras_psp.datasets import load_fashion_mnist
from keras_psp.models import cifar_resnet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    p.add_argument("--structure", default="channel", choices=keras_psp.STRUCTURES)
    p.add_argument("--strength", type=float, default=None,
                   help="L2 strength on α (default: keras_psp's default)")
    p.add_argument("--threshold", type=float, default=keras_psp.wrapper.DEFAULT_THRESHOLD)
    p.add_argument("--depth", type=int, default=8, help="ResNet depth, 6n+2")
    p.add_argument("--widths", default="16,32,64", help="filters of the 3 stages")
    p.add_argument("--stem-stride", type=int, default=2, help="stride of the first conv")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fashion_mnist", help="output folder")
    p.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity")
    return p.parse_args(argv)


class PruningReport(keras.callbacks.Callback):
    """Prints, after each epoch, accuracy and the SeparationMonitor's figures.

    List it after the monitor, which puts `psp_*` into the epoch logs.
    """

    def on_epoch_end(self, epoch, logs=None):
        masks = [layer.mask() for layer in keras_psp.cloning.psp_layers(self.model)]
        total = sum(m.size for m in masks)
        cut = total - sum(int(m.sum()) for m in masks)
        logs = logs or {}
        nan = float("nan")
        print(
            f"epoch {epoch + 1}: accuracy {logs.get('accuracy', nan):.4f}"
            f"  val_accuracy {logs.get('val_accuracy', nan):.4f}"
            f"  structures below threshold {cut}/{total} ({100 * cut / total:.1f}%)"
            f"  separation {logs.get('psp_separation', nan):.3f}"
            f"  slim FLOPs {logs.get('psp_flops', nan):.3f}",
            flush=True,
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    widths = tuple(int(w) for w in args.widths.split(","))
    base = cifar_resnet(
        args.depth, widths, input_shape=(28, 28, 1), stem_stride=args.stem_stride, name="resnet"
    )
    model = keras_psp.wrap(
        base, structure=args.structure, strength=args.strength, threshold=args.threshold
    )
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, steps)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    n_alpha = sum(int(np.prod(layer.alpha.shape)) for layer in keras_psp.cloning.psp_layers(model))
    print(
        f"PSP {args.structure!r} on {model.name}: "
        f"{len(keras_psp.cloning.psp_layers(model))} wrapped layers, {n_alpha} structures; "
        f"{len(x_train)} training images, {args.epochs} epochs",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    monitor = keras_psp.SeparationMonitor(
        log_dir=os.path.join(args.out, "tensorboard"), verbose=0
    )
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[monitor, PruningReport()],
        verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    wrapped_path = os.path.join(args.out, "psp_model.keras")
    model.save(wrapped_path)
    plain = keras_psp.strip(model)
    small = keras_psp.slim(model, check_inputs=x_test[:256])
    difference = keras_psp.verify(plain, small, x_test[:1000])
    slim_path = os.path.join(args.out, "slim_model.keras")
    small.save(slim_path)
    small.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, accuracy = small.evaluate(x_test, y_test, batch_size=512, verbose=0)
    print(f"trained in {seconds:.0f} s; test accuracy of the slim model {accuracy:.4f}")
    print(f"slim vs pruned model: max |difference| {difference:.2e} on 1000 test images")
    exported = export_both(plain, small, x_test[:256], args.out)
    for report in exported.values():
        print(report)
    dense_ms, slim_ms = latency_ms(plain, small, x_test[:128])
    dense_lite, slim_lite = litert_ms(exported["dense_tflite"].path, exported["slim_tflite"].path,
                                      x_test[:1])
    print(f"{'':>26}{'before':>12}{'after':>12}{'ratio':>8}")
    for label, before, after in (
        ("parameters", plain.count_params(), small.count_params()),
        ("FLOPs (MACs/image)", keras_psp.count_flops(plain), keras_psp.count_flops(small)),
        (".tflite size (bytes)", exported["dense_tflite"].size, exported["slim_tflite"].size),
        ("XLA latency, batch 128 ms", dense_ms, slim_ms),
        ("LiteRT latency, batch 1 ms", dense_lite, slim_lite),
    ):
        print(f"{label:>26}{before:>12.4g}{after:>12.4g}{after / before:>8.3f}")
    lines = []
    keras_psp.summary(model, print_fn=lines.append, slim_model=small)
    summary_path = os.path.join(args.out, "summary.txt")
    with open(summary_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_path = keras_psp.plot_alphas(model, os.path.join(args.out, "alphas.png"))
    print(f"saved {wrapped_path} (wrapped) and {slim_path} (slim, plain Keras),")
    print(f"      {summary_path} (per-layer summary), {plot_path} (α histograms),")
    print(f"      {os.path.join(args.out, 'tensorboard')} (TensorBoard: α histograms, psp_*),")
    print(f"      {exported['slim_saved_model'].path} (SavedModel, XLA) and "
          f"{exported['slim_tflite'].path} (LiteRT), both verified")
    return {"history": history.history, "test_accuracy": accuracy,
            "wrapped_path": wrapped_path, "slim_path": slim_path,
            "separation": [h["psp_separation"] for h in monitor.history],
            "summary_path": summary_path, "plot_path": plot_path,
            "difference": difference, "flops": (keras_psp.count_flops(plain),
                                                keras_psp.count_flops(small)),
            "exported": exported, "latency_ms": {"xla_b128": (dense_ms, slim_ms),
                                                 "litert_b1": (dense_lite, slim_lite)}}


def export_both(plain, small, x, out: str) -> dict:
    """Exports the slim model (SavedModel with XLA, LiteRT) and, for the
    latency comparison, the unpruned one (LiteRT); each file is verified."""
    return {
        "slim_saved_model": keras_psp.export(small, os.path.join(out, "slim_saved_model"),
                                             jit_compile=True, check_inputs=x, overwrite=True),
        "slim_tflite": keras_psp.export(small, os.path.join(out, "slim_model.tflite"),
                                        format="tflite", check_inputs=x, overwrite=True),
        "dense_tflite": keras_psp.export(plain, os.path.join(out, "dense_model.tflite"),
                                         format="tflite", check_inputs=x, overwrite=True),
    }


def litert_ms(a: str, b: str, x, rounds: int = 15, invokes: int = 20) -> tuple[float, float]:
    """Median time (ms) of one batch-1 LiteRT inference, two files, interleaved."""
    from keras_psp.runtimes import LiteRTRunner

    runners = [LiteRTRunner(path, threads=1) for path in (a, b)]
    prepared = [runner.prepare([x]) for runner in runners]
    times = ([], [])
    for _ in range(rounds):
        for runner, inputs, bucket in zip(runners, prepared, times, strict=True):
            start = time.perf_counter()
            for _ in range(invokes):
                runner.run(inputs)
            bucket.append((time.perf_counter() - start) * 1e3 / invokes)
    return float(np.median(times[0])), float(np.median(times[1]))


def latency_ms(a, b, x, rounds: int = 15) -> tuple[float, float]:
    """Median inference time (ms) of two models, XLA-compiled, interleaved."""
    import tensorflow as tf

    fns = [tf.function(m.__call__, jit_compile=True) for m in (a, b)]
    x = tf.constant(x)
    times = ([], [])
    for fn in fns:  # compile and warm up
        fn(x, training=False)
    for _ in range(rounds):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            np.asarray(fn(x, training=False))
            bucket.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[0])), float(np.median(times[1]))


if __name__ == "__main__":
    main()
