"""RESULTS.md of the Fashion-MNIST study, from the summary that results.json holds."""

from __future__ import annotations

import os

from .report import _fmt, markdown_table


def _line(table, method, target=None):
    for t in table:
        if t["method"] == method and (target is None or t["target"] == target):
            return t
    return None


def _acc(t) -> str:
    std = f" ± {t['accuracy_std']:.2f}" if t["accuracy_std"] else ""
    return f"{t['accuracy']:.2f}{std} % (n={t['n']})"


def verdicts(table: list[dict], targets: list[float]) -> list[str]:
    """Plain statements against the issue's targets (PSP at 0.5× FLOPs)."""
    base = _line(table, "baseline")
    out = []
    for target in targets:
        psp = _line(table, "psp_channel", target)
        if base is None or psp is None or psp["accuracy"] is None:
            continue
        gap = psp["accuracy"] - base["accuracy"]
        goal = " (the issue's goal: within 0.3 points at 0.5×)" if target == 0.5 else ""
        within = "within" if gap >= -0.3 else "NOT within"
        missed = ("" if abs(psp["flops_fraction"] - target) <= 0.05 else
                  f" **The FLOPs target was missed by {psp['flops_fraction'] - target:+.3f}, so "
                  "this is not a comparison at matched FLOPs.**")
        out.append(
            f"- **Target {target:g}×{goal}:** PSP (`channel`, weight decay, no fine-tuning) "
            f"reached {psp['flops_fraction']:.3f}× FLOPs at {_acc(psp)}, against the baseline's "
            f"{_acc(base)}: {gap:+.2f} points, {within} 0.3 points of the unpruned accuracy."
            + missed)
        for method in ("l1norm", "bnslim"):
            other = _line(table, method, target)
            if other is None or other["accuracy"] is None:
                continue
            lead = psp["accuracy"] - other["accuracy"]
            verdict = (f"ahead of it by {lead:.2f} points" if lead > 0 else
                       f"NOT ahead of it: {-lead:.2f} points behind")
            before = other["accuracy_before_finetune"]
            note = f", {before:.2f} % before fine-tuning" if before is not None else ""
            out.append(
                f"  - {other['label']} ({other['flops_fraction']:.3f}× FLOPs, "
                f"{_acc(other)} after fine-tuning{note}): PSP is {verdict}.")
    return out or ["- No PSP `channel` row and baseline to compare (not in --methods)."]


