"""The main job: PSP training of a small ResNet on Fashion-MNIST, end to end.

Reads Fashion-MNIST offline (Debian's `dataset-fashion-mnist`), wraps every
convolution and the classifier of a ResNet-8 in `keras_psp.PSP`, trains with
SGD + momentum and a cosine schedule, prints per-epoch accuracy and how many
structures are below the pruning threshold, and saves the trained wrapped
model (`.keras`) and its stripped plain-Keras twin.

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
    """Prints, after each epoch, how many structures are below the threshold."""

    def on_epoch_end(self, epoch, logs=None):
        masks = [layer.mask() for layer in keras_psp.cloning.psp_layers(self.model)]
        total = sum(m.size for m in masks)
        cut = total - sum(int(m.sum()) for m in masks)
        logs = logs or {}
        print(
            f"epoch {epoch + 1}: accuracy {logs.get('accuracy', float('nan')):.4f}"
            f"  val_accuracy {logs.get('val_accuracy', float('nan')):.4f}"
            f"  structures below threshold {cut}/{total} ({100 * cut / total:.1f}%)",
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
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[PruningReport()],
        verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    wrapped_path = os.path.join(args.out, "psp_model.keras")
    model.save(wrapped_path)
    plain = keras_psp.strip(model)
    plain_path = os.path.join(args.out, "pruned_plain.keras")
    plain.save(plain_path)
    _, accuracy = plain.evaluate(x_test, y_test, batch_size=512, verbose=0)
    print(f"trained in {seconds:.0f} s; test accuracy of the pruned model {accuracy:.4f}")
    print(f"saved {wrapped_path} (wrapped) and {plain_path} (plain Keras)")
    return {"history": history.history, "test_accuracy": accuracy,
            "wrapped_path": wrapped_path, "plain_path": plain_path}


if __name__ == "__main__":
    main()
