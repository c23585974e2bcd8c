"""PSP rows: α with weight decay (channel, column, layer) or L1, at a FLOPs budget.

Every PSP run trains the ResNet from the same initialisation as the
baseline of its seed, wrapped with `keras_psp.wrap`, for the same epochs,
while `keras_psp.FlopsBudget(target)` adapts the α strength each epoch so
that the slimmed model ends near the target FLOPs fraction. The row's
figures are those of `keras_psp.slim(model)`: no fine-tuning.
"""

from __future__ import annotations

import math
import re
import warnings

import keras
import numpy as np

import keras_psp
from keras_psp.stats import relative_alpha

from .common import Config, Data, accuracy, build_resnet, compile_sgd, costs, fit

#: Row name → (structure, regularizer on α).
VARIANTS = {
    "psp_channel": ("channel", "l2"),
    "psp_column": ("column", "l2"),
    "psp_layer": ("layer", "l2"),
    "psp_l1": ("channel", "l1"),
}

_INNER = re.compile(r"s\d+b\d+[ab]_conv$")


def layer_selection(structure: str):
    """Which layers to wrap: all convs and the classifier, except for `layer`.

    A layer-wise α of the stem, a projection shortcut or the classifier sits
    on the only path from the input to the output (cutting it is an error),
    so with `structure="layer"` only the two convolutions inside each
    residual branch are wrapped: cutting either removes the branch.
    """
    if structure == "layer":
        return lambda layer: bool(_INNER.search(layer.name))
    return None


def train_psp(config: Config, data: Data, seed: int, variant: str, target: float) -> tuple:
    """Trains one PSP row; returns (row dict, wrapped model, slim model)."""
    structure, regularizer = VARIANTS[variant]
    base = build_resnet(config, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "layer": BN cancels the α (noted in RESULTS.md)
        model = keras_psp.wrap(base, structure=structure, layers=layer_selection(structure),
                               regularizer=regularizer, strength=config.strength)
    compile_sgd(model, config, data, config.lr, config.epochs)
    monitor = keras_psp.SeparationMonitor(verbose=0)
    budget = keras_psp.FlopsBudget(target=target, verbose=config.verbose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds = fit(model, config, data, config.epochs, seed, [monitor, budget])
    layers = keras_psp.cloning.psp_layers(model)
    full = keras_psp.count_flops(model)
    budget_fraction = _fraction(model, full)
    budget_accuracy, threshold = None, layers[0].threshold
    if not abs(budget_fraction - target) <= config.match_tolerance:
        if math.isfinite(budget_fraction):
            budget_accuracy = accuracy(keras_psp.slim(model), data)
        threshold = match_threshold(model, layers, target, full)
    small = keras_psp.slim(model, check_inputs=data.x_test[:64])
    small_costs = costs(small)
    pooled = np.concatenate([relative_alpha(layer.alpha, layer.structure) for layer in layers])
    masks = [layer.mask() for layer in layers]
    row = {
        "method": variant, "structure": structure, "regularizer": regularizer,
        "target": target, "seed": seed, "accuracy": accuracy(small, data),
        "train_seconds": seconds, **small_costs,
        "flops_fraction": small_costs["flops"] / full,
        "budget_flops_fraction": budget_fraction, "budget_accuracy": budget_accuracy,
        "cut_fraction": 1.0 - sum(int(m.sum()) for m in masks) / sum(m.size for m in masks),
        "separation": monitor.history[-1]["psp_separation"] if monitor.history else None,
        "strength": float(keras.ops.convert_to_numpy(layers[0].alpha_strength)),
        "flops_per_epoch": [h["psp_flops"] for h in budget.history],
        "warnings": sorted({str(w.message)[:200] for w in caught
                            if "FlopsBudget" in str(w.message)}),
        "relative_alpha": [float(v) for v in pooled],
        "threshold": threshold,  # the first layer's (FlopsBudget may lower it per layer)
        "thresholds": {layer.name: layer.threshold for layer in layers},
    }
    return row, model, small


def _fraction(model, full: int) -> float:
    """FLOPs of `slim(model)` over `full`; NaN if the model cannot be slimmed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras_psp.count_flops(keras_psp.slim(model)) / full
    except (ValueError, RuntimeError):  # e.g. every structure of an only-path layer cut
        return math.nan


def match_threshold(model, layers, target: float, full: int, steps: int = 14) -> float:
    """Sets every layer's threshold so that the slim FLOPs are closest to `target`.

    The fallback when `FlopsBudget` ended outside `match_tolerance`: a
    bisection on log10 of the relative threshold in [1e-4, 0.5] (the FLOPs
    fall as the threshold rises). The trained α are not touched.
    """
    def at(log_t: float) -> float:
        for layer in layers:
            layer.threshold = 10.0 ** log_t
        value = _fraction(model, full)
        return value if math.isfinite(value) else -1.0  # cut off: treat as too far

    low, high = math.log10(1e-4), math.log10(0.5)
    for end, beyond in ((high, lambda f: f >= target), (low, lambda f: f <= target)):
        if beyond(at(end)):  # the target lies outside the range: its nearest end
            return 10.0 ** end
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if at(mid) > target else (low, mid)
    best = min((low, high), key=lambda t: abs(at(t) - target))
    at(best)
    return 10.0 ** best
