"""`structure="group"`: one α per coupled channel group, shared by all its readers.

Channels that surgery can only remove together (a residual stream's channel
in every block, a DenseNet layer's output in every concatenation that
carries it, a depthwise convolution's input and outputs, a convolution's
output feeding a `Flatten` → `Dense`) form one *group*. `wrap(model,
structure="group")` gives each group one vector of α, one entry per channel,
held by a single `ChannelGroups` layer that the model calls right before
every layer that reads the group (every `Conv`, `Dense`, `SeparableConv` or
`ConvTranspose` whose kernel contracts over those channels): `reader(x * α)`
is `reader` with its kernel's input channels scaled by α, so a group's α
scales all its readers at once, its gradient sums over them, and BN cannot
cancel it (the scale sits after every normalization). One shared layer,
called once per reader, keeps the tying through `.keras` files and
`clone_model`, natively.

A channel whose α is cut is read by nobody, so `slim` removes it from every
producer and consumer together: no gather, and no channel kept for another
reader. Channels surgery must keep (model inputs and outputs, layers it does
not know) get no α.

`group_views(model)` gives one `Group` per group: an object with the same
attributes as a `PSP` layer (`alpha`, `mask()`, `effective_alpha()`,
`set_strength`, `threshold`...), so that ranking, `prune_to`, `FlopsBudget`,
`SeparationMonitor`, `summary` and `plot_alphas` treat groups and PSP layers
alike.
"""

from __future__ import annotations

import functools
import warnings

import keras
import numpy as np
from keras import ops

from keras_psp.copying import copy_layer, copy_state, read_values
from keras_psp.graph import flatten, rebuild, width
from keras_psp.layers import Passthrough, handler_of, register_layer
from keras_psp.penalties import (
    DEFAULT_PENALTY,
    VariableStrength,
    get_penalty,
    is_relative,
    strength_attribute,
)
from keras_psp.surgery.coupling import couple, live_ops
from keras_psp.surgery.rules import rule_for
from keras_psp.wrapper import DEFAULT_THRESHOLD, PSP, check_multiple_of, effective_alpha, keep_mask

#: Default `multiple_of` of group α: kept widths that are multiples of 8 ran
#: ResNet-56 at 0.48x FLOPs 1.54x (XLA) and 1.58x (LiteRT) faster than unpruned;
#: the same cut at any width ran 0.99x and 1.31x (benchmarks/slim_speed.py).
DEFAULT_MULTIPLE_OF = 8

#: The structure name `wrap` takes for group α.
GROUP = "group"


def encode(index: np.ndarray) -> str:
    """Writes an index `(n, 2)` of (group, position) pairs as compact runs.

    Each run `group:start:count:step` covers `count` consecutive channels of
    the reader's input; group -1 marks channels that are not scaled. The
    string is a call argument of `ChannelGroups`, so it is saved with the
    model's graph.
    """
    runs, i, n = [], 0, len(index)
    while i < n:
        group, start = int(index[i, 0]), int(index[i, 1])
        step = int(index[i + 1, 1]) - start if i + 1 < n and index[i + 1, 0] == group else 1
        if group < 0:
            step = 0
        j = i + 1
        while j < n and index[j, 0] == group and int(index[j, 1]) - int(index[j - 1, 1]) == step:
            j += 1
        runs.append(f"{group}:{start}:{j - i}:{step}")
        i = j
    return ",".join(runs)


@functools.lru_cache(maxsize=4096)
def decode(text: str) -> np.ndarray:
    """The `(n, 2)` int index that `encode` wrote as `text`."""
    parts = []
    for run in text.split(","):
        group, start, count, step = (int(v) for v in run.split(":"))
        positions = start + step * np.arange(count)
        parts.append(np.stack([np.full(count, group), positions], axis=1))
    out = np.concatenate(parts).astype("int64")
    out.setflags(write=False)
    return out