def results_markdown(summary: dict, path: str) -> str:
    s, m, table = summary["settings"], summary["machine"], summary["table"]
    v, ref = m["versions"], summary["reference"]
    where = os.path.dirname(os.path.abspath(path))
    figures = {k: os.path.relpath(os.path.abspath(p), where)
               for k, p in summary["figures"].items()}
    latency = summary["latency_ms"]
    errors = [r for r in summary["rows"] if "error" in r]
    bn = summary["extras"].get("bnslim")
    dense = summary["extras"].get("tfmot_dense")
    parts = ["# Fashion-MNIST study: PSP against ℓ1-norm, network slimming and tfmot\n\n"]
    if summary["quick"]:
        parts.append("> **Quick smoke run** (`--quick`): a few hundred images, one epoch per "
                     "method. The numbers only show that the pipeline works; they are not "
                     "results.\n")
    parts.append(f"""
Command: `{summary['command']}`

Machine: {m['cpu']}, {m['cores']} cores, no GPU; Python {m['python']}, TensorFlow
{v['tensorflow']}, Keras {v['keras']}, tf_keras {v['tf_keras']}, tensorflow-model-optimization
{v['tensorflow-model-optimization']}, ai-edge-litert {v['ai-edge-litert']}. Load average
(1 min) {summary['load_average']['start'][0]:.1f} at the start, {summary['load_average']['end'][0]:.1f}
at the end (other jobs share the cores when it is above ~0). Elapsed:
**{summary['elapsed_seconds'] / 60:.1f} min**.

## Setup

- **Data:** the first {s['train_images']} of the 60 000 Fashion-MNIST training images;
  {s['test_images']} test images.
- **Model:** the main job's ResNet-{s['depth']} (`keras_psp.models.cifar_resnet`, widths
  {'-'.join(map(str, s['widths']))}, stem stride {s['stem_stride']}, 28×28×1):
  {ref['flops']:,} MACs ("FLOPs"), {ref['params']:,} parameters.
- **Training** (baseline, PSP, BN-slimming): SGD momentum 0.9, cosine from {s['lr']}, batch
  {s['batch_size']}, {s['epochs']} epochs, L2 5e-4 on conv kernels. Seeds: {s['seeds']} for the
  baseline and PSP `channel`, {s['other_seeds']} for the other PSP rows, 1 for ℓ1-norm,
  BN-slimming and tfmot (pruned from the seed-0 baseline / one training). Seed *k* of PSP starts
  from the same initial weights as seed *k* of the baseline.
- **Matching FLOPs:** PSP: `keras_psp.FlopsBudget(target)` adapts the α strength each epoch
  (initial {s['strength'] or 0.02:g}, at most {f"{s['max_strength_factor']:g}×" if
  s['max_strength_factor'] else "FlopsBudget's default multiple of"} that); where it ends more
  than {s['match_tolerance']:g} from the target, the pruning threshold is moved after training
  to land on it (listed below). FLOPs are those of `keras_psp.slim(model)`, as reached.
  ℓ1-norm and BN-slimming: the
  number of channels to cut is searched so that `count_flops` of the slimmed model is closest to
  the target (exact by construction, up to one channel).
- **PSP is reported without fine-tuning.** ℓ1-norm, BN-slimming and tfmot are fine-tuned for
  {s['finetune_epochs']} epoch(s), SGD momentum 0.9, cosine from {s['finetune_lr']}.
- **ℓ1-norm (Li et al. 2017)** and **network slimming (Liu et al. 2017)** prune the inner
  channels of each residual block (the first conv's filters, as both papers do for ResNets);
  ℓ1-norm cuts the same fraction of every block (no sensitivity analysis), slimming ranks |γ|
  globally. The cut goes through keras_psp's surgery (α = 0 on the second conv's input
  channels, then `slim`). Slimming trains with L1 on those γ of
  {bn['bn_l1'] if bn else float('nan'):.3g} (scaled to this run's length; the paper's 1e-4 is for
  160 epochs){f", unpruned accuracy {bn['accuracy_unpruned']:.2f} %" if bn else ""}.
- **tfmot** (tf_keras, own process): the seed-0 baseline's weights, `prune_low_magnitude` on
  every Conv2D/Dense kernel, 50 % unstructured (`ConstantSparsity`) or `sparsity_m_by_n=(2, 4)`,
  fine-tuned, stripped, `TFLiteConverter.from_keras_model`. **Its FLOPs stay those of the dense
  model**: the kernels keep their shapes; the non-zero MACs column is what a sparse kernel could
  skip.{f" The tf_keras copy of the baseline scores {dense['accuracy']:.2f} %." if dense else ""}
- **LiteRT latency:** every final model (seed 0) as a float32 `.tflite`, batch 1, one thread,
  all timed in ONE interleaved loop (A B C … A B C …, 100 invokes per turn, {s['rounds']}
  rounds), medians, as a ratio to the baseline's {latency.get('baseline', float('nan')):.3f} ms.

## Results

{markdown_table(table)}
FLOPs and non-zero MACs: fractions of the unpruned model's {ref['flops']:,} MACs per image
(the mean over seeds). Parameters: all weights of the deployed model, BN statistics included.
"Before FT": right after pruning, before fine-tuning.

## Against the targets

""")
    parts.append("\n".join(verdicts(table, s["targets"])) + "\n")
    parts.append("\n## Figures\n\n")
    if "accuracy_vs_flops" in figures:
        parts.append(f"![accuracy vs FLOPs]({figures['accuracy_vs_flops']})\n\n")
    if "alpha_hist_wd_vs_l1" in figures:
        parts.append(
            "α histograms (all PSP layers pooled, log10 |α| relative to each layer's largest; "
            "dashed: the default threshold 0.01; `FlopsBudget` may lower a layer's threshold "
            "to hold the cut set once the target is reached). The paper's claim is that weight decay separates kept and "
            "cut structures more clearly than L1:\n\n"
            f"![α histograms, weight decay vs L1]({figures['alpha_hist_wd_vs_l1']})\n\n")
    variants = summary["extras"].get("deploy_variants", {})
    base_ms = latency.get("baseline")
    if base_ms and (variants or "tfmot_dense" in latency):
        lines = ["\n## LiteRT latency of other deployments (same interleaved run)\n",
                 "| model | FLOPs (×) | LiteRT b1 latency (×) |", "|---|---|---|"]
        for target in s["targets"]:
            t = _line(table, "psp_channel", target)
            if t is not None and t["latency_ms"] is not None:
                lines.append(f"| PSP `channel` @ {target:g}, seed 0, `slim()` (gathers; the "
                             f"table's) | {t['flops_fraction']:.3f} (mean) | "
                             f"{t['latency_ms'] / base_ms:.3f} |")
            for key, info in variants.items():
                if info["target"] == target and key in latency:
                    options = ", ".join(f"{k}={v}" for k, v in info["options"].items())
                    lines.append(f"| PSP `channel` @ {target:g}, seed 0, `slim({options})` | "
                                 f"{info['flops_fraction']:.3f} | {latency[key] / base_ms:.3f} |")
        if "tfmot_dense" in latency:
            lines.append(f"| unpruned, built in tf_keras, `TFLiteConverter.from_keras_model` "
                         f"(tfmot's path) | 1.000 | {latency['tfmot_dense'] / base_ms:.3f} |")
        parts.append("\n".join(lines) + "\n\nThe same pruned network (identical outputs) "
                     "slimmed without gathers (`gather=False`: zero weights stay where other "
                     "consumers keep a channel) and with widths rounded up to multiples of 8: "
                     "XNNPACK does not take LiteRT's GATHER, which splits the graph into several "
                     "delegate partitions. The last row is the unpruned model through tfmot's "
                     "converter path: the two paths should time alike.\n")
    moved = [r for r in summary["rows"] if r.get("budget_flops_fraction") is not None
             and not abs(r["budget_flops_fraction"] - r["target"]) <= s["match_tolerance"]]
    if moved:
        parts.append(
            "\n## PSP runs whose threshold was moved after training\n\n`FlopsBudget` ended "
            f"further than {s['match_tolerance']:g} from the target in these runs, so the "
            "pruning threshold (relative |α|, default 0.01) was set after training to land on the "
            "target FLOPs; the table uses the moved threshold:\n\n" + "\n".join(
                f"- {r['method']} @ {r['target']:g}, seed {r['seed']}: FlopsBudget ended at "
                f"{r['budget_flops_fraction']:.3f}× FLOPs, {_fmt(r['budget_accuracy'])} %; threshold "
                f"{r['threshold']:.3g} gives {r['flops_fraction']:.3f}×, {r['accuracy']:.2f} %"
                for r in moved) + "\n")
    if errors:
        parts.append("\n## Failed runs\n\n" + "\n".join(
            f"- {r['method']} (target {r.get('target')}, seed {r.get('seed')}): `{r['error']}`"
            for r in errors) + "\n")
    parts.append("""\n## Notes

- `layer` structures: a layer-wise α in front of BatchNormalization is cancelled by it (BN
  normalizes the scale away; only BN's ε makes a very small α matter), so weight decay
  learns little about which branch matters; only the two convolutions inside each residual
  branch are wrapped (cutting the stem, a projection or the classifier would cut the model
  off), and cutting either removes the whole branch: coarse steps of FLOPs.
- `column` structures: `slim` removes an input channel only when all its columns are cut;
  the other cut columns stay as zeros (the non-zero MACs column).
- CIFAR-10/100 and ImageNet rows are **not yet measured**: they need a GPU, and none was lent
  to this project's runs.
""")
    return "".join(parts)
