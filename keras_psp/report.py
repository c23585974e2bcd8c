"""Reports on a pruned model: a per-layer `summary` table and `plot_alphas`.

`summary` compares a model with what `keras_psp.slim` makes of it, layer by
layer (FLOPs and parameters before → after); `plot_alphas` draws the α
distributions that decide what is cut, on the pruning rule's relative scale
(see `keras_psp.stats`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import keras
import numpy as np

from keras_psp.cloning import psp_layers
from keras_psp.flops import _check, invisible_share, layer_flops
from keras_psp.graph import flatten
from keras_psp.groups import ChannelGroups, group_views
from keras_psp.stats import FLOOR, layer_stats, model_stats
from keras_psp.surgery.slim import slim
from keras_psp.wrapper import PSP

#: Shown for the structure and kept/total of layers without PSP.
NONE = "—"
#: `name` of the totals row, the last entry `summary` returns.
TOTAL = "Total"


def _n_params(layer) -> int:
    return sum(math.prod(w.shape) for w in getattr(layer, "weights", ()))


def _layers(model) -> dict[str, keras.layers.Layer]:
    """The distinct layers called in the flat graph of `model`, by name, in order."""
    layers: dict[str, keras.layers.Layer] = {}
    for op in flatten(model).ops:
        layers.setdefault(op.layer.name, op.layer)
    return layers


def summary(
    model: keras.Model,
    print_fn: Callable[[str], None] | None = None,
    slim_model: keras.Model | None = None,
    input_shape=None,
) -> list[dict]:
    """Prints and returns a per-layer table of what slimming `model` saves.

    One row per layer with MACs or parameters (weightless layers are left
    out), in graph order; nested models are inlined. "After" is the slim
    model (`keras_psp.slim(model)`, whose layers keep their names; a layer
    that slimming removes counts 0 after). FLOPs are multiply-accumulates per
    example as in `keras_psp.count_flops`.

    Parameters count the deployable model: a PSP layer counts the
    parameters of the layer it wraps, *without* its α (α is training-only
    and folds into the kernel). So the totals row holds
    `count_flops(model)` → `count_flops(slim_model)` and
    `model.count_params()` minus the α entries → `slim_model.count_params()`.

    Args:
        model: A built Sequential or functional model, PSP-wrapped or plain
            (a plain model has structure "—"; slimming it only removes
            channels whose weights are exactly zero).
        print_fn: Called once with the whole table as one string; `print`
            by default.
        slim_model: `keras_psp.slim(model)` if already computed; computed
            here otherwise (its warnings are passed on; a non-finite α
            raises the `ValueError` of `slim`).
        input_shape: For a model whose inputs have sizes left open (token
            sequences): the size of one example to count FLOPs at, as
            `keras_psp.count_flops` takes it.

    Returns:
        A list of dicts, one per row, with keys `name`, `type` (the wrapped
        layer's type for PSP layers), `structure` ("—" without PSP),
        `kept` and `total` (structures; None without PSP), `flops_before`,
        `flops_after`, `params_before`, `params_after`. The last entry is the
        totals row: `name` "Total", `type` None, `kept`/`total` summed over
        the PSP layers (None when there are none).

    Example:

    ```python
    rows = keras_psp.summary(wrapped)        # prints the table
    rows[-1]["flops_after"] / rows[-1]["flops_before"]   # FLOPs kept
    ```
    """
    _check(model, "summarize")
    if slim_model is None:
        slim_model = slim(model)
    flops_before = layer_flops(model, input_shape=input_shape)
    flops_after = layer_flops(slim_model, input_shape=input_shape)
    after = _layers(slim_model)
    rows, paired = [], set()
    views = {}
    for group in group_views(model):
        views.setdefault(id(group.layer), []).append(group)
    for name, layer in _layers(model).items():
        if isinstance(layer, ChannelGroups):  # α only: one row per group, nothing deployed
            for group in views.get(id(layer), []):
                stats = layer_stats(group)
                rows.append(dict(name=group.name, type="channel group", structure=group.structure,
                                 kept=stats.total - stats.cut, total=stats.total, flops_before=0,
                                 flops_after=0, params_before=0, params_after=0))
            continue
        inner = layer.layer if isinstance(layer, PSP) else layer
        params = _n_params(inner)
        if not params and not flops_before.get(name):
            continue
        twin = inner.name if isinstance(layer, PSP) else name  # slim keeps this name
        paired.add(twin)
        row = dict(name=name, type=type(inner).__name__, structure=NONE, kept=None, total=None)
        if isinstance(layer, PSP):
            stats = layer_stats(layer)
            row.update(structure=layer.structure, kept=stats.total - stats.cut, total=stats.total)
        rows.append(
            dict(
                row,
                flops_before=flops_before.get(name, 0),
                flops_after=flops_after.get(twin, 0),
                params_before=params,
                params_after=_n_params(after[twin]) if twin in after else 0,
            )
        )
    for name, layer in after.items():  # layers only the slim model has
        if name not in paired and (_n_params(layer) or flops_after.get(name)):
            rows.append(
                dict(
                    name=name,
                    type=type(layer).__name__,
                    structure=NONE,
                    kept=None,
                    total=None,
                    flops_before=0,
                    flops_after=flops_after.get(name, 0),
                    params_before=0,
                    params_after=_n_params(layer),
                )
            )
    psp_rows = [r for r in rows if r["total"] is not None]
    totals = dict(name=TOTAL, type=None, structure=None)
    totals["kept"] = sum(r["kept"] for r in psp_rows) if psp_rows else None
    totals["total"] = sum(r["total"] for r in psp_rows) if psp_rows else None
    for key in ("flops_before", "flops_after", "params_before", "params_after"):
        totals[key] = sum(r[key] for r in rows)
    rows.append(totals)
    (print_fn or print)(_format(model.name, rows))
    share = invisible_share(model)
    if share > 0:
        (print_fn or print)(
            f"FLOPs: the visible part only. {share:.1%} of the weights are in layers whose "
            "cost count_flops cannot see, so the FLOPs total is not the model's.")
    return rows


def _change(before: int, after: int) -> str:
    return f"{before:,} → {after:,}" if before != after else f"{before:,}"


def _format(name: str, rows: list[dict]) -> str:
    """The table of `summary` as fixed-width text, like `model.summary()`."""
    header = ("Layer", "Type", "Structure", "Kept", "FLOPs (MACs)", "Params")
    cells = [
        (
            r["name"],
            r["type"] or "",
            r["structure"] or "",
            NONE if r["total"] is None else f"{r['kept']}/{r['total']}",
            _change(r["flops_before"], r["flops_after"]),
            _change(r["params_before"], r["params_after"]),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(values):
        left = [v.ljust(w) for v, w in zip(values[:3], widths[:3], strict=True)]
        right = [v.rjust(w) for v, w in zip(values[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    width = sum(widths) + 2 * (len(widths) - 1)
    total = rows[-1]

    def share(key):
        before = total[f"{key}_before"]
        return f"{total[f'{key}_after'] / before:.1%}" if before else "n/a"

    lines = [f'PSP summary: "{name}"', "━" * width, line(header), "━" * width]
    lines += [line(c) for c in cells[:-1]]
    lines += ["─" * width, line(cells[-1]), "━" * width]
    lines.append(
        f"After slimming: {share('flops')} of the FLOPs, {share('params')} of the parameters."
    )
    return "\n".join(lines)


def plot_alphas(model: keras.Model, path: str | os.PathLike, bins: int = 40) -> str:
    """Saves histograms of every PSP layer's α as a PNG.

    The first panel pools all layers, then one small panel per PSP layer
    (title: name and cut/total). The x axis is log10 of |α| relative to the
    pruning rule's reference (the layer's largest |α|; 1 for a layer-wise α),
    floored at `keras_psp.stats.FLOOR`; a dashed line marks log10 of the
    threshold, so structures left of it are cut. A layer whose α is not
    finite gets a panel saying so. Drawn with matplotlib's Agg canvas,
    without touching pyplot or the global backend.

    Args:
        model: A model with PSP layers (nested models are searched).
        path: Where to write the PNG.
        bins: Number of histogram bins per panel.

    Returns:
        `path`, as a string.

    Raises:
        ValueError: if `model` has no PSP layers, or `bins` < 1.

    Example:

    ```python
    keras_psp.plot_alphas(wrapped, "alphas.png")
    ```
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_alphas needs matplotlib: `pip install matplotlib` "
                          "(or `pip install keras_psp[plot]`).") from error

    if not isinstance(model, keras.Model):
        raise TypeError(f"plot_alphas expects a keras.Model, got {type(model).__name__}.")
    layers = psp_layers(model)
    if not layers:
        raise ValueError(
            f"plot_alphas: model '{model.name}' has no PSP layers, so it has no α to "
            "plot. Wrap it first with keras_psp.wrap(model)."
        )
    if int(bins) < 1:
        raise ValueError(f"plot_alphas: `bins` must be a positive integer, got {bins!r}.")
    stats, overall = model_stats(layers)
    finite = [(s, layer.threshold) for s, layer in zip(stats, layers, strict=True) if s.finite]
    cut, total = sum(s.cut for s, _ in finite), sum(s.total for s, _ in finite)
    pooled = (
        np.concatenate([s.relative for s, _ in finite]) if finite else None,
        sorted({t for _, t in finite}),
        f"all layers ({cut}/{total} cut, separation {overall:.2f})",
    )
    panels = [pooled] + [
        (s.relative if s.finite else None, [layer.threshold],
         f"{s.name} ({s.cut}/{s.total} cut" + (f", sep. {s.separation:.2f})" if s.cut else ")"))
        for s, layer in zip(stats, layers, strict=True)
    ]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, (relative, thresholds, title) in zip(axes, panels, strict=False):
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        if relative is None:
            ax.text(
                0.5,
                0.5,
                "non-finite α",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="tab:red",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        values = np.log10(np.maximum(relative, FLOOR))
        lines = np.log10(np.maximum(thresholds, FLOOR))  # threshold 0: drawn at the floor
        low, high = min(values.min(), lines.min()), max(values.max(), lines.max())
        ax.hist(values, bins=int(bins), range=(low - 0.5, high + 0.5), color="tab:blue")
        for x in lines:
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("log10 relative |α|", fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    figure.savefig(path, dpi=100)
    return os.fspath(path)
