"""PSP against ℓ1-norm, network slimming and tfmot on Fashion-MNIST, on a CPU.

A ResNet-8 (16-32-64, stride-2 stem: the main job's model at half its width) on
30 000 Fashion-MNIST training images, side by side at matched FLOPs (0.5 and 0.3 of the unpruned
model's) and equal training budgets: N training epochs, then k more.

- **unpruned**: N epochs, then k epochs of fine-tuning (`--seeds` seeds).
- **from the trained model** (every method starts from the seed's trained
  unpruned model and gets the same k epochs): `keras_psp.prune` with the
  default penalty (`relative_l1`), the paper's L2 and L1 on α, each with
  `channel` and `column` structures, and the default penalty with group α
  (`group`: one α per coupled channel group, widths in multiples of 8); the ℓ1-norm filter criterion (Li et
  al. 2017) + fine-tuning; tensorflow-model-optimization magnitude pruning at
  50 % and 2:4, fine-tuned (tf_keras, its own process).
- **from scratch** (N + k epochs in all): PSP with `FlopsBudget`, default and
  L2 penalties, `channel`, and default `group`; BN-scale network slimming (Liu et al. 2017), N
  epochs with L1 on γ, pruned, k epochs of fine-tuning.

The unpruned model, the default PSP rows (channel and group) and the two baselines (ℓ1-norm,
BN-slimming) run `--seeds` seeds at the first target; the other rows and the
second target one seed. Every final model (seed 0) is converted to a
float32 LiteRT file and timed at batch 1 in one interleaved loop. Writes
results.json, accuracy_vs_flops.png, accuracy_vs_latency.png,
alpha_histograms.png and the .tflite files to --out, and RESULTS.md to
--results.

    python examples/fashion_mnist_study.py                   # the study (about an hour)
    python examples/fashion_mnist_study.py --quick           # smoke run, a few minutes
    python examples/fashion_mnist_study.py --methods baseline,trained_default_channel,l1norm
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from study import baselines, psp_runs, report  # noqa: E402
from study.common import (  # noqa: E402
    Config,
    accuracy,
    build_resnet,
    compile_sgd,
    costs,
    fit,
    litert_accuracy,
    load_data,
    save_tflite,
    tflite_bytes,
)
from study.markdown import results_markdown  # noqa: E402

METHODS = ("baseline", *psp_runs.VARIANTS, "l1norm", "bnslim", "tfmot")
#: The rows of a default run.
DEFAULT_METHODS = ("baseline", "trained_default_channel", "trained_default_column",
                   "trained_l2_channel", "trained_l2_column", "trained_l1_channel",
                   "trained_l1_column", "scratch_default_channel", "scratch_l2_channel",
                   "trained_default_group", "scratch_default_group", "l1norm", "bnslim", "tfmot")
#: Rows with `--seeds` seeds at the first target, and the only rows at the others.
SEEDED = ("baseline", "trained_default_channel", "scratch_default_channel",
          "trained_default_group", "scratch_default_group", "l1norm", "bnslim")
QUICK = {"train_limit": 384, "test_limit": 500, "epochs": 1, "finetune_epochs": 1, "seeds": 1,
         "rounds": 5}
FULL = {"train_limit": Config.train_limit, "test_limit": None, "epochs": Config.epochs,
        "finetune_epochs": Config.finetune_epochs, "seeds": 3, "rounds": 100}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK} (explicit flags win)")
    p.add_argument("--out", default=None, help="output folder (default runs/fashion_mnist_study)")
    p.add_argument("--results", default=None,
                   help="RESULTS.md path (default RESULTS.md; with --quick, OUT/RESULTS.md)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (the baseline always runs)")
    p.add_argument("--targets", default="0.5,0.3", help="FLOPs fractions to match")
    p.add_argument("--train-limit", type=int, default=None,
                   help=f"first N training images; 0: all 60000 (default {FULL['train_limit']})")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"N: training epochs of the unpruned model and BN-slimming "
                        f"(default {FULL['epochs']})")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"k: epochs every method gets after the N (fine-tuning, or PSP's "
                        f"pruning of the trained model; default {FULL['finetune_epochs']})")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds of {', '.join(SEEDED)} at the first target "
                        f"(default {FULL['seeds']})")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--finetune-lr", type=float, default=Config.finetune_lr,
                   help="peak learning rate of the k epochs, every method")
    p.add_argument("--bn-l1", type=float, default=None,
                   help="network slimming's L1 on γ (default: scaled to the run's length)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved LiteRT rounds")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in FULL.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    args.targets = [float(t) for t in args.targets.split(",")]
    args.out = args.out or "runs/fashion_mnist_study"
    args.results = args.results or (os.path.join(args.out, "RESULTS.md") if args.quick
                                    else "RESULTS.md")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_tfmot(base: keras.Model, data, config: Config, out: str) -> dict:
    """The tfmot rows, in a subprocess (tf_keras); returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {f"{layer.name}/{i}": np.asarray(w) for layer in base.layers
                  for i, w in enumerate(layer.get_weights())}
        np.savez(os.path.join(tmp, "weights.npz"), **arrays)
        np.savez(os.path.join(tmp, "data.npz"),
                 x_train=np.round(data.x_train * 255).astype("uint8"), y_train=data.y_train,
                 x_test=np.round(data.x_test * 255).astype("uint8"), y_test=data.y_test)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study", "tfmot_run.py")
        command = [sys.executable, script, "--data", os.path.join(tmp, "data.npz"),
                   "--weights", os.path.join(tmp, "weights.npz"), "--out", out,
                   "--depth", str(config.depth), "--widths", ",".join(map(str, config.widths)),
                   "--stem-stride", str(config.stem_stride),
                   "--epochs", str(config.finetune_epochs), "--lr", str(config.finetune_lr),
                   "--batch-size", str(config.batch_size)]
        subprocess.run(command, check=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    with open(os.path.join(out, "tfmot.json")) as f:
        return json.load(f)


def seeds_for(method: str, target, args) -> int:
    """`--seeds` for the SEEDED rows at the first target, else 1."""
    first = target is None or target == args.targets[0]
    return args.seeds if method in SEEDED and first else 1


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if "tfmot" in args.methods:
        import importlib.util

        if importlib.util.find_spec("tensorflow_model_optimization") is None:
            raise SystemExit("fashion_mnist_study: the tfmot rows need tensorflow-model-"
                             "optimization and tf_keras: pip install -e .[tfmot] (or leave "
                             "tfmot out of --methods).")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # tf.function retracing notes of many small models
    started, load_start = time.perf_counter(), os.getloadavg()
    config = Config(train_limit=args.train_limit or None, test_limit=args.test_limit,
                    epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                    batch_size=args.batch_size, finetune_lr=args.finetune_lr,
                    bn_l1=args.bn_l1, verbose=args.verbose)
    data = load_data(config)
    models_dir = os.path.join(args.out, "tflite")
    os.makedirs(models_dir, exist_ok=True)
    log(f"{len(data.x_train)} training / {len(data.x_test)} test images, N={config.epochs} + "
        f"k={config.finetune_epochs} epochs, methods {', '.join(args.methods)}, targets "
        f"{args.targets}")
    rows, tflite, extras = [], {}, {}

    def add(row, model, seed_index):
        rows.append(row)
        key = report.latency_key(row["method"], row.get("target"))
        if seed_index == 0 and model is not None:
            tflite[key] = tflite_bytes(model)
            save_tflite(tflite[key], models_dir, key.replace("@", "_"))
        log(f"{key} seed {row['seed']}: accuracy {row['accuracy']:.2f} %, FLOPs "
            f"{row['flops'] / reference['flops']:.3f}")

    def attempt(what, fn):
        try:
            return fn()
        except Exception as error:  # one failed row must not sink the study
            traceback.print_exc()
            rows.append({**what, "error": f"{type(error).__name__}: {error}"[:500]})
            log(f"FAILED {what}: {error}")
            return None

    trained, reference = {}, None
    for seed in range(max(seeds_for("baseline", None, args),
                          *(seeds_for(m, args.targets[0], args) for m in args.methods))):
        model = build_resnet(config, seed)
        compile_sgd(model, config, data, config.lr, config.epochs)
        seconds = fit(model, config, data, config.epochs, seed)
        trained[seed] = model
        reference = reference or costs(model)
        log(f"trained seed {seed}: {accuracy(model, data):.2f} % after N={config.epochs} epochs")
        if seed < seeds_for("baseline", None, args):
            tuned = keras.models.clone_model(model)
            tuned.set_weights(model.get_weights())
            before = accuracy(model, data)
            seconds += baselines.finetune(tuned, config, data, seed)
            add({"method": "baseline", "target": None, "seed": seed,
                 "accuracy": accuracy(tuned, data), "accuracy_before_finetune": before,
                 "train_seconds": seconds, **costs(tuned)}, tuned, seed)

    histograms = {}
    for variant in psp_runs.VARIANTS:
        if variant not in args.methods:
            continue
        for target in args.targets:
            if target != args.targets[0] and variant not in SEEDED:
                continue
            for seed in range(seeds_for(variant, target, args)):
                def one(variant=variant, target=target, seed=seed):
                    row, small = psp_runs.run(config, data, trained[seed], seed, variant,
                                              target)
                    add(row, small, seed)
                    if seed == 0 and target == args.targets[0] and row["structure"] == "channel":
                        histograms[variant] = row
                attempt({"method": variant, "target": target, "seed": seed}, one)

    pruned = []
    if "l1norm" in args.methods:
        for seed in range(seeds_for("l1norm", args.targets[0], args)):
            pruned.append(("l1norm", seed, trained[seed],
                           baselines.l1norm_scores(trained[seed]), "uniform"))
    if "bnslim" in args.methods:
        for seed in range(seeds_for("bnslim", args.targets[0], args)):
            result = attempt({"method": "bnslim", "target": None, "seed": seed},
                             lambda seed=seed: baselines.train_bn_slimming(config, data, seed))
            if result:
                extras.setdefault("bnslim", []).append(result[1])
                pruned.append(("bnslim", seed, result[0], baselines.gamma_scores(result[0]),
                               "global"))
    for method, seed, plain, scores, rule in pruned:
        for target in args.targets:
            if seed >= seeds_for(method, target, args):
                continue
            def one(method=method, seed=seed, plain=plain, scores=scores, rule=rule,
                    target=target):
                row, small = baselines.pruned_row(method, plain, scores, rule, target, config,
                                                  data, seed)
                add(row, small, seed)
            attempt({"method": method, "target": target, "seed": seed}, one)

    if "tfmot" in args.methods:
        def tfmot_rows():
            result = run_tfmot(trained[0], data, config, models_dir)
            extras["tfmot_dense"] = result.pop("dense")
            for name, row in result.items():
                with open(os.path.join(models_dir, f"{name}.tflite"), "rb") as f:
                    tflite[name] = f.read()
                rows.append({"method": name, "target": None, "seed": 0, **row})
                log(f"{name}: accuracy {row['accuracy']:.2f} % (before FT "
                    f"{row['accuracy_before_finetune']:.2f} %)")
        attempt({"method": "tfmot", "target": None, "seed": 0}, tfmot_rows)

    log(f"LiteRT: {len(tflite)} models, {args.rounds} interleaved rounds")
    latency = report.litert_latency(tflite, args.rounds)
    litert_acc = {k: litert_accuracy(c, data, limit=min(500, len(data.x_test)))
                  for k, c in tflite.items()}
    table = report.aggregate(rows, reference, latency)
    os.makedirs(args.out, exist_ok=True)
    figures = {
        "accuracy_vs_flops": report.plot_accuracy_vs_flops(
            table, os.path.join(args.out, "accuracy_vs_flops.png")),
        "accuracy_vs_latency": report.plot_accuracy_vs_latency(
            table, os.path.join(args.out, "accuracy_vs_latency.png")),
    }
    panels = [(f"{report.LABELS[v]}, target {r['target']:g}", np.asarray(r["relative_alpha"]),
               None, r["cut_fraction"], r["separation"]) for v, r in histograms.items()]
    if panels:
        figures["alpha_histograms"] = report.plot_alpha_histograms(
            panels, os.path.join(args.out, "alpha_histograms.png"))
    elapsed = time.perf_counter() - started
    summary = {
        "command": f"python examples/fashion_mnist_study.py {shlex.join(argv)}".strip(),
        "machine": report.machine(), "load_average": {"start": load_start,
                                                      "end": os.getloadavg()},
        "elapsed_seconds": elapsed, "quick": args.quick,
        "settings": {**vars(args), "train_images": len(data.x_train),
                     "test_images": len(data.x_test), "depth": config.depth,
                     "widths": config.widths, "stem_stride": config.stem_stride,
                     "lr": config.lr, "finetune_lr": config.finetune_lr,
                     "seeded": list(SEEDED)},
        "reference": reference, "table": table, "rows": rows, "latency_ms": latency,
        "litert_accuracy_first_500": litert_acc, "extras": extras, "figures": figures,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    markdown = results_markdown(summary, args.results)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        f.write(markdown)
    log(f"done in {elapsed / 60:.1f} min: {args.results}, {args.out}/results.json")
    print(report.markdown_table(table))
    lines = {(t["method"], t["target"]): t for t in table}
    base, psp = lines.get(("baseline", None)), lines.get(("trained_default_channel",
                                                          args.targets[0]))
    if base and psp and psp["accuracy"] is not None:
        print(f"key ratio: PSP default from the trained model at {psp['flops_fraction']:.3f}× "
              f"FLOPs, {_ratio(psp['latency_ratio'])} LiteRT latency: accuracy "
              f"{psp['accuracy'] - base['accuracy']:+.2f} points against unpruned")
    return summary


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}×"


if __name__ == "__main__":
    main()
