"""Does slimming pay? CIFAR ResNet-56 latency after `slim`, side by side.

1. No overhead left behind: a slimmed ResNet-56 (stream and inner widths cut
   to 70 %, so no gathers) against the same network built by hand with
   `cifar_resnet(widths=..., inner_widths=...)`; the ratio should be ≤ 1.02.
2. Real speedup at about half the FLOPs: the unpruned ResNet-56 against
   (a) those uniform widths and (b) independent per-layer `channel` α cuts
   (consumers gather their own inputs from the residual stream), the latter
   also with `gather=False`, `multiple_of=8` and both; reported against the
   FLOPs ratio.
3. Group α (`wrap(structure="group")`): one α per coupled channel, set at
   random and cut by `prune_to(flops=0.5, multiple_of=8)`: no gathers and
   aligned widths, against the same widths built by hand (`--group-only`
   runs just these rows); `--applications`: keras.applications MobileNetV2
   and ResNet50 at 128² with group α (XLA at batch 8 there).
4. tensorflow-model-optimization's magnitude pruning at 50 % sparsity, in
   tf_keras, exported to TFLite, in its own process (`tfmot_baseline.py`):
   unstructured zeros, same dense kernels.

XLA: TensorFlow, jit_compile, batch 128. LiteRT: ai-edge-litert interpreter,
batch 1, one thread. Interleaved A B A B ..., medians.

    python benchmarks/slim_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _deploy import litert_predict, litert_runner, tflite_bytes, xla_runner  # noqa: E402
from _timing import interleaved, median, print_table  # noqa: E402

from keras_psp import count_flops, slim, wrap  # noqa: E402
from keras_psp.graph import flatten  # noqa: E402
from keras_psp.models import cifar_resnet  # noqa: E402

DEPTH, WIDTHS = 56, (16, 32, 64)
BLOCKS = (DEPTH - 2) // 6


def stream_readers(stage: int) -> list[str]:
    """Layers reading the residual stream of `stage` (1-based)."""
    first = 1 if stage == 1 else 2  # block 1 of stages 2, 3 reads the previous stream
    names = [f"s{stage}b{b}a_conv" for b in range(first, BLOCKS + 1)]
    return names + ([f"s{stage + 1}b1a_conv", f"s{stage + 1}b1p_conv"] if stage < 3 else ["logits"])


def uniform_cut(keep: float, rng) -> tuple[keras.Model, tuple, list]:
    """Wrapped ResNet-56 whose stream and inner widths are cut to `keep`."""
    model = wrap(cifar_resnet(DEPTH, WIDTHS))
    stream, inner = [], []
    for stage, width in enumerate(WIDTHS, start=1):
        cut = rng.choice(width, width - round(keep * width), replace=False)
        for name in stream_readers(stage):
            layer = model.get_layer(name)
            alpha = keras.ops.convert_to_numpy(layer.alpha).copy()
            alpha[cut] = 0.0
            layer.alpha.assign(alpha)
        stream.append(width - len(cut))
        for block in range(1, BLOCKS + 1):
            layer = model.get_layer(f"s{stage}b{block}b_conv")
            alpha = np.ones(width, "float32")
            alpha[rng.choice(width, width - round(keep * width), replace=False)] = 0.0
            layer.alpha.assign(alpha * keras.ops.convert_to_numpy(layer.alpha))
            inner.append(round(keep * width))
    return model, tuple(stream), inner


def per_layer_cut(cut: float, rng) -> keras.Model:
    """Wrapped ResNet-56 with `cut` of every layer's channel α set to 0."""
    from keras_psp.cloning import psp_layers

    model = wrap(cifar_resnet(DEPTH, WIDTHS))
    for layer in psp_layers(model):
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        alpha.flat[rng.integers(alpha.size)] = 1.0
        layer.alpha.assign(alpha)
    return model


def gathers(model) -> int:
    return sum(type(op.layer).__name__ == "Take" for op in flatten(model).ops)


def group_cut(flops: float, multiple_of: int | None, rng) -> tuple[keras.Model, keras.Model]:
    """Wrapped ResNet-56 with random group α cut by `prune_to`, and the same
    widths built by hand."""
    from keras_psp import prune_to
    from keras_psp.groups import group_views

    model = wrap(cifar_resnet(DEPTH, WIDTHS), structure="group")
    for group in group_views(model):
        group.alpha.assign(rng.uniform(0.1, 1.0, group.alpha.shape).astype("float32"))
    prune_to(model, flops, multiple_of=multiple_of)
    small = slim(model)
    filters = {layer.name: layer.filters for layer in small.layers if hasattr(layer, "filters")}
    stream = tuple(filters[f"s{s}b1b_conv"] for s in (1, 2, 3))
    inner = [filters[f"s{s}b{b}a_conv"] for s in (1, 2, 3) for b in range(1, BLOCKS + 1)]
    return model, cifar_resnet(DEPTH, stream, inner_widths=inner)


