"""RESULTS.md of the Fashion-MNIST study, from the summary that results.json holds."""

from __future__ import annotations

import os

from .report import fronts, markdown_table


def _line(table, method, target=None):
    for t in table:
        if t["method"] == method and (target is None or t["target"] == target):
            return t
    return None


def _acc(t) -> str:
    std = f" ± {t['accuracy_std']:.2f}" if t["accuracy_std"] else ""
    return f"{t['accuracy']:.2f}{std} % (n={t['n']})"


def _gap_line(psp, base, points: float, what: str) -> str:
    gap = psp["accuracy"] - base["accuracy"]
    within = "within" if gap >= -points else "**NOT within**"
    missed = ("" if psp["flops_fraction"] <= psp["target"] + 0.02 else
              f" **The FLOPs target was missed ({psp['flops_fraction']:.3f}×).**")
    return (f"- {what}: {psp['label']} at {psp['flops_fraction']:.3f}× FLOPs: {_acc(psp)} "
            f"against the unpruned {_acc(base)}: {gap:+.2f} points, {within} {points:g} "
            f"points." + missed)


def verdicts(table: list[dict], targets: list[float]) -> list[str]:
    """Plain statements against the issue's targets, met or not."""
    base = _line(table, "baseline")
    out = []
    if base is None:
        return ["- No unpruned row to compare with."]
    goals = {0.5: 0.5, 0.3: 1.5}
    for target in targets:
        points = goals.get(target, 1.5)
        for method, what in (("scratch_default_channel", f"**{target:g}×, from scratch**"),
                             ("trained_default_channel",
                              f"**{target:g}×, from the trained model**")):
            psp = _line(table, method, target)
            if psp is None or psp["accuracy"] is None:
                continue
            out.append(_gap_line(psp, base, points, what))
            for other_method in ("l1norm", "bnslim"):
                other = _line(table, other_method, target)
                if other is None or other["accuracy"] is None:
                    continue
                lead = psp["accuracy"] - other["accuracy"]
                verdict = (f"at or above it (+{lead:.2f} points)" if lead >= 0 else
                           f"**below it by {-lead:.2f} points**")
                out.append(f"  - {other['label']} at {other['flops_fraction']:.3f}×: "
                           f"{_acc(other)}; PSP is {verdict}.")
    front = fronts(table)
    psp_front = front.get("PSP")
    for name, points in front.items():
        if name == "PSP" or not points or not psp_front:
            continue
        beaten = [(x, y) for x, y in points
                  if not any(px <= x and py >= y for px, py in psp_front)]
        out.append(f"- **Latency front vs {name}:** " + (
            "every point of it is matched or beaten by a PSP row (as fast or faster, "
            "as accurate or more)." if not beaten else
            "PSP does not dominate: " + ", ".join(f"{x:.3f}× latency at {y:.2f} %"
                                                  for x, y in beaten)
            + " has no PSP row as fast and as accurate."))
    return out or ["- No PSP default row to compare (not in --methods)."]


def _label_list(summary) -> str:
    return ", ".join(f"`{m}`" for m in summary["settings"]["seeded"])


