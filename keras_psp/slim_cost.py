"""What slimming would give now: the shared core of the PSP callbacks."""

from __future__ import annotations

import math
import warnings

import numpy as np

from keras_psp.cloning import psp_layers
from keras_psp.flops import count_flops, invisible_share
from keras_psp.surgery.slim import slim


def require_psp_layers(model, who: str, graph: bool = False) -> list:
    """The built PSP layers of `model`; a clear error if there are none, if one
    is not built yet, or (`graph=True`: FLOPs are needed) if the model has no
    functional graph."""
    layers = psp_layers(model)
    if not layers:
        raise ValueError(f"{who}: model '{model.name}' has no PSP layers, nothing to watch; "
                         "wrap it first (`keras_psp.wrap(model)` or `keras_psp.PSP` layers).")
    unbuilt = [layer.name for layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(f"{who}: PSP layer(s) {', '.join(map(repr, unbuilt))} of model "
                         f"'{model.name}' are not built yet, so they have no α. Build the model "
                         "first: start it with keras.Input(shape=...), or call it on a batch.")
    if graph and not model.inputs:
        raise ValueError(f"{who}: model '{model.name}' has no defined inputs (a Sequential "
                         "without keras.Input), so the FLOPs of its slim model cannot be "
                         "counted. Start the model with keras.Input(shape=...)"
                         + (", or pass flops=False." if who == "SeparationMonitor" else "."))
    return layers


def warn_partial(model, who: str, key: str = "psp_flops") -> None:
    """Warns that `key` is a ratio over the visible part of `model` only, when
    `count_flops` cannot see all of it."""
    share = invisible_share(model)
    if share > 0:
        warnings.warn(
            f"{who}: {key} is a FLOPs ratio over the visible part of model '{model.name}' "
            f"only: {share:.1%} of its weights are in layers whose cost count_flops cannot "
            "see (the count_flops warning names them), so it is not the model's ratio. "
            "Register those layers with keras_psp.register_layer(..., macs=...) (README, "
            "'Extending keras_psp').", stacklevel=3)


def masks(layers, finite=None, previous=None) -> list[np.ndarray]:
    """Keep masks; a layer with non-finite α keeps its `previous` mask."""
    finite = finite or [True] * len(layers)
    return [np.ravel(layer.mask()) if ok else old
            for layer, ok, old in zip(layers, finite, previous or finite, strict=True)]


class SlimCost:
    """(FLOPs, parameters) of `slim(model)` over the unpruned model's; cached by masks."""

    def __init__(self, model, layers, who: str = "SeparationMonitor"):
        self.model, self.flops = model, count_flops(model)
        warn_partial(model, who)
        self.params = model.count_params() - sum(  # the stripped (plain) model
            layer.own_param_count() for layer in layers)
        self._key, self.value, self.error = None, (math.nan, math.nan), None

    def __call__(self, masks) -> tuple[float, float]:
        key = b"|".join(np.packbits(m).tobytes() for m in masks)
        if key != self._key:
            self._key, self.value, self.error = key, (math.nan, math.nan), None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small = slim(self.model)
                self.value = (count_flops(small) / max(self.flops, 1),
                              small.count_params() / max(self.params, 1))
            except Exception as error:  # non-finite α, a cut-off model: NaN
                self.error = error
        return self.value
