"""A small Vision Transformer on Fashion-MNIST, pruned by attention heads and MLP neurons.

The transformer is made of stock Keras layers only, as in keras.io's ViT
example: a 4×4 patch embedding (`Conv2D` with stride 4: 49 tokens), a
depthwise 3×3 convolution over the patch grid added as the position encoding
(CPVT's conditional position encoding, so no custom layer is needed),
`--depth` pre-norm blocks of `LayerNormalization`, `MultiHeadAttention` and
a GELU MLP, then LayerNorm, average pooling and a `Dense` classifier.

The run, with equal epochs for both arms:

1. the unpruned ViT trains `--epochs` epochs (AdamW, cosine schedule);
2. **unpruned**: it trains `--prune-epochs` more epochs (the equal-epochs
   reference);
3. **PSP**: from the same trained weights, `keras_psp.wrap` with
   `structure={"MultiHeadAttention": "head", "Dense": "channel"}` on the
   attention layers (one α per head) and each MLP's second `Dense` (one α
   per MLP neuron), `--prune-epochs` epochs with
   `keras_psp.FlopsBudget(--target, allocation=--allocation)` (global: the
   lowest-ranked heads and neurons of the whole model go first); then `slim`: fewer heads in every
   `MultiHeadAttention`, fewer units in every MLP, verified against the
   pruned model, exported as a SavedModel (XLA) and a LiteRT file.

It prints both accuracies, FLOPs, parameters and latency (XLA batch 128,
LiteRT batch 1, interleaved medians) before → after, and writes the α
histograms (`alphas.png`: one panel per wrapped layer, heads and neurons).
The hidden (model) width is not pruned: every LayerNorm normalizes over all
of it, so keras_psp keeps it.

    python examples/fashion_mnist_vit.py                  # the default run, 32 min on 2 CPU cores
    python examples/fashion_mnist_vit.py --target 0.3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import keras
import numpy as np
from keras import layers as L

import keras_psp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _local_data import load_fashion_mnist  # noqa: E402  (examples/)
from fashion_mnist import PruningReport, export_both, latency_ms, litert_ms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6, help="N: epochs of the unpruned ViT")
    p.add_argument("--prune-epochs", type=int, default=3,
                   help="k: further epochs, for both the unpruned and the PSP arm")
    p.add_argument("--target", type=float, default=0.5,
                   help="FLOPs of the slim model over the unpruned one's")
    p.add_argument("--allocation", default="global", choices=("uniform", "global"),
                   help="how FlopsBudget spreads the cut over the layers (global measured "
                        "best here: -0.96 points against -1.50 for uniform)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", type=int, default=64, help="hidden (model) width")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block")
    p.add_argument("--mlp", type=int, default=128, help="MLP neurons per block")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--prune-lr", type=float, default=5e-4,
                   help="peak AdamW learning rate of the k further epochs (both arms)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on only the first N test images (quick runs; at least 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fashion_mnist_vit", help="output folder")
    p.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity")
    args = p.parse_args(argv)
    if not 0 < args.target < 1:
        p.error("--target must be in (0, 1)")
    if args.prune_epochs < 1 or args.epochs < 1:
        p.error("--epochs and --prune-epochs must be positive")
    if args.test_limit is not None and args.test_limit < 256:
        p.error("--test-limit must be at least 256 (the slim model is verified on 256 images)")
    if args.width % args.heads:
        p.error("--width must be a multiple of --heads")
    return args


def vit(depth: int = 4, width: int = 64, heads: int = 4, mlp: int = 128,
        input_shape=(28, 28, 1), patch: int = 4, classes: int = 10) -> keras.Model:
    """A pre-norm ViT of stock Keras layers (patch embedding, MHA, GELU MLP)."""
    inputs = keras.Input(input_shape)
    x = L.Conv2D(width, patch, strides=patch, name="patches")(inputs)
    x = L.Add(name="position")([x, L.DepthwiseConv2D(3, padding="same", name="cpe")(x)])
    grid = (input_shape[0] // patch) * (input_shape[1] // patch)
    x = L.Reshape((grid, width), name="tokens")(x)
    for i in range(depth):
        h = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = L.MultiHeadAttention(heads, width // heads, name=f"block{i}_attention")(h, h)
        x = L.Add(name=f"block{i}_add1")([x, h])
        h = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = L.Dense(mlp, activation="gelu", name=f"block{i}_mlp_in")(h)
        h = L.Dense(width, name=f"block{i}_mlp_out")(h)
        x = L.Add(name=f"block{i}_add2")([x, h])
    x = L.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(classes, activation="softmax", name="classes")(x),
                       name="vit")


def _compile(model, lr: float, epochs: int, steps: int) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps),
                                                      warmup_target=None)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
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
    steps = int(np.ceil(len(x_train) / args.batch_size))
    base = vit(args.depth, args.width, args.heads, args.mlp)
    print(f"unpruned ViT: {keras_psp.count_flops(base):,} MACs, {base.count_params():,} "
          f"parameters; {len(x_train)} training images, {args.epochs} epochs", flush=True)
    _compile(base, args.lr, args.epochs, steps)
    start = time.perf_counter()
    base.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
             verbose=args.verbose)
    trained = _accuracy(base, x_test, y_test)
    print(f"unpruned ViT: test accuracy {trained:.4f} after {args.epochs} epochs "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    # PSP arm: heads and MLP neurons, from the trained weights (`base` is not modified)
    mlp_out = [layer.name for layer in base.layers if layer.name.endswith("_mlp_out")]
    model = keras_psp.wrap(base, structure={"MultiHeadAttention": "head", "Dense": "channel"},
                           layers=lambda layer: isinstance(layer, L.MultiHeadAttention)
                           or layer.name in mlp_out)
    wrapped = keras_psp.cloning.psp_layers(model)
    print(f"PSP: {sum(w.structure == 'head' for w in wrapped)} attention layers "
          f"(one α per head), {len(mlp_out)} MLPs (one α per neuron); {args.prune_epochs} "
          f"epochs to {args.target:g}× FLOPs", flush=True)
    _compile(model, args.prune_lr, args.prune_epochs, steps)
    os.makedirs(args.out, exist_ok=True)
    monitor = keras_psp.SeparationMonitor(log_dir=os.path.join(args.out, "tensorboard"),
                                          verbose=0)
    budget = keras_psp.FlopsBudget(target=args.target, begin=0.0, end=0.5,
                                   allocation=args.allocation, verbose=1 if args.verbose else 0)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.prune_epochs,
              validation_data=(x_test, y_test), callbacks=[monitor, budget, PruningReport()],
              verbose=args.verbose)
    psp_seconds = time.perf_counter() - start
    check = x_test[:256]
    small = keras_psp.slim(model, check_inputs=check)
    pruned = _accuracy(small, x_test, y_test)

    # unpruned arm: the same k further epochs, same schedule
    _compile(base, args.prune_lr, args.prune_epochs, steps)
    start = time.perf_counter()
    base.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.prune_epochs,
             verbose=args.verbose)
    reference = _accuracy(base, x_test, y_test)
    print(f"after {args.epochs} + {args.prune_epochs} epochs: unpruned {reference:.4f} "
          f"({time.perf_counter() - start:.0f} s for k), slim {pruned:.4f} "
          f"({psp_seconds:.0f} s for k), {100 * (pruned - reference):+.2f} points", flush=True)

    heads = [layer.num_heads for layer in small.layers
             if isinstance(layer, L.MultiHeadAttention)]
    neurons = [layer.units for layer in small.layers if layer.name.endswith("_mlp_in")]
    print(f"slim ViT: heads per block {heads} (of {args.heads}), MLP neurons {neurons} "
          f"(of {args.mlp})", flush=True)
    exported = export_both(base, small, check, args.out)
    dense_ms, slim_ms = latency_ms(base, small, x_test[:128])
    dense_lite, slim_lite = litert_ms(exported["dense_tflite"].path,
                                      exported["slim_tflite"].path, x_test[:1])
    flops = (keras_psp.count_flops(base), keras_psp.count_flops(small))
    rows = [("test accuracy", reference, pruned),
            ("parameters", base.count_params(), small.count_params()),
            ("FLOPs (MACs/image)", *flops),
            (".tflite size (bytes)", exported["dense_tflite"].size,
             exported["slim_tflite"].size),
            ("XLA latency, batch 128 ms", dense_ms, slim_ms),
            ("LiteRT latency, batch 1 ms", dense_lite, slim_lite)]
    print(f"{'':>28}{'unpruned':>12}{'slim':>12}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:>28}{a:>12.4g}{b:>12.4g}{b / a:>8.3f}")
    plot_path = keras_psp.plot_alphas(model, os.path.join(args.out, "alphas.png"))
    slim_path = os.path.join(args.out, "slim_vit.keras")
    small.save(slim_path)
    print(f"saved {slim_path} (plain Keras), {plot_path} (α histograms)")
    print(f"key ratio: {flops[1] / flops[0]:.3f}× FLOPs, {slim_ms / dense_ms:.3f}× XLA and "
          f"{slim_lite / dense_lite:.3f}× LiteRT latency, {100 * (pruned - reference):+.2f} "
          "points of accuracy")
    return {"reference_accuracy": reference, "test_accuracy": pruned, "flops": flops,
            "heads": heads, "neurons": neurons, "plot_path": plot_path,
            "slim_model": small, "slim_path": slim_path,
            "latency_ms": {"xla_b128": (dense_ms, slim_ms),
                           "litert_b1": (dense_lite, slim_lite)}}


if __name__ == "__main__":
    main()
