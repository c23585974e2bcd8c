"""`prune_to`: a one-shot cut from the current α, to a FLOPs or latency target.

Structures are scored by the norm of their effective weights (α times the
kernel entries it scales) relative to their own layer (`scores`), so that
layers whose α vectors differ in scale (a BatchNormalization lets the
penalty shrink a whole layer) compare on the pattern alone. The lowest ones
are cut, spread over the layers as `allocation` says, until the slimmed
model's FLOPs reach the target; the number cut is found by bisection on
`count_flops(slim(model))`, computed from surgery's channel plan without
building any model. A latency target does the same on the time a
`keras_psp.latency.LatencyProfile` predicts from the same plan.

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
from keras_psp.graph import counted_at
from keras_psp.surgery.cost import slim_flops


def scores(layer) -> np.ndarray:
    """Importance of each structure of a PSP layer, comparable across layers.

    The norm of the structure's effective weights, |α| × ‖W‖ (α as the layer
    computes with it, W the kernel entries it scales), over the root mean
    square of the layer's kept scores; cut structures score 0. With α trained
    under a penalty it is α that decides; on a freshly wrapped trained model
    (every α 1) it is the weights' ℓ2 norm, the classic criterion. A
    layer-wise α (`structure="layer"`) scores its raw |α|, its initial value
    being 1.
    """
    kept = np.ravel(layer.mask())
    alpha = np.abs(np.ravel(keras.ops.convert_to_numpy(layer.effective_alpha())))
    if layer.structure == "layer":
        return np.where(kept, np.abs(np.ravel(keras.ops.convert_to_numpy(layer.alpha))), 0.0)
    norms = np.ravel(layer.norms())
    value = np.where(kept, alpha.astype("float64") * norms, 0.0)
    if not kept.any():
        return value
    rms = np.sqrt(np.mean(value[kept] ** 2))
    return value / rms if rms > 0 else value


#: How `prune_to` spreads a cut over the layers.
ALLOCATIONS = ("uniform", "global")


@dataclasses.dataclass(frozen=True)
class Cut:
    """What `prune_to` did.

    Attributes:
        flops: FLOPs of the slimmed model over the unpruned model's, after the cut.
        before: The fraction aimed at (FLOPs, or predicted latency) before the cut.
        target: The fraction asked for.
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
    latency: float | None = None
    metric: str = "flops"

    @property
    def count(self) -> int:
        """Structures newly cut."""
        return int(sum(len(v) for v in self.cut.values()))

    @property
    def reached(self) -> float:
        """The fraction aimed at, after the cut: `flops`, or the predicted `latency`."""
        return self.latency if self.metric == "latency" else self.flops

    def __str__(self) -> str:
        what = "predicted latency" if self.metric == "latency" else "FLOPs"
        extra = f"; FLOPs {self.flops:.3f}" if self.metric == "latency" else ""
        return (f"prune_to: cut {self.count} more structure(s) ({self.structures}/{self.total} "
                f"cut in all); {what} {self.before:.3f} -> {self.reached:.3f} of the unpruned "
                f"model (target {self.target:.3f}){extra}")


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


