"""The study's outputs: interleaved LiteRT latency, the table, figures, RESULTS.md."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform

import numpy as np

import keras_psp
from keras_psp.stats import FLOOR

LABELS = {
    "baseline": "unpruned (N + k epochs)",
    "trained_default_channel": "PSP default (relative L1), `channel`, from trained",
    "trained_default_column": "PSP default (relative L1), `column`, from trained",
    "trained_l2_channel": "PSP L2 (paper), `channel`, from trained",
    "trained_l2_column": "PSP L2 (paper), `column`, from trained",
    "trained_l1_channel": "PSP L1, `channel`, from trained",
    "trained_l1_column": "PSP L1, `column`, from trained",
    "scratch_default_channel": "PSP default (relative L1), `channel`, from scratch",
    "scratch_default_column": "PSP default (relative L1), `column`, from scratch",
    "scratch_l2_channel": "PSP L2 (paper), `channel`, from scratch",
    "scratch_l2_column": "PSP L2 (paper), `column`, from scratch",
    "scratch_l1_channel": "PSP L1, `channel`, from scratch",
    "scratch_l1_column": "PSP L1, `column`, from scratch",
    "trained_default_group": "PSP default (relative L1), `group`, from trained",
    "trained_l2_group": "PSP L2 (paper), `group`, from trained",
    "trained_l1_group": "PSP L1, `group`, from trained",
    "scratch_default_group": "PSP default (relative L1), `group`, from scratch",
    "scratch_l2_group": "PSP L2 (paper), `group`, from scratch",
    "scratch_l1_group": "PSP L1, `group`, from scratch",
    "l1norm": "ℓ1-norm filters (Li et al.) + FT, from trained",
    "bnslim": "BN-scale slimming (Liu et al.) + FT, from scratch",
    "tfmot_50": "tfmot magnitude 50 % + FT, from trained",
    "tfmot_2of4": "tfmot 2:4 + FT, from trained",
}
ORDER = list(LABELS)


def litert_latency(contents: dict[str, bytes], rounds: int, invokes: int = 100) -> dict:
    """Median ms per batch-1 invoke of each LiteRT model, one interleaved loop.

    Every model gets its own single-thread interpreter; each round runs every
    model `invokes` times in turn (A B C … A B C …, in a new random order
    each round so that no model always follows the same one), after two
    warm-up rounds.
    """
    from ai_edge_litert.interpreter import Interpreter

    runners = {}
    for name, content in contents.items():
        interpreter = Interpreter(model_content=content, num_threads=1)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        runners[name] = interpreter
    cases = {name: interpreter.invoke for name, interpreter in runners.items()}
    samples = keras_psp.timing.interleaved(cases, rounds, invokes, warmup=2 * invokes, seed=0)
    return keras_psp.timing.medians_ms(samples)


def _stats(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def aggregate(rows: list[dict], reference: dict, latency: dict) -> list[dict]:
    """One table line per (method, target): means over seeds, latency of the first seed."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["method"], row.get("target")), []).append(row)
    lines = []
    for (method, target), group in sorted(
            groups.items(), key=lambda kv: (ORDER.index(kv[0][0]), -(kv[0][1] or 1.0))):
        acc, std = _stats([r["accuracy"] for r in group])
        before, _ = _stats([r.get("accuracy_before_finetune") for r in group])
        key = latency_key(method, target)
        lines.append({
            "method": method, "label": LABELS[method], "target": target, "n": len(group),
            "accuracy": acc, "accuracy_std": std, "accuracy_before_finetune": before,
            "flops_fraction": float(np.mean([r["flops"] for r in group])) / reference["flops"],
            "nonzero_macs_fraction": float(np.mean([r["nonzero_macs"] for r in group]))
            / reference["flops"],
            "params": float(np.mean([r["params"] for r in group])),
            "nonzero_params": float(np.mean([r["nonzero_params"] for r in group])),
            "latency_ms": latency.get(key),
            "latency_ratio": (latency[key] / latency["baseline"]
                              if key in latency and "baseline" in latency else None),
        })
    return lines


def latency_key(method: str, target) -> str:
    return method if target is None else f"{method}@{target:g}"


def _fmt(value, pattern="{:.2f}", missing="—"):
    return missing if value is None or not math.isfinite(value) else pattern.format(value)


