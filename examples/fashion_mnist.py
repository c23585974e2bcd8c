"""The main job: prune a trained ResNet on Fashion-MNIST with PSP, end to end.

Reads Fashion-MNIST offline (Debian's `dataset-fashion-mnist`), trains the
unpruned ResNet-8 32-64-128 (the reference: its test accuracy is printed), then prunes
it the way the README's first workflow does: `keras_psp.wrap(structure=
"group")` gives every channel of every coupled channel group (the residual
streams, each block's inner width) one α with the default scale-invariant
penalty, read by all the layers that read the channel, and `fit` runs a few
epochs while
`keras_psp.FlopsBudget` cuts the lowest-ranked structures on a schedule
(target reached half-way, BN statistics re-estimated before each
validation). It prints per-epoch accuracy, structures cut, separation and
slim FLOPs, saves the trained wrapped model (`.keras`), and slims it: a
physically smaller plain Keras model, verified against the pruned one,
exported as a SavedModel (XLA) and a LiteRT file (each verified after
writing), with parameters, FLOPs, file size and latency (XLA batch 128,
LiteRT batch 1) before → after, and the accuracy against the reference.

    python examples/fashion_mnist.py                      # the default run
    python examples/fashion_mnist.py --target 0.3         # a smaller model
    python examples/fashion_mnist.py --workflow scratch   # PSP from the first epoch
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import keras
import numpy as np

import keras_psp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _local_data import load_fashion_mnist  # noqa: E402  (examples/)

from keras_psp.models import cifar_resnet  # noqa: E402

#: Training images whose BN statistics the pruned model is re-estimated on.
RECALIBRATION = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workflow", default="trained", choices=("trained", "scratch"),
                   help="trained: train the unpruned reference, then prune it (default); "
                        "scratch: train the reference, and PSP from the same initialisation")
    p.add_argument("--epochs", type=int, default=5, help="N: epochs of the unpruned reference")
    p.add_argument("--prune-epochs", type=int, default=3,
                   help="k: pruning epochs (trained), or extra epochs (scratch: N + k in all)")
    p.add_argument("--target", type=float, default=0.5,
                   help="FLOPs of the slim model over the reference's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate of training")
    p.add_argument("--prune-lr", type=float, default=0.03,
                   help="peak SGD learning rate while pruning a trained model")
    p.add_argument("--structure", default="group", choices=(*keras_psp.STRUCTURES, "group"),
                   help="group (default: one α per coupled channel group, widths kept at "
                   "multiples of 8, no gathers: the slim model runs faster) or a per-layer "
                   "structure")
    p.add_argument("--regularizer", default=keras_psp.penalties.DEFAULT_PENALTY,
                   choices=keras_psp.penalties.NAMES, help="the penalty on α")
    p.add_argument("--strength", type=float, default=None,
                   help="strength of the penalty on α (default: keras_psp's for it)")
    p.add_argument("--depth", type=int, default=8, help="ResNet depth, 6n+2")
    p.add_argument("--widths", default="32,64,128",
                   help="filters of the 3 stages (16,32,64: the study's, 4x fewer FLOPs)")
    p.add_argument("--stem-stride", type=int, default=2, help="stride of the first conv")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on the first N test images only (quick runs; at least 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fashion_mnist", help="output folder")
    p.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    if args.epochs < 1 or args.prune_epochs < 1:
        p.error("--epochs and --prune-epochs must be at least 1")
    if args.test_limit is not None and args.test_limit < 256:
        p.error("--test-limit must be at least 256 (the slim model is verified on 256 images)")
    return args


class PruningReport(keras.callbacks.Callback):
    """Prints, after each epoch, accuracy and the SeparationMonitor's figures.

    List it after the monitor and the budget, which put `psp_*` into the logs.
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
            f"  structures cut {cut}/{total} ({100 * cut / total:.1f}%)"
            f"  separation {logs.get('psp_separation', nan):.3f}"
            f"  slim FLOPs {logs.get('psp_flops', nan):.3f}",
            flush=True,
        )


def _compile(model, lr: float, epochs: int, steps_per_epoch: int) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps_per_epoch))
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), -1) == y))