def _candidates(layers, min_keep: int, allocation: str = "uniform",
                multiple_of: int | None = None):
    """α of the layers (flat), and the blocks of structures that may be cut,
    in cutting order: (α list, owning layer index per block, blocks of flat
    indices into its α).

    "global" orders all structures by `scores`; "uniform" takes each layer's
    structures lowest score first, interleaved so that every layer has lost
    about the same fraction of its structures at any point of the order.
    `multiple_of` (None: each layer's or group's own, `PSP.multiple_of`)
    of 1 makes every block one structure; with more, a layer's
    first block brings its kept count down to a multiple and the next ones
    take `multiple_of` structures each, so that any prefix of the order
    leaves every layer a multiple of `multiple_of` structures (at least
    `multiple_of`, and at least `min_keep`).
    """
    alphas = [np.ravel(keras.ops.convert_to_numpy(layer.alpha)).astype("float32")
              for layer in layers]
    owner, blocks, order_key = [], [], []
    for i, layer in enumerate(layers):
        aligned = multiple_of if multiple_of is not None else getattr(layer, "multiple_of", None)
        step = aligned or 1
        score = scores(layer)
        kept = np.flatnonzero(np.ravel(layer.mask()))
        ranked = kept[np.argsort(score[kept], kind="stable")]
        floor = -(-max(min_keep, step) // step) * step
        if len(ranked) < floor:
            continue  # too few kept to lose any block and stay aligned
        candidates = ranked[: max(len(ranked) - floor, 0)]
        sizes = [len(ranked) % step] if len(ranked) % step else []
        sizes += [step] * ((len(candidates) - sum(sizes)) // step)
        at, done = 0, score.size - len(ranked)
        for size in sizes:
            block = candidates[at:at + size]
            at += size
            owner.append(i)
            blocks.append(block)
            if allocation == "global":
                order_key.append(float(np.max(score[block])))
            else:  # the fraction of the layer cut once this block goes (cut ones counted)
                order_key.append((done + at) / score.size)
    order = np.argsort(np.asarray(order_key), kind="stable")
    return alphas, np.asarray(owner, int)[order], [blocks[k] for k in order]


def _trial(layers, alphas, owner, blocks) -> dict:
    """α values with the given blocks of structures cut, by `id` of the α variable."""
    trial = [a.copy() for a in alphas]
    for i, block in zip(owner, blocks, strict=True):
        trial[i][block] = 0.0
    return {id(layer.alpha): a.reshape(tuple(layer.alpha.shape))
            for layer, a in zip(layers, trial, strict=True)}


def _fraction(model, layers, alphas, owner, blocks) -> int:
    """`slim_flops` with the given blocks of structures cut (nothing is assigned)."""
    return slim_flops(model, _trial(layers, alphas, owner, blocks))


class _Cost:
    """The fraction `prune_to` aims at, of a trial cut: FLOPs, or predicted latency."""

    def __init__(self, model, layers, alphas, profile=None):
        self.model, self.layers, self.alphas, self.profile = model, layers, alphas, profile
        self.metric = "flops" if profile is None else "latency"
        self.total = max(count_flops(model), 1)

    def __call__(self, owner, blocks) -> float:
        if self.profile is None:
            return _fraction(self.model, self.layers, self.alphas, owner, blocks) / self.total
        values = _trial(self.layers, self.alphas, owner, blocks)
        return self.profile.predict(self.model, values) / self.profile.dense_ms


def _per_ms(cost: _Cost, owner, blocks):
    """Reorders candidate blocks for a latency target: each key (its place in
    the order) over what a structure of its layer saves (ms, relative to the
    median layer), so that cuts go first where they buy the most time."""
    first = {}
    for i, block in zip(owner, blocks, strict=True):
        first.setdefault(int(i), block)
    base = cost([], [])
    saving = {i: max(base - cost([i], [block]), 1e-9) / len(block) for i, block in first.items()}
    median = float(np.median(list(saving.values())))
    keys = [(position + 1) / len(blocks) * median / saving[int(i)]
            for position, i in enumerate(owner)]
    order = np.argsort(np.asarray(keys), kind="stable")
    return np.asarray(owner)[order], [blocks[k] for k in order]


def _layerwise_note(layers) -> str:
    """Why layer-wise α do not help reach a target, when there are any."""
    names = [layer.name for layer in layers if layer.structure == "layer"]
    if not names:
        return ""
    return (f" Layer-wise α ({', '.join(repr(n) for n in names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) are never cut by a budget: each keeps its "
            "`min_keep` structure; use channel, filter or column structures there.")


#: How far below a latency target `prune_to` may land before it tries a closer cut.
LANDING = 0.02

#: Candidate blocks `_land` tries, at most.
_LANDING_TRIES = 64


def _land(cost, owner, blocks, high: int, target: float) -> list[int]:
    """Positions to cut when the first `high` blocks overshoot the target by
    more than `LANDING` (one block of a wide group can remove much): the
    first `high - 1` blocks, then, in order, every later block that does not
    take the fraction more than `LANDING` below `target` (a layer or group
    whose block is passed over cuts nothing more, so none skips its lower
    scores), until the target is met; the first `high` when that fails."""
    chosen, passed = list(range(high - 1)), set()
    for tried, k in enumerate(range(high - 1, len(owner))):
        if tried >= _LANDING_TRIES:
            break
        unit = int(owner[k])
        if unit in passed:
            continue
        trial = chosen + [k]
        value = cost([owner[j] for j in trial], [blocks[j] for j in trial])
        if value < target - LANDING:
            passed.add(unit)  # too large a step
            continue
        chosen = trial
        if value <= target:
            return chosen
    return list(range(high))


def reachable(model: keras.Model, min_keep: int = 1, multiple_of: int | None = None,
              profile=None) -> float:
    """The smallest FLOPs fraction cutting can reach (with `profile`, a
    `keras_psp.latency.LatencyProfile`: the smallest predicted latency
    fraction): every structure cut but `min_keep` per PSP layer or group (the
    rest sits in layers PSP does not wrap, or that surgery keeps whole)."""
    layers = psp_layers(model)
    alphas, owner, blocks = _candidates(layers, min_keep, multiple_of=multiple_of)
    return _Cost(model, layers, alphas, profile)(owner, blocks)


def _check_target(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"prune_to: `{name}` must be in (0, 1] (a fraction of the unpruned "
                         f"model's {'FLOPs' if name == 'flops' else 'latency'}), got {value!r}.")


def prune_to(model: keras.Model, flops: float | None = None, allocation: str = "uniform",
             min_keep: int = 1, optimizer=None, verbose: int = 0,
             multiple_of: int | None = None, latency: float | None = None,
             profile=None, input_shape=None) -> Cut:
    """Cuts the lowest-ranked structures until the slim model meets a FLOPs or latency target.

    Structures already cut stay cut; the others are ranked by `scores` and
    cut in order (`allocation`; ties broken by position). The number cut is
    the smallest that brings `count_flops(slim(model))` to at most `flops`
    times `count_flops(model)`: the result lands at or just below the target,
    by at most the FLOPs of the last structure cut. Every layer keeps at
    least `min_keep` structures, so a layer-wise α (`structure="layer"`, one
    structure) is never cut here: cut those by their threshold.

    With `latency` (and a `profile` from `keras_psp.latency.profile`), the
    target is the slim model's predicted time over the unpruned model's on
    the profiled runtime, and the order weighs each structure's score by the
    time cutting it saves: cuts go first where α is small per millisecond.
    One block of a wide group can remove much of the time at once; when the
    next block in order would land more than `LANDING` (0.02) below the
    target, later blocks (each the next one of its layer or group) that land
    closer are cut instead.

    Args:
        model: A model with PSP layers (not modified, except its α).
        flops: The FLOPs of the slim model over the unpruned model's, in (0, 1].
        allocation: "uniform": every layer loses about the same fraction of
            its structures, each its lowest-scored ones (measured best when
            pruning a trained model in a few epochs; README, "How pruning
            decides"); "global": the lowest scores of the whole model go
            first, so layers lose what their α say they can.
        min_keep: Structures each PSP layer keeps at least.
        optimizer: Its slots (momentum) for the cut α are zeroed too; None:
            `model.optimizer` when the model is compiled.
        verbose: 1 prints the `Cut`.
        multiple_of: Cut in blocks so that every PSP layer and channel group
            keeps a multiple of this many structures (at least one block):
            with `structure="group"`, the slim model's widths are then
            multiples of it, which vectorized CPU kernels run much faster.
            None: each layer's or group's own `multiple_of` (8 for groups,
            none for PSP layers, unless `wrap` was told otherwise); 1: any
            count.
        latency: Instead of `flops`: the predicted latency of the slim model
            over the unpruned model's, in (0, 1]; needs `profile`.
        profile: A `keras_psp.latency.LatencyProfile` of this model.
        input_shape: For a model whose inputs have sizes left open (token
            sequences): the size of one example to count FLOPs at, as
            `keras_psp.count_flops` takes it.

    Returns:
        A `Cut`: the fraction reached and what was cut.

    Raises:
        ValueError: if the model has no PSP layers, if not exactly one of
            `flops` and `latency` is given, or if the target cannot be
            reached by cutting (the message gives the smallest fraction that
            can).

    Example:

    ```python
    cut = keras_psp.prune_to(wrapped, flops=0.5)
    print(cut)                       # prune_to: cut 212 more structure(s) ...
    keras_psp.count_flops(keras_psp.slim(wrapped)) / keras_psp.count_flops(wrapped)  # ≈ 0.5

    table = keras_psp.latency.profile(wrapped, runtime="litert")
    keras_psp.prune_to(wrapped, latency=0.6, profile=table)
    ```
    """
    with counted_at(input_shape):
        return _prune_to(model, flops, allocation, min_keep, optimizer, verbose, multiple_of,
                         latency, profile)


def _prune_to(model, flops, allocation, min_keep, optimizer, verbose, multiple_of, latency,
              profile) -> Cut:
    check_graph_model(model, "prune_to")
    if (flops is None) == (latency is None):
        raise ValueError("prune_to: give exactly one target, `flops` or `latency` (fractions "
                         f"of the unpruned model's), got flops={flops!r}, latency={latency!r}.")
    _check_target("flops" if latency is None else "latency",
                  flops if latency is None else latency)
    if latency is not None and not hasattr(profile, "predict"):
        raise ValueError("prune_to: a `latency` target needs `profile=`, a LatencyProfile "
                         "from keras_psp.latency.profile(model); got "
                         f"profile={profile!r}.")
    if latency is None and profile is not None:
        raise ValueError("prune_to: `profile` is for a `latency` target; with `flops`, leave "
                         "it out.")
    target = float(flops if latency is None else latency)
    if not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"prune_to: `min_keep` must be an integer >= 1, got {min_keep!r}.")
    if multiple_of is not None and (isinstance(multiple_of, bool) or not isinstance(
            multiple_of, int) or multiple_of < 1):
        raise ValueError(f"prune_to: `multiple_of` must be a positive integer or None, got "
                         f"{multiple_of!r}.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"prune_to: `allocation` must be one of {ALLOCATIONS}, got "
                         f"{allocation!r}.")
    layers = psp_layers(model)
    if not layers:
        raise ValueError(f"prune_to: model '{model.name}' has no PSP layers; wrap it first.")
    for layer in layers:
        layer.check_finite("rank structures")
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    alphas, owner, blocks = _candidates(layers, min_keep, allocation, multiple_of)
    cost = _Cost(model, layers, alphas, profile)
    if latency is not None and len(owner):
        owner, blocks = _per_ms(cost, owner, blocks)

    def fraction(k: int) -> float:
        return cost(owner[:k], blocks[:k])

    before = fraction(0)
    low, high = 0, len(owner)
    if before > target:
        smallest = fraction(high)
        if smallest > target:
            what = "FLOPs" if latency is None else "predicted latency"
            raise ValueError(
                f"prune_to: cannot reach {target:.3f} of the {what} of model '{model.name}': "
                f"cutting every structure but {min_keep} per PSP layer leaves {smallest:.3f}. "
                "The rest sits in layers PSP does not wrap or surgery keeps whole; wrap more "
                "layers, or aim higher." + _layerwise_note(layers)
            )
        while low < high:  # the smallest k with fraction(k) <= target
            middle = (low + high) // 2
            if fraction(middle) <= target:
                high = middle
            else:
                low = middle + 1
    else:
        high = 0
    chosen = list(range(high))
    if latency is not None and high and fraction(high) < target - LANDING:
        chosen = _land(cost, owner, blocks, high, target)
    newly: dict[int, list] = {}
    for k in chosen:
        newly.setdefault(int(owner[k]), []).extend(int(j) for j in blocks[k])
    for i, layer in enumerate(layers):
        zero_structures(layer, np.asarray(newly.get(i, []), int), optimizer)
    cut_now = sum(int(np.size(layer.mask()) - np.sum(layer.mask())) for layer in layers)
    after_flops = slim_flops(model) / cost.total
    after = after_flops if latency is None else (
        cost([owner[k] for k in chosen], [blocks[k] for k in chosen]) if chosen else before)
    result = Cut(flops=after_flops, before=before, target=target,
                 cut={layers[i].name: np.asarray(v) for i, v in newly.items()},
                 structures=cut_now,
                 total=int(sum(a.size for a in alphas)),
                 latency=None if latency is None else after,
                 metric="flops" if latency is None else "latency")
    if verbose:
        print(result, flush=True)
    return result