def group_rows(x128, x1, rounds: int) -> None:
    """Group α against the unpruned and the hand-built ResNet-56."""
    base = cifar_resnet(DEPTH, WIDTHS)
    models = {"unpruned": base}
    for label, multiple in (("group, multiple_of=8", 8), ("group, any width", None)):
        wrapped, hand = group_cut(0.5, multiple, np.random.default_rng(2))
        models[label] = slim(wrapped, check_inputs=x128[:8])
        models[f"  hand-built ({label.split(', ')[1]})"] = hand
    t = latencies(models, x128, x1, rounds)
    flops = {k: count_flops(m) for k, m in models.items()}
    rows = []
    for k, m in models.items():
        ratio = flops[k] / flops["unpruned"]
        xla, lite = t["unpruned"][0] / t[k][0], t["unpruned"][1] / t[k][1]
        rows.append((k, f"{ratio:.3f}", gathers(m), f"{t[k][0]:.1f}", f"{t[k][1]:.2f}",
                     f"{xla:.2f}x", f"{lite:.2f}x", f"{xla * ratio:.2f}", f"{lite * ratio:.2f}"))
    print_table(f"ResNet-56 group α cut to 0.5x FLOPs; medians of {rounds} XLA / {rounds * 2} "
                "LiteRT rounds", rows,
                ("model", "FLOPs ratio", "gathers", "XLA b128 ms", "LiteRT b1 ms",
                 "XLA speedup", "LiteRT speedup", "XLA of ideal", "LiteRT of ideal"))
    key = "group, multiple_of=8"
    hand = "  hand-built (multiple_of=8)"
    print(f"\ngroup slim / hand-built latency: XLA b128 {t[key][0] / t[hand][0]:.3f}, "
          f"LiteRT b1 {t[key][1] / t[hand][1]:.3f}")
    print(f"group α (multiple_of=8) speedup: XLA b128 {t['unpruned'][0] / t[key][0]:.2f}x, "
          f"LiteRT b1 {t['unpruned'][1] / t[key][1]:.2f}x at {flops[key] / flops['unpruned']:.3f}"
          " of the FLOPs")


def application_rows(rounds: int) -> None:
    """keras.applications MobileNetV2 and ResNet50 (128², `weights=None`), random
    group α cut by `prune_to(flops=0.5)` (blocks of 8), against unpruned."""
    from keras_psp import prune_to
    from keras_psp.groups import group_views

    rng = np.random.default_rng(3)
    x8 = rng.random((8, 128, 128, 3)).astype("float32")
    rows = []
    for name in ("MobileNetV2", "ResNet50"):
        base = getattr(keras.applications, name)(weights=None, input_shape=(128, 128, 3))
        model = wrap(base, structure="group")
        for group in group_views(model):
            group.alpha.assign(rng.uniform(0.1, 1.0, group.alpha.shape).astype("float32"))
        prune_to(model, 0.5)
        small = slim(model, check_inputs=x8[:2])
        t = latencies({"unpruned": base, "group": small}, x8, x8[:1], rounds)
        ratio = count_flops(small) / count_flops(base)
        rows.append((name, f"{ratio:.3f}", gathers(small), f"{t['unpruned'][0]:.1f}",
                     f"{t['group'][0]:.1f}", f"{t['unpruned'][0] / t['group'][0]:.2f}x",
                     f"{t['unpruned'][1]:.2f}", f"{t['group'][1]:.2f}",
                     f"{t['unpruned'][1] / t['group'][1]:.2f}x"))
    print_table(f"keras.applications at 128², group α cut to 0.5x FLOPs; medians of {rounds} "
                f"XLA (batch 8) / {rounds * 2} LiteRT (batch 1) rounds", rows,
                ("model", "FLOPs ratio", "gathers", "XLA b8 ms", "group", "XLA speedup",
                 "LiteRT b1 ms", "group", "LiteRT speedup"))


