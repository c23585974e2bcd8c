"""Deployment latency: dense vs slim CIFAR ResNet-56, SavedModel + XLA and LiteRT.

The dense ResNet-56 (32×32×3, widths 16-32-64) against its slim version: the
model wrapped with `keras_psp.wrap` ("channel" structures), `--cut` (0.4) of
every layer's α set to 0 at random (as in slim_speed.py), then
`keras_psp.slim(gather=False, multiple_of=8)`, the combination that ran
fastest in slim_speed.py. BN statistics are randomized so that the network
computes something non-trivial. Every file is written and verified by
`keras_psp.export`:

- SavedModel with an XLA-compiled serving function (`jit_compile=True`),
  timed at batch 128 through its "serving_default" signature;
- LiteRT float32 and full int8 (float32 inputs/outputs, calibrated on
  random images), timed at batch 1 with one interpreter thread.

Interleaved A B A B ..., medians; file sizes; the int8 files' agreement with
the Keras model. The last line is the slim/dense speedup of each runtime.

    python benchmarks/export_latency.py [--quick] [--rounds 15] [--cut 0.4]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import interleaved, median, print_table  # noqa: E402

import keras_psp  # noqa: E402
from keras_psp.cloning import psp_layers  # noqa: E402
from keras_psp.models import cifar_resnet  # noqa: E402
from keras_psp.runtimes import LiteRTRunner, SavedModelRunner  # noqa: E402

#: LiteRT invokes per timed sample (one batch-1 invoke is well under a millisecond).
INVOKES = 10


def models(depth: int, cut: float, seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """The dense ResNet and its slim version with `cut` of every channel α at 0."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    dense = cifar_resnet(depth, (16, 32, 64))
    for layer in dense.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.1, beta.shape).astype("float32"),
                rng.normal(0, 0.1, mean.shape).astype("float32"),
                rng.uniform(0.5, 1.5, var.shape).astype("float32"),
            ])
    wrapped = keras_psp.wrap(dense)
    for layer in psp_layers(wrapped):
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        alpha.flat[rng.integers(alpha.size)] = 1.0  # every layer keeps something
        layer.alpha.assign(alpha)
    x = rng.random((8, 32, 32, 3)).astype("float32")
    return dense, keras_psp.slim(wrapped, check_inputs=x, gather=False, multiple_of=8)


def write(model: keras.Model, folder: str, name: str, calibration: np.ndarray) -> dict:
    """SavedModel + XLA, LiteRT float32 and int8 files of `model`, with their reports."""
    path = os.path.join(folder, name)
    return {
        "xla": keras_psp.export(model, path + "_saved_model", jit_compile=True),
        "f32": keras_psp.export(model, path + ".tflite", format="tflite"),
        "int8": keras_psp.export(model, path + "_int8.tflite", format="tflite",
                                 quantize="int8", representative_data=calibration),
    }


def _invoker(path: str, x: np.ndarray):
    """A callable running the LiteRT file `INVOKES` times on `x`, one thread."""
    runner = LiteRTRunner(path, threads=1)
    inputs = runner.prepare([x])

    def run():
        for _ in range(INVOKES):
            runner.run(inputs)

    return run


def timings(reports: dict, x_xla: np.ndarray, x_lite: np.ndarray, rounds: int) -> dict:
    """Median ms per call of each model in each runtime, interleaved by runtime."""
    times = {}
    saved = {name: SavedModelRunner(r["xla"].path) for name, r in reports.items()}
    batches = {name: runner.prepare([x_xla]) for name, runner in saved.items()}
    xla = interleaved({n: (lambda n=n: saved[n].run(batches[n])) for n in saved}, rounds)
    for name in reports:
        times[name, "xla"] = median(xla[name]) * 1e3
    for kind in ("f32", "int8"):
        cases = {name: _invoker(r[kind].path, x_lite) for name, r in reports.items()}
        samples = interleaved(cases, rounds * 2)
        for name in reports:
            times[name, kind] = median(samples[name]) * 1e3 / INVOKES
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="ResNet-20, batch 16, 2 rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cut", type=float, default=0.4, help="fraction of α set to 0")
    args = parser.parse_args()
    depth, batch, rounds = (20, 16, 2) if args.quick else (56, 128, args.rounds)
    rng = np.random.default_rng(1)
    calibration = rng.random((32 if args.quick else 256, 32, 32, 3)).astype("float32")
    x_xla = rng.random((batch, 32, 32, 3)).astype("float32")
    dense, slim = models(depth, args.cut)

    with tempfile.TemporaryDirectory() as folder:
        reports = {"dense": write(dense, folder, "dense", calibration),
                   "slim": write(slim, folder, "slim", calibration)}
        t = timings(reports, x_xla, x_xla[:1], rounds)

    flops = {"dense": keras_psp.count_flops(dense), "slim": keras_psp.count_flops(slim)}
    params = {"dense": dense.count_params(), "slim": slim.count_params()}
    rows = [
        (name, f"{flops[name] / 1e6:.1f}", f"{params[name]:,}",
         f"{r['xla'].size / 1e6:.2f}", f"{r['f32'].size / 1e3:.0f}", f"{r['int8'].size / 1e3:.0f}",
         f"{t[name, 'xla']:.1f}", f"{t[name, 'f32']:.3f}", f"{t[name, 'int8']:.3f}")
        for name, r in reports.items()
    ]
    print_table(
        f"ResNet-{depth}, 32×32×3, cut {args.cut:.0%} of every layer's channel α, slim "
        f"gather=False multiple_of=8; medians of {rounds} XLA / {rounds * 2} LiteRT rounds",
        rows,
        ("model", "MFLOPs", "params", "SavedModel MB", "f32 .tflite KB", "int8 .tflite KB",
         f"XLA b{batch} ms", "LiteRT f32 b1 ms", "LiteRT int8 b1 ms"),
    )
    checks = [
        (name, kind, f"{r[kind].max_diff:.2g}", f"{r[kind].relative_error:.2g}",
         "—" if r[kind].agreement is None else f"{r[kind].agreement:.1%}")
        for name, r in reports.items() for kind in ("xla", "f32", "int8")
    ]
    print_table("export verification against the Keras model (random inputs; int8: "
                "calibration images)", checks,
                ("model", "file", "max |diff|", "rel. RMS error", "top-1 agreement"))
    speed = {kind: t["dense", kind] / t["slim", kind] for kind in ("xla", "f32", "int8")}
    print(
        f"\nslim / dense speedup (FLOPs ratio {flops['slim'] / flops['dense']:.3f}): "
        f"SavedModel+XLA b{batch} {speed['xla']:.2f}x, LiteRT float32 b1 "
        f"{speed['f32']:.2f}x, LiteRT int8 b1 {speed['int8']:.2f}x"
    )


if __name__ == "__main__":
    main()