def results_markdown(summary: dict, path: str) -> str:
    s, m, table = summary["settings"], summary["machine"], summary["table"]
    v, ref = m["versions"], summary["reference"]
    where = os.path.dirname(os.path.abspath(path))
    figures = {k: os.path.relpath(os.path.abspath(p), where)
               for k, p in summary["figures"].items()}
    latency = summary["latency_ms"]
    errors = [r for r in summary["rows"] if "error" in r]
    bn = summary["extras"].get("bnslim") or []
    dense = summary["extras"].get("tfmot_dense")
    parts = ["# Fashion-MNIST study: PSP against ℓ1-norm, network slimming and tfmot\n\n"]
    if summary["quick"]:
        parts.append("> **Quick smoke run** (`--quick`): a few hundred images, one epoch per "
                     "method. The numbers only show that the pipeline works; they are not "
                     "results.\n")
    n, k = s["epochs"], s["finetune_epochs"]
    parts.append(f"""
Command: `{summary['command']}`

Machine: {m['cpu']}, {m['cores']} cores, no GPU; Python {m['python']}, TensorFlow
{v['tensorflow']}, Keras {v['keras']}, tf_keras {v['tf_keras']}, tensorflow-model-optimization
{v['tensorflow-model-optimization']}, ai-edge-litert {v['ai-edge-litert']}. Load average
(1 min) {summary['load_average']['start'][0]:.1f} at the start, {summary['load_average']['end'][0]:.1f}
at the end. Elapsed: **{summary['elapsed_seconds'] / 60:.1f} min**.

## Setup

- **Data:** the first {s['train_images']} of the 60 000 Fashion-MNIST training images;
  {s['test_images']} test images.
- **Model:** a ResNet-{s['depth']} (`keras_psp.models.cifar_resnet`, widths
  {'-'.join(map(str, s['widths']))}, stem stride {s['stem_stride']}, 28×28×1):
  {ref['flops']:,} MACs ("FLOPs"), {ref['params']:,} parameters.
- **Equal budgets: N = {n} training epochs, then k = {k} more for every method.** Training:
  SGD momentum 0.9, cosine from {s['lr']}, batch {s['batch_size']}, L2 5e-4 on conv kernels.
  The k epochs: SGD momentum 0.9, cosine from {s['finetune_lr']}, for every method.
  - *unpruned*: N epochs, then k epochs of fine-tuning.
  - *from the trained model*: each seed's N-epoch unpruned model is the start of every
    method: `keras_psp.prune(trained, target, epochs=k)` (wrap, k epochs while `FlopsBudget`
    cuts on its schedule, reaching the target half-way, slim, BN statistics re-estimated on
    4096 training images); ℓ1-norm filters pruned then fine-tuned k epochs; tfmot fine-tuned k
    epochs with its pruning wrappers.
  - *from scratch*: PSP trains N + k epochs from the seed's initialisation with
    `FlopsBudget(target, begin=0.1, end=0.6)`, then `slim` + `recalibrate`; BN-slimming trains
    N epochs with L1 on γ{f" ({bn[0]['bn_l1']:.3g}, scaled to this run's length)" if bn else ""},
    is pruned and fine-tuned k epochs.
- **Seeds:** {s['seeds']} for {_label_list(summary)} at the first target; 1 for the other rows
  and the second target. Seed *s* of every method starts from seed *s*'s initial weights or
  trained model, and shuffles its batches from *s*.
- **PSP penalties:** the default `relative_l1` (L1 of α relative to its layer's RMS, strength
  5e-3), the paper's `l2` (2e-2) and `l1` (2e-2) on the raw α. PSP's FLOPs are those of
  `keras_psp.slim(model)`: `FlopsBudget` lands at or just below the target by construction.
- **ℓ1-norm (Li et al. 2017)** and **network slimming (Liu et al. 2017)** prune the inner
  channels of each residual block (the first conv's filters, as both papers do for ResNets);
  ℓ1-norm cuts the same fraction of every block, slimming ranks |γ| globally; the number cut is
  searched so that `count_flops` of the slim model is closest to the target. The cut goes
  through keras_psp's surgery.
- **tfmot** (tf_keras, own process): `prune_low_magnitude` on every Conv2D/Dense kernel, 50 %
  unstructured or `sparsity_m_by_n=(2, 4)`. **Its FLOPs stay those of the dense model**: the
  kernels keep their shapes; the non-zero MACs column is what a sparse kernel could
  skip.{f" The tf_keras copy of the trained model scores {dense['accuracy']:.2f} %." if dense else ""}
- **LiteRT latency:** every final model (seed 0) as a float32 `.tflite`, batch 1, one thread,
  all timed in ONE interleaved loop (100 invokes per turn, {s['rounds']} rounds, a new random
  order each round), medians, as a ratio to the unpruned model's
  {latency.get('baseline', float('nan')):.3f} ms.

## Results

{markdown_table(table)}
FLOPs and non-zero MACs: fractions of the unpruned model's {ref['flops']:,} MACs per image
(the mean over seeds). Parameters: all weights of the deployed model, BN statistics included.
"Before FT": right after pruning, before fine-tuning (for the unpruned row: after N epochs).

## Against the targets

""")
    parts.append("\n".join(verdicts(table, s["targets"])) + "\n")
    parts.append("\n## Figures\n\n")
    if "accuracy_vs_flops" in figures:
        parts.append(f"![accuracy vs FLOPs]({figures['accuracy_vs_flops']})\n\n")
    if "accuracy_vs_latency" in figures:
        parts.append(f"![accuracy vs latency]({figures['accuracy_vs_latency']})\n\n")
    if "alpha_histograms" in figures:
        parts.append(
            "α histograms (`channel` rows at the first target, seed 0; all PSP layers pooled, "
            "log10 |α| relative to each layer's largest, floored at 1e-8: structures that "
            "`FlopsBudget` cut have α exactly 0 and sit at the floor):\n\n"
            f"![α histograms]({figures['alpha_histograms']})\n\n")
    if errors:
        parts.append("\n## Failed runs\n\n" + "\n".join(
            f"- {r['method']} (target {r.get('target')}, seed {r.get('seed')}): `{r['error']}`"
            for r in errors) + "\n")
    parts.append("""\n## Notes

- `layer` structures are not in this study: `FlopsBudget`/`prune_to` rank per-structure
  scores and keep at least one structure per layer, so they never cut a layer-wise α
  (README, "Supported layers and structures").
- `column` structures: `slim` removes an input channel only when all its columns are cut;
  the other cut columns stay as zeros (the non-zero MACs column).
- CIFAR-10/100 and ImageNet rows are **not yet measured**: they need a GPU, and none was lent
  to this project's runs.
""")
    return "".join(parts)
