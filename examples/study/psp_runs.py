"""PSP rows: pruning the trained baseline, or training with PSP from scratch.

Two tracks, each at the same training budget as the baselines it is compared
with:

- **from the trained model** (`trained_*`): the seed's trained baseline
  (N epochs) goes through `keras_psp.prune(target, epochs=k)`: wrapped, k
  epochs of fine-tuning while `FlopsBudget` cuts on its schedule, slimmed,
  BN statistics re-estimated. ℓ1-norm + FT and tfmot get the same trained
  model and the same k epochs.
- **from scratch** (`scratch_*`): PSP trains N + k epochs from the seed's
  initialisation, with `FlopsBudget(target, begin=0.1, end=0.6)`, then
  `slim` and `recalibrate`; BN-slimming trains N epochs and fine-tunes k.

Each variant is a penalty on α (the default scale-invariant "relative_l1",
the paper's "l2", or "l1") and a structure (`channel`, `column`, or `group`:
one α per coupled channel group, widths in multiples of 8).
"""

from __future__ import annotations

import time
import warnings

import keras

import keras_psp
from keras_psp.stats import relative_alpha

from .common import Config, Data, accuracy, build_resnet, compile_sgd, costs, fit

#: Row name → (track, structure, regularizer on α).
VARIANTS = {
    f"{track}_{penalty}_{structure}": (track, structure,
                                       "relative_l1" if penalty == "default" else penalty)
    for track in ("trained", "scratch")
    for penalty in ("default", "l2", "l1")
    for structure in ("channel", "column", "group")
}
#: Examples whose BN statistics the slim models are recalibrated on.
RECALIBRATION = 4096


class _Keep(keras.callbacks.Callback):
    """Keeps the model `fit` trains (the wrapped one inside `prune`) and the
    FLOPs fraction `FlopsBudget` logs each epoch (listed after it)."""

    def __init__(self):
        super().__init__()
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"psp_flops": (logs or {}).get("psp_flops")})

    def on_train_end(self, logs=None):
        self.trained = self.model


def _row(variant, target, seed, small, wrapped, monitor, budget, seconds, full) -> dict:
    track, structure, regularizer = VARIANTS[variant]
    layers = keras_psp.cloning.psp_layers(wrapped)
    masks = [layer.mask() for layer in layers]
    small_costs = costs(small)
    return {
        "method": variant, "track": track, "structure": structure, "regularizer": regularizer,
        "target": target, "seed": seed, "train_seconds": seconds, **small_costs,
        "flops_fraction": small_costs["flops"] / full,
        "cut_fraction": 1.0 - sum(int(m.sum()) for m in masks) / sum(m.size for m in masks),
        "separation": monitor.history[-1]["psp_separation"] if monitor.history else None,
        "flops_per_epoch": [h["psp_flops"] for h in budget.history] if budget else None,
        "relative_alpha": [float(v) for layer in layers
                           for v in relative_alpha(layer.alpha, layer.structure)],
    }


def prune_trained(config: Config, data: Data, trained: keras.Model, seed: int, variant: str,
                  target: float) -> tuple[dict, keras.Model]:
    """`keras_psp.prune` of the trained baseline for `finetune_epochs`; (row, slim model)."""
    _, structure, regularizer = VARIANTS[variant]
    monitor, keep = keras_psp.SeparationMonitor(verbose=0), _Keep()
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = keras_psp.prune(
            trained, data.x_train, data.y_train, target=target, epochs=config.finetune_epochs,
            structure=structure, regularizer=regularizer, batch_size=config.batch_size,
            learning_rate=config.finetune_lr, loss="sparse_categorical_crossentropy",
            metrics=["accuracy"], callbacks=[monitor, keep], verbose=config.verbose)
    seconds = time.perf_counter() - start
    row = _row(variant, target, seed, small, keep.trained, monitor, keep, seconds,
               keras_psp.count_flops(trained))
    row["accuracy"] = accuracy(small, data)
    return row, small


def train_scratch(config: Config, data: Data, seed: int, variant: str,
                  target: float) -> tuple[dict, keras.Model]:
    """PSP from the seed's initialisation for epochs + finetune_epochs; (row, slim model)."""
    _, structure, regularizer = VARIANTS[variant]
    base = build_resnet(config, seed)
    model = keras_psp.wrap(base, structure=structure, regularizer=regularizer)
    epochs = config.epochs + config.finetune_epochs
    compile_sgd(model, config, data, config.lr, epochs)
    monitor = keras_psp.SeparationMonitor(verbose=0)
    budget = keras_psp.FlopsBudget(target=target, begin=0.1, end=0.6,
                                   recalibrate=data.x_train[:RECALIBRATION],
                                   verbose=config.verbose)
    seconds = fit(model, config, data, epochs, seed, [monitor, budget])
    small = keras_psp.slim(model, check_inputs=data.x_test[:64])
    keras_psp.recalibrate(small, data.x_train[:RECALIBRATION])
    row = _row(variant, target, seed, small, model, monitor, budget, seconds,
               keras_psp.count_flops(base))
    row["accuracy"] = accuracy(small, data)
    return row, small


def run(config: Config, data: Data, trained: keras.Model, seed: int, variant: str,
        target: float) -> tuple[dict, keras.Model]:
    """One PSP row of either track."""
    if VARIANTS[variant][0] == "trained":
        return prune_trained(config, data, trained, seed, variant, target)
    return train_scratch(config, data, seed, variant, target)