def main(argv=None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    if args.test_limit:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    widths = tuple(int(w) for w in args.widths.split(","))
    base = cifar_resnet(
        args.depth, widths, input_shape=(28, 28, 1), stem_stride=args.stem_stride, name="resnet"
    )
    initial = base.get_weights()
    steps = int(np.ceil(len(x_train) / args.batch_size))
    print(f"unpruned reference: {base.name}, {keras_psp.count_flops(base):,} MACs, "
          f"{base.count_params():,} parameters; {len(x_train)} training images, "
          f"{args.epochs} epochs", flush=True)
    _compile(base, args.lr, args.epochs, steps)
    start = time.perf_counter()
    base.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
             validation_data=(x_test, y_test), verbose=args.verbose)
    reference_seconds = time.perf_counter() - start
    reference = _accuracy(base, x_test, y_test)
    print(f"unpruned reference: test accuracy {reference:.4f} after {args.epochs} epochs "
          f"({reference_seconds:.0f} s)", flush=True)

    if args.workflow == "scratch":  # PSP from the reference's own initialisation
        start_from = keras.models.clone_model(base)
        start_from.set_weights(initial)
        epochs, lr, begin, end = args.epochs + args.prune_epochs, args.lr, 0.1, 0.6
    else:
        start_from, epochs, lr, begin, end = base, args.prune_epochs, args.prune_lr, 0.0, 0.5
    model = keras_psp.wrap(start_from, structure=args.structure, regularizer=args.regularizer,
                           strength=args.strength)  # a new model: `base` stays as it is
    _compile(model, lr, epochs, steps)
    n_alpha = sum(int(np.prod(layer.alpha.shape)) for layer in keras_psp.cloning.psp_layers(model))
    print(
        f"PSP {args.structure!r} ({args.regularizer}) on {model.name}, {args.workflow}: "
        f"{len(keras_psp.cloning.psp_layers(model))} "
        f"{'channel groups' if args.structure == 'group' else 'wrapped layers'}, {n_alpha} structures; "
        f"{epochs} epochs to {args.target:g}× FLOPs",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    monitor = keras_psp.SeparationMonitor(
        log_dir=os.path.join(args.out, "tensorboard"), verbose=0
    )
    budget = keras_psp.FlopsBudget(target=args.target, begin=begin, end=end,
                                   recalibrate=x_train[:RECALIBRATION],
                                   verbose=1 if args.verbose else 0)
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=epochs,
        validation_data=(x_test, y_test),
        callbacks=[monitor, budget, PruningReport()],
        verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    wrapped_path = os.path.join(args.out, "psp_model.keras")
    model.save(wrapped_path)
    plain = keras_psp.strip(model)
    dense = base  # the unpruned reference, for the comparisons
    small = keras_psp.slim(model, check_inputs=x_test[:256])
    checked = x_test[:1000]
    difference = keras_psp.verify(plain, small, checked)
    slim_path = os.path.join(args.out, "slim_model.keras")
    small.save(slim_path)
    accuracy = _accuracy(small, x_test, y_test)
    print(f"pruned in {seconds:.0f} s; test accuracy: slim model {accuracy:.4f}, unpruned "
          f"reference {reference:.4f} ({100 * (accuracy - reference):+.2f} points)")
    print(f"slim vs pruned model: max |difference| {difference:.2e} on {len(checked)} test "
          "images")
    exported = export_both(dense, small, x_test[:256], args.out)
    for report in exported.values():
        print(report)
    dense_ms, slim_ms = latency_ms(dense, small, x_test[:128])
    dense_lite, slim_lite = litert_ms(exported["dense_tflite"].path, exported["slim_tflite"].path,
                                      x_test[:1])
    print(f"{'':>26}{'before':>12}{'after':>12}{'ratio':>8}")
    for label, before, after in (
        ("test accuracy", reference, accuracy),
        ("parameters", dense.count_params(), small.count_params()),
        ("FLOPs (MACs/image)", keras_psp.count_flops(dense), keras_psp.count_flops(small)),
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
    print(f"key ratio: {keras_psp.count_flops(small) / keras_psp.count_flops(dense):.3f}× FLOPs, "
          f"{slim_ms / dense_ms:.3f}× XLA and {slim_lite / dense_lite:.3f}× LiteRT latency, "
          f"{100 * (accuracy - reference):+.2f} points of accuracy")
    return {"history": history.history, "test_accuracy": accuracy,
            "reference_accuracy": reference,
            "wrapped_path": wrapped_path, "slim_path": slim_path,
            "separation": [h["psp_separation"] for h in monitor.history],
            "summary_path": summary_path, "plot_path": plot_path,
            "difference": difference, "flops": (keras_psp.count_flops(dense),
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
    cases = {i: functools.partial(r.run, r.prepare([x])) for i, r in enumerate(runners)}
    ms = keras_psp.timing.medians_ms(keras_psp.timing.interleaved(cases, rounds, invokes))
    return ms[0], ms[1]


def latency_ms(a, b, x, rounds: int = 15) -> tuple[float, float]:
    """Median inference time (ms) of two models, XLA-compiled, interleaved."""
    import tensorflow as tf

    fns = [tf.function(m.__call__, jit_compile=True) for m in (a, b)]
    x = tf.constant(x)
    cases = {i: (lambda fn=fn: np.asarray(fn(x, training=False))) for i, fn in enumerate(fns)}
    ms = keras_psp.timing.medians_ms(keras_psp.timing.interleaved(cases, rounds, warmup=1))
    return ms[0], ms[1]


if __name__ == "__main__":
    main()
