"""`prune_to`: a one-shot cut from the current α, to a FLOPs target.

Structures are ranked across the whole model by their α relative to their
own layer (`scores`): |α| over the root mean square of the layer's kept |α|,
so that layers whose α vectors differ in scale (a BatchNormalization lets
the penalty shrink a whole layer) compare on the pattern alone. The lowest
ones are cut, in that order, until the slimmed model's FLOPs reach the
target; the number cut is found by bisection on `count_flops(slim(model))`,
computed from surgery's channel plan without building any model.

A cut sets α to exactly 0 (and the optimizer's slots for it, so momentum
cannot bring it back): the structure is then cut whatever the threshold, its
gradient is 0, and nothing retraces.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_psp.cloning import check_graph_model, psp_layers
from keras_psp.flops import count_flops
from keras_psp.surgery.cost import slim_flops


def scores(layer) -> np.ndarray:
    """Importance of each structure of a PSP layer, comparable across layers.

    |α| over the root mean square of the layer's kept |α| (cut structures
    score 0); a layer-wise α (`structure="layer"`) scores its raw |α|, its
    initial value being 1.
    """
    alpha = np.abs(np.ravel(keras.ops.convert_to_numpy(layer.alpha)).astype("float64"))
    kept = np.ravel(layer.mask())
    alpha = np.where(kept, alpha, 0.0)
    if layer.structure == "layer" or not kept.any():
        return alpha
    rms = np.sqrt(np.mean(alpha[kept] ** 2))
    return alpha / rms if rms > 0 else alpha


@dataclasses.dataclass(frozen=True)
class Cut:
    """What `prune_to` did.

    Attributes:
        flops: FLOPs of the slimmed model over the unpruned model's, after the cut.
        before: The same fraction before the cut.
        target: The FLOPs fraction asked for.
        cut: Newly cut structures (flat indices into α) by PSP layer name.
        structures: Structures cut in all, this cut included.
        total: Structures in all.
    """

    flops: float
    before: float
    target: float
    cut: dict
    structures: int
    total: int

    @property
    def count(self) -> int:
        """Structures newly cut."""
        return int(sum(len(v) for v in self.cut.values()))

    def __str__(self) -> str:
        return (f"prune_to: cut {self.count} more structure(s) ({self.structures}/{self.total} "
                f"cut in all); FLOPs {self.before:.3f} -> {self.flops:.3f} of the unpruned model "
                f"(target {self.target:.3f})")


def zero_structures(layer, entries: np.ndarray, optimizer=None) -> None:
    """Sets α `entries` (flat indices) of a PSP layer, and their optimizer slots, to 0."""
    if len(entries) == 0:
        return
    targets = [layer.alpha]
    if optimizer is not None:
        prefix = layer.alpha.path.replace("/", "_") + "_"  # Keras names slots <path>_<slot>
        targets += [v for v in getattr(optimizer, "variables", [])
                    if v.name.startswith(prefix) and tuple(v.shape) == tuple(layer.alpha.shape)]
    for variable in targets:
        value = np.ravel(keras.ops.convert_to_numpy(variable)).copy()
        value[entries] = 0
        variable.assign(value.reshape(tuple(variable.shape)).astype(variable.dtype))


def _candidates(layers, min_keep: int):
    """α of the layers (flat), and the structures that may be cut, lowest score
    first: (α list, owning layer index, flat index into its α)."""
    alphas = [np.ravel(keras.ops.convert_to_numpy(layer.alpha)).astype("float32")
              for layer in layers]
    owner, index, order_key = [], [], []
    for i, layer in enumerate(layers):
        score = scores(layer)
        kept = np.flatnonzero(np.ravel(layer.mask()))
        ranked = kept[np.argsort(score[kept], kind="stable")]
        candidates = ranked[: max(len(ranked) - min_keep, 0)]
        owner += [i] * len(candidates)
        index += list(candidates)
        order_key += list(score[candidates])
    order = np.argsort(np.asarray(order_key), kind="stable")
    return alphas, np.asarray(owner, int)[order], np.asarray(index, int)[order]


def _fraction(model, layers, alphas, owner, index) -> int:
    """`slim_flops` with the given structures cut (nothing is assigned)."""
    trial = [a.copy() for a in alphas]
    for i, j in zip(owner, index, strict=True):
        trial[i][j] = 0.0
    values = {id(layer): a.reshape(tuple(layer.alpha.shape))
              for layer, a in zip(layers, trial, strict=True)}
    return slim_flops(model, values)


def reachable(model: keras.Model, min_keep: int = 1) -> float:
    """The smallest FLOPs fraction cutting can reach: every structure cut but
    `min_keep` per PSP layer (the rest of the FLOPs sits in layers PSP does not
    wrap, or that surgery keeps whole)."""
    layers = psp_layers(model)
    alphas, owner, index = _candidates(layers, min_keep)
    return _fraction(model, layers, alphas, owner, index) / max(count_flops(model), 1)


def prune_to(model: keras.Model, flops: float, min_keep: int = 1, optimizer=None,
             verbose: int = 0) -> Cut:
    """Cuts the lowest-ranked structures until the slim model has `flops` × the FLOPs.

    Structures already cut stay cut; others are ranked by `scores` (lowest
    first, ties broken by position) and cut in that order. The number cut is
    the smallest that brings `count_flops(slim(model))` to at most `flops`
    times `count_flops(model)`: the result lands at or just below the target,
    by at most the FLOPs of the last structure cut. Every layer keeps at
    least `min_keep` structures.

    Args:
        model: A model with PSP layers (not modified, except its α).
        flops: The FLOPs of the slim model over the unpruned model's, in (0, 1].
        min_keep: Structures each PSP layer keeps at least.
        optimizer: Its slots (momentum) for the cut α are zeroed too; None:
            `model.optimizer` when the model is compiled.
        verbose: 1 prints the `Cut`.

    Returns:
        A `Cut`: the FLOPs fraction reached and what was cut.

    Raises:
        ValueError: if the model has no PSP layers, or if `flops` cannot be
            reached by cutting (the message gives the smallest fraction that
            can).

    Example:

    ```python
    cut = keras_psp.prune_to(wrapped, flops=0.5)
    print(cut)                       # prune_to: cut 212 more structure(s) ...
    keras_psp.count_flops(keras_psp.slim(wrapped)) / keras_psp.count_flops(wrapped)  # ≈ 0.5
    ```
    """
    check_graph_model(model, "prune_to")
    if not (isinstance(flops, (int, float)) and 0 < flops <= 1):
        raise ValueError(f"prune_to: `flops` must be in (0, 1] (a fraction of the unpruned "
                         f"model's FLOPs), got {flops!r}.")
    if not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"prune_to: `min_keep` must be an integer >= 1, got {min_keep!r}.")
    layers = psp_layers(model)
    if not layers:
        raise ValueError(f"prune_to: model '{model.name}' has no PSP layers; wrap it first.")
    for layer in layers:
        layer.check_finite("rank structures")
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    total_flops = max(count_flops(model), 1)
    alphas, owner, index = _candidates(layers, min_keep)

    def fraction(k: int) -> float:
        return _fraction(model, layers, alphas, owner[:k], index[:k]) / total_flops

    before = fraction(0)
    low, high = 0, len(owner)
    if before > flops:
        smallest = fraction(high)
        if smallest > flops:
            raise ValueError(
                f"prune_to: cannot reach {flops:.3f} of the FLOPs of model '{model.name}': "
                f"cutting every structure but {min_keep} per PSP layer leaves {smallest:.3f}. "
                "The rest sits in layers PSP does not wrap or surgery keeps whole; wrap more "
                "layers, or aim higher."
            )
        while low < high:  # the smallest k with fraction(k) <= flops
            middle = (low + high) // 2
            if fraction(middle) <= flops:
                high = middle
            else:
                low = middle + 1
    else:
        high = 0
    newly: dict[int, list] = {}
    for i, j in zip(owner[:high], index[:high], strict=True):
        newly.setdefault(int(i), []).append(int(j))
    for i, layer in enumerate(layers):
        zero_structures(layer, np.asarray(newly.get(i, []), int), optimizer)
    cut_now = sum(int(np.size(layer.mask()) - np.sum(layer.mask())) for layer in layers)
    after = slim_flops(model) / total_flops if high else before
    result = Cut(flops=after, before=before, target=float(flops),
                 cut={layers[i].name: np.asarray(v) for i, v in newly.items()},
                 structures=cut_now,
                 total=int(sum(a.size for a in alphas)))
    if verbose:
        print(result, flush=True)
    return result
