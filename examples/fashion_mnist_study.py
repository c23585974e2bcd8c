"""PSP against ℓ1-norm, network slimming and tfmot on Fashion-MNIST, on a CPU.

The main job's ResNet-8 (16-32-64, stride-2 stem) on a subset of
Fashion-MNIST, side by side at matched FLOPs reductions (0.5 and 0.3 of the
unpruned FLOPs by default):

- the unpruned baseline (`--seeds` seeds);
- PSP with weight decay on α, `channel` (`--seeds` seeds), `column` and
  `layer` structures, and PSP with L1 on α (`channel`): trained from the
  baseline's initialisation with `keras_psp.FlopsBudget(target)`, slimmed,
  no fine-tuning;
- the ℓ1-norm filter criterion (Li et al. 2017) and BN-scale network
  slimming (Liu et al. 2017), pruned by keras_psp's surgery to the FLOPs
  closest to the target, then fine-tuned;
- tensorflow-model-optimization magnitude pruning at 50 % and 2:4
  structured sparsity, fine-tuned, in tf_keras in its own process.

Every final model is converted to a float32 LiteRT file and timed at batch 1
in one interleaved loop. Writes results.json, accuracy_vs_flops.png,
alpha_hist_wd_vs_l1.png and the .tflite files to --out, and RESULTS.md to
--results.

Sized for a 2-core CPU: the first 10 000 training images (all 10 000 test
images), batch 64, 10 training epochs and 3 fine-tuning epochs, 3 seeds for
the baseline and PSP `channel`, 1 for the rest: 16 trainings and 6
fine-tunings of the 2.55-MFLOP ResNet-8. Measured: 26.3 minutes on the
2-core machine (load average 1.5; RESULTS.md). At batch 128 (79 steps an
epoch) FlopsBudget did not reach 0.5× FLOPs in 10 epochs.

    python examples/fashion_mnist_study.py                   # the study
    python examples/fashion_mnist_study.py --quick           # smoke run, a few minutes
    python examples/fashion_mnist_study.py --methods baseline,psp_channel,l1norm --targets 0.5
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

import keras_psp  # noqa: E402

METHODS = ("baseline", "psp_channel", "psp_column", "psp_layer", "psp_l1", "l1norm", "bnslim",
           "tfmot")
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
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (the baseline always runs)")
    p.add_argument("--targets", default="0.5,0.3", help="FLOPs fractions to match")
    p.add_argument("--train-limit", type=int, default=None,
                   help=f"first N training images; 0: all 60000 (default {FULL['train_limit']})")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs, baseline and PSP (default {FULL['epochs']})")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"fine-tuning epochs of ℓ1-norm, BN-slim, tfmot "
                        f"(default {FULL['finetune_epochs']})")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds of the baseline and PSP channel (default {FULL['seeds']})")
    p.add_argument("--other-seeds", type=int, default=1, help="seeds of the other PSP rows")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--strength", type=float, default=Config.strength,
                   help="initial α strength of PSP, L2 and L1 (FlopsBudget adapts it; "
                        "default keras_psp's 2e-2)")
    p.add_argument("--max-strength-factor", type=float, default=Config.max_strength_factor,
                   help="FlopsBudget max_strength = this × the initial strength "
                        "(default FlopsBudget's own)")
    p.add_argument("--match-tolerance", type=float, default=Config.match_tolerance,
                   help="PSP: move the threshold after training if FlopsBudget ends further "
                        "than this from the target")
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
    if args.seeds < 1 or args.other_seeds < 1:
        p.error("--seeds and --other-seeds must be at least 1")
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


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # tf.function retracing notes of many small models
    started, load_start = time.perf_counter(), os.getloadavg()
    config = Config(train_limit=args.train_limit or None, test_limit=args.test_limit,
                    epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                    batch_size=args.batch_size, strength=args.strength,
                    max_strength_factor=args.max_strength_factor, bn_l1=args.bn_l1,
                    match_tolerance=args.match_tolerance,
                    verbose=args.verbose)
    data = load_data(config)
    models_dir = os.path.join(args.out, "tflite")
    os.makedirs(models_dir, exist_ok=True)
    log(f"{len(data.x_train)} training / {len(data.x_test)} test images, {config.epochs} epochs, "
        f"methods {', '.join(args.methods)}, targets {args.targets}")
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

    base0, reference = None, None
    for seed in range(args.seeds):
        model = build_resnet(config, seed)
        compile_sgd(model, config, data, config.lr, config.epochs)
        seconds = fit(model, config, data, config.epochs, seed)
        if base0 is None:
            base0, reference = model, costs(model)
        add({"method": "baseline", "target": None, "seed": seed, "accuracy": accuracy(model, data),
             "train_seconds": seconds, **costs(model)}, model, seed)

    def deploy_variants(model, target):
        """The same pruned network, slimmed for CPU runtimes (README: "Does slimming pay?")."""
        for options in ({"gather": False}, {"gather": False, "multiple_of": 8}):
            key = f"psp_channel@{target:g} " + ", ".join(f"{k}={v}" for k, v in options.items())
            small = keras_psp.slim(model, **options)
            tflite[key] = tflite_bytes(small)
            extras.setdefault("deploy_variants", {})[key] = {
                "target": target, "options": options,
                "flops_fraction": keras_psp.count_flops(small) / reference["flops"],
                "params": small.count_params()}

    histograms = {}
    for variant in psp_runs.VARIANTS:
        if variant not in args.methods:
            continue
        seeds = args.seeds if variant == "psp_channel" else args.other_seeds
        for target in args.targets:
            for seed in range(seeds):
                def one(variant=variant, target=target, seed=seed):
                    row, model, small = psp_runs.train_psp(config, data, seed, variant, target)
                    add(row, small, seed)
                    if seed == 0 and variant == "psp_channel":
                        deploy_variants(model, target)
                    if seed == 0 and variant in ("psp_channel", "psp_l1"):
                        histograms.setdefault(variant, (target, row["relative_alpha"],
                                                        row["cut_fraction"], row["separation"]))
                attempt({"method": variant, "target": target, "seed": seed}, one)

    pruned = []
    if "l1norm" in args.methods:
        pruned.append(("l1norm", base0, baselines.l1norm_scores(base0), "uniform"))
    if "bnslim" in args.methods:
        trained = attempt({"method": "bnslim", "target": None, "seed": 0},
                          lambda: baselines.train_bn_slimming(config, data, 0))
        if trained:
            extras["bnslim"] = trained[1]
            pruned.append(("bnslim", trained[0], baselines.gamma_scores(trained[0]), "global"))
    for method, plain, scores, rule in pruned:
        for target in args.targets:
            def one(method=method, plain=plain, scores=scores, rule=rule, target=target):
                row, small = baselines.pruned_row(method, plain, scores, rule, target, config,
                                                  data, 0)
                add(row, small, 0)
            attempt({"method": method, "target": target, "seed": 0}, one)

    if "tfmot" in args.methods:
        def tfmot_rows():
            result = run_tfmot(base0, data, config, models_dir)
            extras["tfmot_dense"] = result.pop("dense")
            with open(os.path.join(models_dir, "tfmot_dense.tflite"), "rb") as f:
                tflite["tfmot_dense"] = f.read()
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
    figures = {"accuracy_vs_flops": report.plot_accuracy_vs_flops(
        table, os.path.join(args.out, "accuracy_vs_flops.png"))}
    names = {"psp_channel": "weight decay (L2)", "psp_l1": "L1"}
    panels = [(f"{names[v]} on α, channel, target {histograms[v][0]:g}",
               np.asarray(histograms[v][1]), keras_psp.wrapper.DEFAULT_THRESHOLD,
               histograms[v][2], histograms[v][3]) for v in names if v in histograms]
    if panels:
        figures["alpha_hist_wd_vs_l1"] = report.plot_alpha_histograms(
            panels, os.path.join(args.out, "alpha_hist_wd_vs_l1.png"))
    elapsed = time.perf_counter() - started
    summary = {
        "command": f"python examples/fashion_mnist_study.py {shlex.join(argv)}".strip(),
        "machine": report.machine(), "load_average": {"start": load_start,
                                                      "end": os.getloadavg()},
        "elapsed_seconds": elapsed, "quick": args.quick,
        "settings": {**vars(args), "train_images": len(data.x_train),
                     "test_images": len(data.x_test), "depth": config.depth,
                     "widths": config.widths, "stem_stride": config.stem_stride,
                     "lr": config.lr, "finetune_lr": config.finetune_lr},
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
    return summary


if __name__ == "__main__":
    main()