def markdown_table(lines: list[dict]) -> str:
    head = ("| method | target | FLOPs (×) | non-zero MACs (×) | parameters (non-zero) | "
            "test accuracy % (mean ± std, n) | before FT % | LiteRT b1 latency (×) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = []
    for t in lines:
        acc = _fmt(t["accuracy"]) + (f" ± {t['accuracy_std']:.2f}" if t["accuracy_std"] else "")
        body.append(
            f"| {t['label']} | {_fmt(t['target'], '{:g}')} | {t['flops_fraction']:.3f} | "
            f"{t['nonzero_macs_fraction']:.3f} | {t['params']:,.0f} ({t['nonzero_params']:,.0f})"
            f" | {acc} (n={t['n']}) | {_fmt(t['accuracy_before_finetune'])} | "
            f"{_fmt(t['latency_ratio'], '{:.3f}')} |")
    return head + "\n".join(body) + "\n"


def _axes():
    """A figure, its one axes, and a color per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(), {m: f"C{i}" for i, m in enumerate(ORDER)}


def plot_accuracy_vs_flops(lines: list[dict], path: str) -> str:
    figure, ax, colors = _axes()
    for method in ORDER:
        mine = sorted((t for t in lines if t["method"] == method and t["accuracy"] is not None),
                      key=lambda t: t["flops_fraction"])
        if not mine:
            continue
        x = [t["flops_fraction"] for t in mine]
        y = [t["accuracy"] for t in mine]
        err = [t["accuracy_std"] or 0.0 for t in mine]
        if method == "baseline":
            ax.axhline(y[0], color="k", ls="--", lw=1, label=f"{LABELS[method]} ({y[0]:.2f} %)")
            if err[0]:
                ax.axhspan(y[0] - err[0], y[0] + err[0], color="k", alpha=0.08)
            continue
        marker = "s" if method.startswith("tfmot") else "o"
        ax.errorbar(x, y, yerr=err, marker=marker, color=colors[method], capsize=3,
                    label=LABELS[method])
        before = [(t["flops_fraction"], t["accuracy_before_finetune"]) for t in mine
                  if t["accuracy_before_finetune"] is not None]
        if before:
            ax.plot(*zip(*before, strict=True), marker=marker, ls=":", color=colors[method],
                    mfc="none", alpha=0.6)
    ax.set_xlabel("FLOPs (MACs) of the deployed dense model / unpruned")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet: accuracy vs FLOPs (hollow, dotted: before fine-tuning;"
                 "\ntfmot keeps dense shapes, so its FLOPs stay 1.0)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    figure.savefig(path, dpi=120)
    return path


def _front(points):
    """The Pareto front (lower x, higher y) of (x, y) points, sorted by x."""
    front, best = [], -math.inf
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def fronts(lines: list[dict]) -> dict[str, list]:
    """Latency/accuracy Pareto fronts of PSP rows, ℓ1-norm and BN-slimming."""
    groups = {"PSP": lambda m: m.startswith(("trained_", "scratch_")),
              "ℓ1-norm + FT": lambda m: m == "l1norm", "BN-slimming + FT": lambda m: m == "bnslim"}
    return {name: _front([(t["latency_ratio"], t["accuracy"]) for t in lines
                          if test(t["method"]) and t["latency_ratio"] and t["accuracy"]])
            for name, test in groups.items()}


def plot_accuracy_vs_latency(lines: list[dict], path: str) -> str:
    """Accuracy against measured LiteRT latency, with each family's Pareto front."""
    figure, ax, colors = _axes()
    for t in lines:
        if t["latency_ratio"] is None or t["accuracy"] is None:
            continue
        label = LABELS[t["method"]] + ("" if t["target"] is None else f" @ {t['target']:g}")
        ax.plot(t["latency_ratio"], t["accuracy"], "o", color=colors[t["method"]], label=label)
    for (name, front), style in zip(fronts(lines).items(), ("-", "--", ":"), strict=True):
        if front:
            ax.plot(*zip(*front, strict=True), style, color="k", lw=1, alpha=0.6,
                    label=f"front: {name}")
    ax.set_xlabel("LiteRT batch-1 latency / unpruned (one interleaved run)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet: accuracy vs measured latency", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    figure.savefig(path, dpi=120)
    return path


def plot_alpha_histograms(panels: list[tuple[str, np.ndarray, float, float, float]],
                          path: str) -> str:
    """One panel per (title, pooled relative |α|, threshold, cut fraction, separation).

    log10 histograms; the dashed line marks `threshold` (the default one: the
    cut fraction counts each layer's own threshold, which FlopsBudget may
    have lowered).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6 * max(1, len(panels)), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, max(1, len(panels))))
    for ax, (title, relative, threshold, cut, sep) in zip(axes, panels, strict=False):
        values = np.log10(np.maximum(relative, FLOOR))
        ax.hist(values, bins=40, range=(np.log10(FLOOR) - 0.25, 0.25), color="tab:blue")
        if threshold is not None:
            ax.axvline(np.log10(threshold), color="tab:red", ls="--", lw=1)
        ax.set_title(f"{title}\n{100 * cut:.0f} % of structures cut (at 1e-8: exactly 0), "
                     f"separation "
                     f"{_fmt(sep)}", fontsize=9)
        ax.set_xlabel("log10 |α| / layer max (floor 1e-8)")
        ax.set_ylabel("structures")
    figure.savefig(path, dpi=120)
    return path


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for package in ("tensorflow", "keras", "tf_keras", "tensorflow-model-optimization",
                    "ai-edge-litert", "keras_psp"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}
