"""Shared code of the paper examples: flags, and train → slim → export → results.

`parser` builds the flags every example has; `train_prune_export` wraps a
model in `keras_psp.PSP`, trains it with SGD + momentum (resumable: a
`BackupAndRestore` backup under `--out`), slims and exports it, and writes
`results.json`. Output folder (`--out`):

    backup/            training state after the last finished epoch (resume)
    tensorboard/       keras.callbacks.TensorBoard (train/, validation/) and
                       SeparationMonitor (psp/: per-layer α histograms)
    log.csv            one row per epoch, kept across resumed runs
    psp_model.keras    the trained PSP-wrapped model
    slim_model.keras   the slim plain Keras model
    saved_model/       its SavedModel (keras_psp.export, verified)
    model.tflite       with --tflite
    summary.txt        keras_psp.summary: per-layer cuts, FLOPs, parameters
    results.json       accuracy, FLOPs/parameters before → after, cuts, timings

Running the same command again resumes from `backup/`: an interrupted run
continues with the next epoch, a finished one goes straight to slimming.
Delete the folder (or use another `--out`) to start afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import time

import keras
import numpy as np

import keras_psp
from keras_psp.cloning import psp_layers
from keras_psp.stats import model_stats


def parser(doc: str, structures: tuple[str, ...], *, structure: str, epochs: int,
           batch_size: int, lr: float, weight_decay: float, schedule: str,
           milestones: str = "0.5,0.75", nesterov: bool = False, manual_dir: bool = False,
           out: str = "runs/paper") -> argparse.ArgumentParser:
    """The common flags, with this example's defaults; add the model's own.

    `manual_dir` adds `--manual-dir` (datasets tfds cannot download).
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=epochs)
    t.add_argument("--batch-size", type=int, default=batch_size)
    t.add_argument("--lr", type=float, default=lr, help="peak SGD learning rate")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=nesterov,
                   help="Nesterov momentum")
    t.add_argument("--schedule", choices=("step", "cosine"), default=schedule,
                   help="step: ×0.1 at each milestone; cosine: to 0")
    t.add_argument("--milestones", default=milestones,
                   help="step schedule: fractions of the epochs, comma-separated")
    t.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warm-up from lr/10 (cosine schedule only)")
    t.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="SGD weight decay on the kernels (gradient += wd·w, as in the papers; "
                        "a Keras L2(wd/2) regularizer)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--run-eagerly", action="store_true",
                   help="no tf.function: for debugging, and quicker for a few steps")
    q = p.add_argument_group("pruning")
    q.add_argument("--structure", choices=structures, default=structure)
    q.add_argument("--strength", type=float, default=None,
                   help="keras_psp strength: L2 on α, loss += strength·Σα² (the paper's λ is "
                        f"2·strength); default {keras_psp.wrapper.DEFAULT_STRENGTH}")
    q.add_argument("--threshold", type=float, default=keras_psp.wrapper.DEFAULT_THRESHOLD,
                   help="cut α below threshold × the layer's largest |α|")
    q.add_argument("--flops-target", type=float, default=None,
                   help="cut on a schedule so that the slim model keeps this fraction of the "
                        "FLOPs (keras_psp.FlopsBudget; a resumed run goes on from the saved α)")
    q.add_argument("--multiple-of", type=int, default=None,
                   help="slim: round widths up to a multiple of this (8 suits GPUs and XLA)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None, help="tensorflow-datasets data folder")
    d.add_argument("--train-limit", type=int, default=None, help="use only N training examples")
    d.add_argument("--eval-limit", type=int, default=None, help="use only N test examples")
    d.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch (default: one pass over the training data)")
    d.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    if manual_dir:
        d.add_argument("--manual-dir", default=None,
                       help="folder of the manually downloaded archives "
                            "(default <data-dir>/downloads/manual)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=out, help="output folder (resumes from its backup/)")
    o.add_argument("--tflite", choices=("float32", "dynamic", "float16", "int8"), default=None,
                   help="also export a LiteRT file, optionally quantized")
    o.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard logs (needs the tensorboard package)")
    o.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (2: a line per epoch)")
    return p


DISTRIBUTIONS = ("none", "jax", "mirrored", "multi_worker")


def add_distribution_flags(p: argparse.ArgumentParser) -> None:
    """`--distribution` and the JAX process flags (see README, "Distributed training")."""
    g = p.add_argument_group("distribution")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default="none",
                   help="jax: processes with keras.distribution.DataParallel (KERAS_BACKEND=jax); "
                        "mirrored: tf.distribute.MirroredStrategy over this machine's devices; "
                        "multi_worker: tf.distribute.MultiWorkerMirroredStrategy (reads TF_CONFIG)")
    g.add_argument("--coordinator", default=None,
                   help="jax: host:port of process 0 (default $KERAS_DISTRIBUTION_JOB_ADDRESSES)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="jax: number of processes (default $KERAS_DISTRIBUTION_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="jax: this process (default $KERAS_DISTRIBUTION_PROCESS_ID)")


def setup_distribution(args):
    """Starts `--distribution` before anything runs; returns the tf.distribute
    strategy to build the model under (None for none and jax)."""
    if args.distribution == "jax":
        if keras.backend.backend() != "jax":
            raise SystemExit("--distribution jax needs KERAS_BACKEND=jax.")
        keras_psp.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return None
    if args.distribution in ("mirrored", "multi_worker"):
        if keras.backend.backend() != "tensorflow":
            raise SystemExit(f"--distribution {args.distribution} needs KERAS_BACKEND=tensorflow.")
        import tensorflow as tf

        if args.distribution == "mirrored":
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def widths(text: str) -> tuple[int, ...]:
    """'16,32,64' → (16, 32, 64); for `type=` of argparse."""
    try:
        values = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return values


def learning_rate(args, steps_per_epoch: int):
    """The SGD learning-rate schedule of `--schedule` over all training steps."""
    total = max(1, args.epochs * steps_per_epoch)
    if args.schedule == "cosine":
        warmup = int(args.warmup_epochs * steps_per_epoch)
        if not warmup:
            return keras.optimizers.schedules.CosineDecay(args.lr, total)
        return keras.optimizers.schedules.CosineDecay(
            args.lr / 10, max(1, total - warmup), warmup_target=args.lr, warmup_steps=warmup)
    if args.warmup_epochs:
        raise ValueError("--warmup-epochs works with --schedule cosine only.")
    fractions = sorted(float(f) for f in args.milestones.split(",") if f.strip())
    boundaries = [max(1, round(f * total)) for f in fractions]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [args.lr * 0.1**i for i in range(len(boundaries) + 1)])


def with_kernel_decay(model: keras.Model, weight_decay: float) -> keras.Model:
    """A copy of `model` with SGD weight decay `weight_decay` on every kernel.

    Sets an `L2(weight_decay / 2)` kernel regularizer (gradient
    `weight_decay · w`) on every convolution and Dense layer, whatever the
    model was built with (`keras.applications` models have none). Weights
    are copied.
    """
    def clone(layer):
        config = layer.get_config()
        for key in ("kernel_regularizer", "depthwise_regularizer", "pointwise_regularizer"):
            if key in config:
                config[key] = keras.regularizers.L2(weight_decay / 2)
        return layer.__class__.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    new.set_weights(model.get_weights())
    return new


def _resume_epoch(backup_dir: str) -> int:
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


def _callbacks(args, backup_dir, tensorboard_dir, extra):
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError("TensorBoard logs need the `tensorboard` package: "
                           "`pip install tensorboard`, or pass --no-tensorboard.")
    monitor = keras_psp.SeparationMonitor(
        log_dir=os.path.join(tensorboard_dir, "psp") if args.tensorboard else None,
        verbose=int(args.verbose > 0))
    chief_only = keras_psp.distributed.ChiefOnly  # several processes: one writer
    callbacks = [keras_psp.distributed.BackupAndRestore(backup_dir, delete_checkpoint=False),
                 monitor]
    if args.flops_target is not None:
        callbacks.append(keras_psp.FlopsBudget(target=args.flops_target,
                                               verbose=int(args.verbose > 0)))
    callbacks.append(chief_only(keras.callbacks.CSVLogger(os.path.join(args.out, "log.csv"),
                                                          append=True)))
    if args.tensorboard:
        callbacks.append(chief_only(keras.callbacks.TensorBoard(tensorboard_dir)))
    return callbacks + list(extra)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _epoch_log(path: str) -> list[dict]:
    """Rows of the CSV log, numbers as floats (all runs into this folder)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _ratio(before, after):
    return {"before": int(before), "after": int(after), "ratio": after / before if before else None}


def _train(args, wrapped, data, callbacks) -> tuple[int, float]:
    """Fits, resuming from `--out`/backup; (epochs trained now, seconds)."""
    backup_dir = os.path.join(args.out, "backup")
    start = time.perf_counter()
    kwargs = {"epochs": args.epochs, "steps_per_epoch": data.steps_per_epoch,
              "callbacks": _callbacks(args, backup_dir, os.path.join(args.out, "tensorboard"),
                                      callbacks),
              "verbose": args.verbose if keras_psp.distributed.is_chief() else 0}
    if getattr(args, "distribution", "none") != "multi_worker":  # keras_psp's loop: no validation
        kwargs.update(validation_data=data.eval, validation_freq=args.val_every, shuffle=False)
    history = keras_psp.distributed.fit(wrapped, data.train, **kwargs)
    return len(history.epoch), time.perf_counter() - start


def _export(args, small, data, images) -> dict:
    """`keras_psp.export` reports: the SavedModel, and a LiteRT file with --tflite."""
    reports = {"saved_model": keras_psp.export(
        small, os.path.join(args.out, "saved_model"), check_inputs=images, overwrite=True)}
    if args.tflite:
        quantize = None if args.tflite == "float32" else args.tflite
        calibration = next(iter(data.train))[0].numpy()[:256] if quantize == "int8" else None
        reports["tflite"] = keras_psp.export(
            small, os.path.join(args.out, "model.tflite"), format="tflite", quantize=quantize,
            representative_data=calibration, check_inputs=images, overwrite=True)
    return {k: {"path": r.path, "format": r.format, "quantize": r.quantize, "size_bytes": r.size,
                "max_difference": r.max_diff, "relative_error": r.relative_error,
                "top1_agreement": r.agreement}
            for k, r in reports.items()}


def _max_difference(a: keras.Model, b: keras.Model, x) -> float:
    ya, yb = (keras.ops.convert_to_numpy(m(x, training=False)) for m in (a, b))
    return float(np.max(np.abs(ya - yb)))


def train_prune_export(args, model: keras.Model, data, layers=None, metrics=None,
                       callbacks=(), example: str = "", strategy=None) -> dict:
    """Wraps, trains (resuming from `--out`/backup), slims, exports; returns the results.

    Args:
        args: The parsed flags of `parser` (plus the example's own).
        model: The plain model to prune (softmax outputs, sparse labels).
        data: An `_data.Data`.
        layers: `keras_psp.wrap`'s selector of the layers to wrap (None: all).
        metrics: A function returning fresh Keras metrics (for the wrapped and
            the slim model); None: accuracy only.
        callbacks: More Keras callbacks for `fit`.
        example: The example's name, for the results file.
        strategy: A tf.distribute strategy to wrap and compile under
            (`setup_distribution`); training runs through
            `keras_psp.distributed.fit`. With several processes only the
            chief slims, exports and writes; the others return `{}`.
    """
    metrics = metrics or (lambda: ["accuracy"])
    os.makedirs(args.out, exist_ok=True)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        wrapped = keras_psp.wrap(model, structure=args.structure, layers=layers,
                                 strength=args.strength, threshold=args.threshold)
        wrapped.compile(
            optimizer=keras.optimizers.SGD(learning_rate(args, data.steps_per_epoch),
                                           momentum=args.momentum, nesterov=args.nesterov),
            loss="sparse_categorical_crossentropy",
            metrics=metrics(),
            run_eagerly=args.run_eagerly,
        )
    resumed_from = min(_resume_epoch(os.path.join(args.out, "backup")), args.epochs)
    wrapped_layers = psp_layers(wrapped)
    print(f"{example}: PSP {args.structure!r} on {model.name} ({len(wrapped_layers)} wrapped "
          f"layers), {data.name}: {data.train_examples} training / {data.eval_examples} test "
          f"examples, {args.epochs} epochs of {data.steps_per_epoch} steps"
          + (f"; resuming after epoch {resumed_from}" if resumed_from else ""), flush=True)
    timings = {}
    trained_now, timings["train"] = _train(args, wrapped, data, callbacks)
    if keras_psp.distributed.process_count() > 1 and not keras_psp.distributed.is_chief():
        return {}  # the chief slims, exports and writes
    if keras.backend.backend() == "jax":  # training done: work in this process only
        keras.distribution.set_distribution(None)
    if getattr(args, "distribution", "none") != "none":  # same α, weights in this process
        wrapped = keras_psp.distributed.local_copy(wrapped)
        wrapped_layers = psp_layers(wrapped)
    files = {name: os.path.join(args.out, name) for name in (
        "psp_model.keras", "slim_model.keras", "summary.txt", "log.csv", "backup", "tensorboard")}
    if not args.tensorboard:
        files["tensorboard"] = None
    wrapped.save(files["psp_model.keras"])

    images = next(iter(data.eval))[0].numpy()[:256]
    start = time.perf_counter()
    small = keras_psp.slim(wrapped, check_inputs=images, multiple_of=args.multiple_of)
    timings["slim"] = time.perf_counter() - start
    small.save(files["slim_model.keras"])
    start = time.perf_counter()
    small.compile(loss="sparse_categorical_crossentropy", metrics=metrics(),
                  run_eagerly=args.run_eagerly)
    scores = small.evaluate(data.eval, verbose=0, return_dict=True)
    timings["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    exports = _export(args, small, data, images)
    timings["export"] = time.perf_counter() - start

    lines = []
    keras_psp.summary(wrapped, print_fn=lines.append, slim_model=small)
    with open(files["summary.txt"], "w") as f:
        f.write("\n".join(lines) + "\n")
    stats, separation = model_stats(wrapped_layers)
    log = _epoch_log(files["log.csv"])
    metric = "accuracy" if "accuracy" in scores else next(k for k in scores if k != "loss")
    n_alpha = sum(layer.own_param_count() for layer in wrapped_layers)  # α, strength
    cut, total = sum(s.cut for s in stats), sum(s.total for s in stats)
    results = {
        "example": example,
        "model": model.name,
        "dataset": data.name,
        "args": vars(args),
        "epochs": {"total": args.epochs, "resumed_from": resumed_from, "trained_now": trained_now},
        "accuracy": float(scores[metric]),  # of the slim model, on the whole test split
        "metrics": {k: float(v) for k, v in scores.items()},
        "val_accuracy_by_epoch": [row.get(f"val_{metric}") for row in log],
        "flops": _ratio(keras_psp.count_flops(wrapped), keras_psp.count_flops(small)),
        "params": _ratio(wrapped.count_params() - n_alpha, small.count_params()),
        "structures": {"total": total, "cut": cut, "fraction_cut": cut / max(total, 1),
                       "by_layer": {s.name: {"cut": s.cut, "total": s.total} for s in stats}},
        "separation": separation,
        "separation_by_epoch": [row.get("psp_separation") for row in log],
        "flops_by_epoch": [row.get("psp_flops") for row in log],  # with --flops-target
        "slim_max_difference": _max_difference(wrapped, small, images[:32]),
        "exports": exports,
        "timings_s": {**timings, "train_per_epoch": timings["train"] / max(trained_now, 1)},
        "preprocessing": data.preprocessing,
        "files": files,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    _report(results, path)
    return results


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _report(results: dict, path: str) -> None:
    flops, params, cut = results["flops"], results["params"], results["structures"]
    print(f"test accuracy of the slim model {results['accuracy']:.4f}; "
          f"structures cut {cut['cut']}/{cut['total']} ({100 * cut['fraction_cut']:.1f}%), "
          f"separation {results['separation']:.3f}")
    print(f"FLOPs {flops['before']:,} → {flops['after']:,} ({flops['ratio']:.3f}); "
          f"parameters {params['before']:,} → {params['after']:,} ({params['ratio']:.3f})")
    for key, export in results["exports"].items():
        print(f"{key}: {export['path']} ({export['size_bytes']:,} bytes, "
              f"max |difference| {export['max_difference']:.2g})")
    print(f"results: {path}", flush=True)
