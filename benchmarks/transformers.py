"""Transformers: `slim` time on keras_hub backbones, and what pruning buys at deployment.

1. `slim` wall time on keras_hub BERT, ViT and Gemma backbones (random weights,
   built from their classes; composites opened by `wrap`, Gemma's decoder
   blocks pruned whole), each with 40 % of its α cut at random: median of
   `--repeats`, and the FLOPs after over before.
2. LiteRT batch-1 latency (one thread) of a ViT of stock Keras layers (the
   one `examples/fashion_mnist_vit.py` trains; random weights here, heads and
   MLP neurons cut to `--target` of the FLOPs by `keras_psp.prune_to`) against
   the dense one, interleaved rounds, medians; XLA batch 128 too.

    python benchmarks/transformers.py [--repeats 5] [--target 0.5] [--rounds 15]

The last line is the key ratio: the slim ViT's LiteRT latency over the dense one's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

import hub_models  # noqa: E402  (tests/: the tiny keras_hub backbones)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from _deploy import litert_runner, tflite_bytes, xla_runner  # noqa: E402
from _timing import interleaved, median, print_table  # noqa: E402
from fashion_mnist_vit import vit  # noqa: E402

import keras_psp  # noqa: E402
from helpers import cut_exactly  # noqa: E402  (tests/)
from keras_psp.cloning import psp_layers  # noqa: E402

STRUCTURES = {"MultiHeadAttention": "head", "GemmaDecoderBlock": "block", "Layer": "channel"}
BACKBONES = ("bert", "vit_wide", "gemma_gqa")


def slim_times(repeats: int) -> list[tuple]:
    rows = []
    for name in BACKBONES:
        model, x = getattr(hub_models, name)()
        shape = {k: v.shape[1:] for k, v in x.items()} if isinstance(x, dict) else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # keras_hub layers with broken configs
            wrapped = keras_psp.wrap(model, structure=STRUCTURES)
            cut_exactly(wrapped)
            small = keras_psp.slim(wrapped, check_inputs=x)  # verified once
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                keras_psp.slim(wrapped)
                times.append(time.perf_counter() - start)
        ratio = (keras_psp.count_flops(small, input_shape=shape)
                 / keras_psp.count_flops(model, input_shape=shape))
        rows.append((name, len(model.layers), f"{median(times):.2f}", f"{ratio:.3f}"))
    return rows


def vit_latency(target: float, rounds: int) -> dict:
    keras.utils.set_random_seed(0)
    dense = vit()
    mlp_out = [layer.name for layer in dense.layers if layer.name.endswith("_mlp_out")]
    wrapped = keras_psp.wrap(dense, structure={"MultiHeadAttention": "head", "Dense": "channel"},
                             layers=lambda layer: isinstance(layer, keras.layers.MultiHeadAttention)
                             or layer.name in mlp_out)
    rng = np.random.default_rng(0)
    for layer in psp_layers(wrapped):  # α as training might leave them
        layer.alpha.assign(rng.uniform(0.1, 1.0, size=layer.alpha.shape).astype("float32"))
    keras_psp.prune_to(wrapped, flops=target)
    x = rng.random((128, 28, 28, 1)).astype("float32")
    small = keras_psp.slim(wrapped, check_inputs=x[:16])
    one = x[:1]
    files = {"dense": tflite_bytes(dense), "slim": tflite_bytes(small)}
    cases = {f"litert {k}": litert_runner(v, one) for k, v in files.items()}
    cases.update({"xla dense": xla_runner(dense, x), "xla slim": xla_runner(small, x)})
    times = interleaved(cases, rounds)
    ms = {k: median(v) * 1e3 / (10 if k.startswith("litert") else 1) for k, v in times.items()}
    heads = [layer.num_heads for layer in small.layers
             if isinstance(layer, keras.layers.MultiHeadAttention)]
    return {"ms": ms, "flops": keras_psp.count_flops(small) / keras_psp.count_flops(dense),
            "heads": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print_table(f"slim wall time, keras_hub backbones, 40 % of α cut, median of {args.repeats}",
                slim_times(args.repeats), ("backbone", "layers", "seconds", "FLOPs after/before"))
    result = vit_latency(args.target, args.rounds)
    ms = result["ms"]
    rows = [("LiteRT batch 1 (ms)", f"{ms['litert dense']:.4f}", f"{ms['litert slim']:.4f}",
             f"{ms['litert slim'] / ms['litert dense']:.3f}"),
            ("XLA batch 128 (ms)", f"{ms['xla dense']:.3f}", f"{ms['xla slim']:.3f}",
             f"{ms['xla slim'] / ms['xla dense']:.3f}")]
    print_table(f"stock-layer ViT (examples/fashion_mnist_vit.py), heads and MLP neurons cut to "
                f"{result['flops']:.3f}× FLOPs (heads per block {result['heads']}); "
                f"interleaved, medians of {args.rounds}", rows,
                ("latency", "dense", "slim", "slim / dense"))
    print(f"\nslim ViT LiteRT batch-1 latency / dense: {rows[0][3]}")


if __name__ == "__main__":
    main()