def latencies(models: dict, x128, x1, rounds: int) -> dict:
    xla = interleaved({k: xla_runner(m, x128) for k, m in models.items()}, rounds)
    lite = interleaved(
        {k: litert_runner(tflite_bytes(m), x1) for k, m in models.items()}, rounds * 2
    )
    return {k: (median(xla[k]) * 1e3, median(lite[k]) * 1e3 / 10) for k in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-tfmot", action="store_true")
    parser.add_argument("--group-only", action="store_true", help="only the group α rows")
    parser.add_argument("--applications", action="store_true",
                        help="only MobileNetV2 and ResNet50 with group α")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only slim vs hand-built, with twice the rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    x128 = rng.random((128, 32, 32, 3)).astype("float32")
    x1 = x128[:1]
    if args.group_only:
        group_rows(x128, x1, rounds)
        return
    if args.applications:
        application_rows(rounds)
        return

    wrapped, stream, inner = uniform_cut(0.7, rng)
    uniform = slim(wrapped, check_inputs=x128[:8])
    hand = cifar_resnet(DEPTH, stream, inner_widths=inner)
    assert gathers(uniform) == 0 and uniform.count_params() == hand.count_params()
    if args.overhead_only:
        t = latencies({"hand-built": hand, "slim uniform": uniform}, x128, x1, rounds * 2)
        print_table(f"slim vs hand-built ResNet-56, medians of {rounds * 2} XLA / "
                    f"{rounds * 4} LiteRT rounds",
                    [(k, f"{v[0]:.1f}", f"{v[1]:.2f}") for k, v in t.items()],
                    ("model", "XLA b128 ms", "LiteRT b1 ms"))
        print(f"\nslim / hand-built latency: XLA b128 "
              f"{t['slim uniform'][0] / t['hand-built'][0]:.3f}, LiteRT b1 "
              f"{t['slim uniform'][1] / t['hand-built'][1]:.3f}")
        return
    cut = 0.0
    for cut in np.arange(0.3, 0.6, 0.05):  # the per-layer cut closest to half the FLOPs
        layered_wrapped = per_layer_cut(float(cut), np.random.default_rng(1))
        layered = slim(layered_wrapped, check_inputs=x128[:8])
        if count_flops(layered) <= 0.52 * count_flops(cifar_resnet(DEPTH, WIDTHS)):
            break
    base = cifar_resnet(DEPTH, WIDTHS)
    lite = litert_predict(tflite_bytes(layered), x1)
    assert np.abs(lite - np.asarray(layered(x1))).max() < 1e-4, "LiteRT differs"

    models = {"unpruned": base, "hand-built": hand, "slim uniform": uniform,
              "slim per-layer": layered,
              "  gather=False": slim(layered_wrapped, gather=False),
              "  multiple_of=8": slim(layered_wrapped, multiple_of=8),
              "  both": slim(layered_wrapped, gather=False, multiple_of=8)}
    t = latencies(models, x128, x1, rounds)
    flops = {k: count_flops(m) for k, m in models.items()}
    rows = [
        (k, f"{flops[k] / 1e6:.1f}", f"{m.count_params():,}", gathers(m),
         f"{t[k][0]:.1f}", f"{t[k][1]:.2f}")
        for k, m in models.items()
    ]
    print_table(
        f"ResNet-56, CIFAR input (per-layer cut {cut:.2f}); medians of {rounds} XLA / "
        f"{rounds * 2} LiteRT rounds",
        rows, ("model", "MFLOPs", "params", "gathers", "XLA b128 ms", "LiteRT b1 ms"),
    )
    overhead = (t["slim uniform"][0] / t["hand-built"][0], t["slim uniform"][1] / t["hand-built"][1])
    speed = [
        (k, f"{flops[k] / flops['unpruned']:.3f}",
         f"{t['unpruned'][0] / t[k][0]:.2f}x", f"{t['unpruned'][1] / t[k][1]:.2f}x")
        for k in list(models)[2:]
    ]
    if not args.skip_tfmot:
        script = os.path.join(os.path.dirname(__file__), "tfmot_baseline.py")
        result = subprocess.run(
            [sys.executable, script, "--json"] + (["--quick"] if args.quick else []),
            capture_output=True, text=True, check=True,
        )
        tfmot = json.loads(result.stdout.strip().splitlines()[-1])
        for name in ("pruned", "pruned_sparse"):
            speed.append((f"tfmot 50 % ({tfmot[name + '_label']})", "1.000 (dense)", "n/a",
                          f"{tfmot['unpruned_ms'] / tfmot[name + '_ms']:.2f}x"))
    print_table("Speedup against the unpruned ResNet-56", speed,
                ("model", "FLOPs ratio", "XLA b128 speedup", "LiteRT b1 speedup"))
    print(f"\nslim / hand-built latency: XLA b128 {overhead[0]:.3f}, LiteRT b1 {overhead[1]:.3f}")
    group_rows(x128, x1, rounds)


if __name__ == "__main__":
    main()