@keras.saving.register_keras_serializable(package="keras_psp")
class ChannelGroups(keras.layers.Layer):
    """The α of every channel group of a model, applied before each reader.

    Called as `groups(x, index=...)` right before a layer that reads
    channel groups: returns `x` with its last-axis channels multiplied by
    their group's effective α (1 for channels of no group). The model calls
    this one layer once per reader, so each group's α is shared. `wrap(model,
    structure="group")` builds it; build it by hand only to extend that.

    Each group's α works as a `PSP` layer's does: cut below `threshold`
    times the group's largest |α|, and with `"relative_l1"` computed
    relative to the RMS of the group's kept α.

    Args:
        widths: Channels of each group.
        names: A name for each group (the layer that produces it).
        threshold: Relative pruning threshold (as in `PSP`).
        regularizer: The penalty on α, as in `PSP` ("relative_l1", "l2",
            "l1", a Keras regularizer or None).
        strength: Strength of a named penalty; None: its default.
        multiple_of: Every group keeps a multiple of this many channels (or
            all of them; see `keras_psp.keep_mask`), and `prune_to` /
            `FlopsBudget` cut in blocks of it, so the slim model's widths
            are multiples of it. Defaults to 8 (`DEFAULT_MULTIPLE_OF`); None:
            any width.
        **kwargs: Base layer arguments (`name`...).

    Example:

    ```python
    wrapped = keras_psp.wrap(model, structure="group")
    groups = keras_psp.groups.group_views(wrapped)
    [(g.name, g.alpha.shape) for g in groups]   # one α vector per group
    ```
    """

    def __init__(self, widths, names, threshold: float = DEFAULT_THRESHOLD,
                 regularizer=DEFAULT_PENALTY, strength: float | None = None,
                 multiple_of: int | None = DEFAULT_MULTIPLE_OF, **kwargs):
        super().__init__(**kwargs)
        check_multiple_of(multiple_of, f"ChannelGroups '{self.name}'")
        self.multiple_of = multiple_of
        self.widths = [int(w) for w in widths]
        self.group_names = [str(n) for n in names]
        if len(self.widths) != len(self.group_names) or min(self.widths, default=1) < 1:
            raise ValueError(f"ChannelGroups '{self.name}': `widths` and `names` must have one "
                             f"positive entry per group, got {widths!r} and {names!r}.")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold} for layer "
                             f"'{self.name}'.")
        self.threshold = float(threshold)
        self.alpha_regularizer = get_penalty(regularizer, strength)
        self.alpha_strength = None
        self.alphas = []
        self.supports_masking = True

    def build(self, input_shape=None):
        named = strength_attribute(self.alpha_regularizer)
        if named:
            self.alpha_strength = self.add_weight(
                name="alpha_strength", shape=(),
                initializer=keras.initializers.Constant(getattr(self.alpha_regularizer, named)),
                trainable=False, dtype="float32", autocast=False)
        alphas = []
        for i, size in enumerate(self.widths):
            alpha = self.add_weight(name=f"alpha_{i}", shape=(size,), initializer="ones",
                                    dtype="float32", autocast=False,
                                    regularizer=None if named else self.alpha_regularizer)
            if named:
                alpha.regularizer = VariableStrength(
                    self.alpha_regularizer, self.alpha_strength,
                    functools.partial(self.effective_alpha, i) if self.relative else None)
            alphas.append(alpha)
        self.alphas = alphas
        self.built = True

    @property
    def relative(self) -> bool:
        """Whether groups compute with α relative to their RMS ("relative_l1")."""
        return is_relative(self.alpha_regularizer)

    def effective_alpha(self, group: int, alpha=None, numpy: bool = False):
        """The scales group `group` computes with: α, cut channels 0, relative
        to the RMS of its kept α with "relative_l1" (a float32 tensor).

        Args:
            group: The group's index.
            alpha: Values to use instead of the group's α (a candidate cut).
            numpy: Compute in numpy and return a numpy array (offline work).
        """
        return effective_alpha(self.alphas[group] if alpha is None else alpha, self.threshold,
                               GROUP, self.multiple_of, self.relative, numpy)

    def scales(self, index: str, alphas: dict | None = None):
        """The per-channel scale of a reader's input (a float32 tensor).

        Args:
            index: The reader's `encode`d index.
            alphas: Candidate α by group index, for groups to fold with other
                values than their own.
        """
        used, flat = _gather_index(decode(index), self.widths)
        parts = [ops.ones((1,), "float32")] + [
            self.effective_alpha(g, (alphas or {}).get(g)) for g in used]
        return ops.take(ops.concatenate(parts), flat)

    def call(self, inputs, index: str = ""):
        if not index:
            raise ValueError(f"ChannelGroups '{self.name}' needs the `index` of the reader it "
                             "scales; it is called by models that `wrap(structure='group')` "
                             "built.")
        scale = self.scales(index)
        return inputs * ops.cast(scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def set_strength(self, strength: float) -> None:
        """Sets the penalty strength of every group (as `PSP.set_strength`)."""
        named = strength_attribute(self.alpha_regularizer)
        if named is None:
            raise ValueError(f"ChannelGroups '{self.name}' has no named penalty; wrap with "
                             "regularizer='l2', 'l1' or 'relative_l1' to set its strength.")
        if not float(strength) >= 0:
            raise ValueError(f"`strength` must be >= 0, got {strength} for layer '{self.name}'.")
        setattr(self.alpha_regularizer, named, float(strength))
        if self.alpha_strength is not None:
            self.alpha_strength.assign(float(strength))

    def save_own_variables(self, store):
        for alpha, name in zip(self.alphas, self.group_names, strict=True):
            if not np.all(np.isfinite(ops.convert_to_numpy(alpha))):
                raise ValueError(f"Cannot save the model: group '{name}' of layer "
                                 f"'{self.name}' has non-finite α; training has diverged.")
        super().save_own_variables(store)

    def get_config(self):
        if self.alpha_strength is not None:
            value = float(ops.convert_to_numpy(self.alpha_strength))
            setattr(self.alpha_regularizer, strength_attribute(self.alpha_regularizer), value)
        config = super().get_config()
        config.update({
            "widths": list(self.widths),
            "names": list(self.group_names),
            "threshold": self.threshold,
            "multiple_of": self.multiple_of,
            "regularizer": keras.regularizers.serialize(self.alpha_regularizer)
            if self.alpha_regularizer is not None else None,
        })
        return config


# Per channel: surgery slices it like BN; `unwrap` folds it into its reader; no MACs.
register_layer(ChannelGroups, rule=Passthrough())


def _gather_index(table: np.ndarray, widths) -> tuple[list[int], np.ndarray]:
    """The groups a reader's `table` uses, and where each of its channels sits
    in `[1] + concatenate(α of those groups)` (0: the constant 1)."""
    used = sorted({int(g) for g in table[:, 0] if g >= 0})
    base = np.zeros(max(used, default=0) + 1, "int64")
    at = 1
    for g in used:
        base[g] = at
        at += widths[g]
    groups = table[:, 0]
    flat = np.where(groups < 0, 0, base[np.maximum(groups, 0)] + table[:, 1])
    return used, flat.astype("int32")


class Group:
    """One channel group of a `ChannelGroups` layer, seen as a PSP layer is.

    Attributes:
        layer: The `ChannelGroups` layer.
        index: The group's index in it.
        structure: Always "group".
    """

    structure = GROUP

    def __init__(self, layer: ChannelGroups, index: int, model: keras.Model, sites=None):
        self.layer, self.index, self._model = layer, index, model
        self._sites = sites or _Sites(model, layer)

    @property
    def name(self) -> str:
        return self.layer.group_names[self.index]

    @property
    def built(self) -> bool:
        return self.layer.built

    @property
    def alpha(self):
        return self.layer.alphas[self.index]

    @property
    def alpha_strength(self):
        return self.layer.alpha_strength

    @property
    def alpha_regularizer(self):
        return self.layer.alpha_regularizer

    @property
    def relative(self) -> bool:
        return self.layer.relative

    @property
    def threshold(self) -> float:
        return self.layer.threshold

    @property
    def multiple_of(self) -> int | None:
        return self.layer.multiple_of

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.layer.threshold = float(value)

    def set_strength(self, strength: float) -> None:
        self.layer.set_strength(strength)

    def effective_alpha(self, alpha=None, numpy: bool = False):
        return self.layer.effective_alpha(self.index, alpha, numpy)

    def mask(self) -> np.ndarray:
        """Numpy bool array, True where a channel of the group is kept."""
        alpha = np.asarray(ops.convert_to_numpy(self.alpha))
        return keep_mask(alpha, self.threshold, GROUP, self.multiple_of)

    def own_param_count(self) -> int:
        """α entries (and, for the first group, the shared strength)."""
        extra = 1 if self.index == 0 and self.alpha_strength is not None else 0
        return self.layer.widths[self.index] + extra

    def check_finite(self, action: str) -> None:
        alpha = ops.convert_to_numpy(self.alpha)
        if not np.all(np.isfinite(alpha)):
            raise ValueError(
                f"Cannot {action}: channel group '{self.name}' (layer '{self.layer.name}') has "
                f"{int(np.size(alpha) - np.isfinite(alpha).sum())} non-finite α value(s); "
                "training has diverged. Restore an earlier checkpoint and train with a lower "
                "learning rate or α strength.")

    def readers(self) -> list[str]:
        """Names of the layers that read this group."""
        return [op.layer.name for op, index in self._sites()
                if np.any(decode(index)[:, 0] == self.index)]

    def norms(self) -> np.ndarray:
        """ℓ2 norm of every channel's weights over all the group's readers."""
        total = np.zeros(self.layer.widths[self.index])
        seen = set()
        for op, index in self._sites():
            table = decode(index)
            mine = table[:, 0] == self.index
            if not mine.any() or id(op.layer) in seen:
                continue
            seen.add(id(op.layer))
            plan = handler_of(op.layer).plan(op.layer, "channel")
            kernel = np.asarray(ops.convert_to_numpy(getattr(op.layer, plan.kernel)), "float64")
            rows = np.ravel(plan.reduce(kernel**2))
            np.add.at(total, table[mine, 1], rows[mine])
        return np.sqrt(total)

    def __repr__(self) -> str:
        return f"<Group '{self.name}' of {self.layer.widths[self.index]} channels>"


def group_layers(model) -> list[ChannelGroups]:
    """The `ChannelGroups` layers of `model` (nested models included)."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, ChannelGroups) and all(layer is not f for f in found):
            found.append(layer)
    return found


def group_views(model) -> list[Group]:
    """One `Group` per channel group of `model`, in the order of their layer."""
    views = []
    for layer in group_layers(model):
        sites = _Sites(model, layer)
        views += [Group(layer, i, model, sites) for i in range(len(layer.widths))]
    return views


class _Sites:
    """`reader_sites` of one layer, found once for all its groups' views."""

    def __init__(self, model, layer):
        self.model, self.layer, self._value = model, layer, None

    def __call__(self) -> list[tuple]:
        if self._value is None:
            self._value = reader_sites(self.model, self.layer)
        return self._value


def reader_sites(model, layer: ChannelGroups) -> list[tuple]:
    """(reader op, index) for every call of `layer` in `model`'s flat graph."""
    graph = flatten(model)
    readers = graph.consumers()
    sites = []
    for op in graph.ops:
        if op.layer is layer:
            index = op.node.arguments.kwargs.get("index", "")
            for reader in readers.get(op.outputs[0], []):
                sites.append((reader, index))
    return sites


# -- wrap(structure="group") ----------------------------------------------------


def find_groups(graph) -> tuple[list, dict, list[str]]:
    """The channel groups of a flat graph that surgery could remove.

    Returns:
        `(groups, sites, barriers)`: `groups` lists `(name, width)`; `sites`
        maps `id` of every reader op to its `(n, 2)` index of (group,
        position) per input channel (-1: no group); `barriers` names the
        layers that keep channels for a reason the user should know.
    """
    shapes = graph.shapes
    rules, barriers = [], []
    for op in graph.ops:
        rule, why = rule_for(op, shapes)
        rules.append(rule)
        if why is not None and op.layer.name not in barriers:
            barriers.append(f"'{op.layer.name}' ({why})")
    rule_of = {id(op): rule for op, rule in zip(graph.ops, rules, strict=True)}
    live = live_ops(graph, {})
    ops = [(op, rule_of[id(op)]) for op in graph.ops if id(op) in live]
    coupling = couple(graph, ops, rule_of, {}, graph.shared())
    labels = coupling.labels
    count = int(labels.max(initial=-1)) + 1
    blocked = np.zeros(count, bool)
    blocked[labels[coupling.required]] = True
    readers = [op for op, rule in ops if rule.boundary and width(shapes[op.inputs[0]])]
    read = np.zeros(count, bool)
    for op in readers:
        read[labels[coupling.span(op.inputs[0])]] = True
    producers = {}  # a boundary op whose output carries the component: it can drop it
    for op, rule in ops:
        if rule.boundary:
            for c in np.unique(labels[coupling.span(op.outputs[0])]):
                producers.setdefault(int(c), op.layer.name)
    eligible = read & ~blocked
    eligible[[c for c in np.flatnonzero(eligible) if int(c) not in producers]] = False
    # components touching the same tensors are parallel channels of one group
    signature: dict[int, list] = {}
    first: dict[int, tuple] = {}
    for key in coupling.keys:
        where = labels[coupling.span(key)]
        for position, c in enumerate(where):
            c = int(c)
            if eligible[c]:
                signature.setdefault(c, []).append(key)
                first.setdefault(c, (key, position))
    by_signature: dict[tuple, list[int]] = {}
    for c in sorted(signature, key=lambda c: first[c]):
        by_signature.setdefault(tuple(signature[c]), []).append(c)
    groups, where_is, names = [], {}, set()
    for members in by_signature.values():
        name = f"{producers[members[0]]}_group"
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        for position, c in enumerate(members):
            where_is[c] = (len(groups), position)
        groups.append((name, len(members)))
    sites = {}
    for op in readers:
        comps = labels[coupling.span(op.inputs[0])]
        index = np.array([where_is.get(int(c), (-1, 0)) for c in comps], "int64").reshape(-1, 2)
        if (index[:, 0] >= 0).any():
            sites[id(op)] = index
    return groups, sites, barriers


def wrap_groups(model: keras.Model, **kwargs) -> keras.Model:
    """`wrap(model, structure="group")`: see `keras_psp.wrap`."""
    graph = flatten(model)
    if any(isinstance(op.layer, (PSP, ChannelGroups)) for op in graph.ops):
        raise ValueError(f"wrap: model '{model.name}' already has PSP layers or channel groups; "
                         "wrap the plain model with structure='group'.")
    groups, sites, barriers = find_groups(graph)
    if barriers:
        warnings.warn(f"wrap: channels through layer(s) {', '.join(barriers)} get no group α: "
                      "surgery keeps them whole. Register those layers (README, 'Extending "
                      "keras_psp') to prune through them.", stacklevel=3)
    if not groups:
        warnings.warn(f"wrap: model '{model.name}' has no channel group that surgery could "
                      "remove; nothing gets an α.", stacklevel=3)
    scale = ChannelGroups([w for _, w in groups], [n for n, _ in groups],
                          name=_unique_name(model, "psp_groups"), **kwargs) if groups else None
    copies, pairs = {}, []

    def emit(op, values):
        layer = op.layer
        if isinstance(layer, keras.layers.Layer):
            if id(layer) not in copies:
                copies[id(layer)] = copy_layer(layer)
                pairs.append((layer, copies[id(layer)]))
            layer = copies[id(layer)]
        mapping = {tid: values[key] for tid, key in op.local.items()}
        if id(op) in sites:
            scaled = scale(values[op.inputs[0]], index=encode(sites[id(op)]))
            mapping = {tid: scaled if key == op.inputs[0] else values[key]
                       for tid, key in op.local.items()}
        args, kw = op.node.arguments.fill_in(mapping)
        return keras.tree.flatten(layer(*args, **kw))

    new_model = rebuild(graph, emit, name=model.name)
    for src, dst in pairs:
        copy_state(src, dst)
    return new_model


def _unique_name(model, base: str) -> str:
    taken = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


# -- folding, for surgery --------------------------------------------------------


def fold_groups(graph, alphas: dict | None = None) -> None:
    """Folds every `ChannelGroups` call into the kernel of the layer it scales.

    The call disappears from the flat graph and its reader reads the
    unscaled tensor with α folded into the input channels of its kernel
    (`Op.arrays`), as `unwrap` does for PSP layers. Changes `graph` in place.

    Args:
        graph: A flat `Graph`.
        alphas: Candidate α by `id` of a group's α variable; others fold
            their own.
    """
    calls = [op for op in graph.ops if isinstance(op.layer, ChannelGroups)]
    if not calls:
        return
    readers = graph.consumers()
    alias, effective = {}, {}
    for op in calls:
        layer = op.layer
        if id(layer) not in effective:  # each group's effective α, once per layer
            effective[id(layer)] = [
                layer.effective_alpha(g, (alphas or {}).get(id(a)), numpy=True)
                for g, a in enumerate(layer.alphas)]
        used, flat = _gather_index(decode(op.node.arguments.kwargs.get("index", "")),
                                   layer.widths)
        values = effective[id(layer)]
        scale = np.concatenate([np.ones(1, "float32")] + [values[g] for g in used])[flat]
        alias[op.outputs[0]] = op.inputs[0]
        for reader in readers.get(op.outputs[0], []):
            inner = reader.layer
            handler = handler_of(inner)
            if handler is None or "channel" not in handler.structures:
                raise TypeError(f"ChannelGroups '{layer.name}' scales the input of layer "
                                f"'{inner.name}' ({type(inner).__name__}), which it cannot "
                                "fold into; only layers wrap(structure='group') chose can "
                                "read channel groups.")
            plan = handler.plan(inner, "channel")
            weights = reader.arrays if reader.arrays is not None else read_values(
                inner.weights)
            position = [i for i, v in enumerate(inner.weights)
                        if v is getattr(inner, plan.kernel)][0]
            factor = np.asarray(ops.convert_to_numpy(plan.expand(scale)))
            weights = list(weights)
            weights[position] = (weights[position] * factor).astype(weights[position].dtype)
            reader.arrays = weights
            reader.source = _Scaled(reader.source, scale)
    graph.ops = [op for op in graph.ops if not isinstance(op.layer, ChannelGroups)]
    for op in graph.ops:
        op.inputs = [alias.get(k, k) for k in op.inputs]
        op.local = {tid: alias.get(k, k) for tid, k in op.local.items()}
    graph.output_keys = [alias.get(k, k) for k in graph.output_keys]
    for key in alias:
        graph.shapes.pop(key, None)


class _Scaled:
    """A reader run on its input scaled per channel (what the model computes)."""

    def __init__(self, layer, scale):
        self.layer, self.scale = layer, scale

    def __call__(self, inputs, *args, **kwargs):
        scaled = inputs * ops.cast(self.scale, inputs.dtype)
        return self.layer(scaled, *args, **kwargs)
