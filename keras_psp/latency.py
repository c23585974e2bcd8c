"""Measured latency: how each prunable layer's cost changes with its width.

FLOPs are a proxy; what a user deploys is time on a runtime. `profile`
measures, on this machine, every layer that computes (convolutions, `Dense`,
...) at the widths pruning can leave it, at aligned steps, and returns a
`LatencyProfile`: a lookup table per distinct layer (HALP, Shen et al.,
NeurIPS 2022, builds the same kind of table on a GPU). Its `predict(model)`
gives the latency of `slim(model)` from surgery's channel plan alone, so
that `keras_psp.prune_to(model, latency=0.6, profile=table)` and
`keras_psp.LatencyBudget` can aim at measured time instead of FLOPs.

How it measures:

- Each distinct layer (same class, config and input shape: the 9 identical
  convolutions of a ResNet stage are one) is rebuilt by surgery's own rule at
  a grid of (input width, output width) pairs: at most `levels` aligned
  widths per axis, from the smallest width pruning can leave to the full one.
  Widths between grid points are interpolated bilinearly.
- LiteRT: all grid points are converted in one flatbuffer with one signature
  each (one conversion), and timed single-threaded by default. XLA: each
  point is a jit-compiled `tf.function`. Points are timed in `rounds` rounds,
  each visiting every point once (interleaved), and the median is kept.
- Layers that do not compute (BN folded into a convolution, activations,
  adds) are not in the table. The whole model is timed too, with the points: `predict` is the table's
  sum times the unpruned model's time over the table's sum for it (the rest,
  adds, pooling and copies, taken as proportional). A call's own cost (the
  time of a call doing almost nothing) is taken off every point first.

A profile is cached on disk, keyed by the model's architecture, the runtime
and its settings, and this machine (`cache_dir`, by default
`~/.cache/keras_psp/latency`, or `$KERAS_PSP_CACHE/latency`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import tempfile
import time
import warnings

import keras
import numpy as np

from keras_psp.cloning import check_graph_model, psp_layers
from keras_psp.folding import unwrap
from keras_psp.graph import flatten, width
from keras_psp.layers import family
from keras_psp.surgery.slim import plan_channels, slim_graph
from keras_psp.timing import interleaved, medians_ms

#: The runtimes `profile` can measure.
RUNTIMES = ("litert", "xla")

#: Bumped when the measuring changes, so that older cached profiles are not used.
_FORMAT = 1


@dataclasses.dataclass
class LayerTable:
    """Measured time (ms) of one distinct layer at a grid of widths.

    Attributes:
        name: A layer of the model with this signature (for reports).
        inputs: The input widths measured, ascending.
        outputs: The output widths measured, ascending; `[]` when the output
            width follows the input width (a depthwise convolution).
        ms: Times, `[len(inputs)][len(outputs) or 1]`.
    """

    name: str
    inputs: list[int]
    outputs: list[int]
    ms: list[list[float]]

    def at(self, cin: int, cout: int) -> float:
        """Time at widths `(cin, cout)`, interpolated bilinearly (clamped at the grid's ends)."""
        table = np.asarray(self.ms, dtype="float64")
        rows = np.array([np.interp(cin, self.inputs, table[:, j])
                         for j in range(table.shape[1])])
        if not self.outputs:
            return float(rows[0])
        return float(np.interp(cout, self.outputs, rows))


@dataclasses.dataclass
class LatencyProfile:
    """A latency lookup table for one model on one runtime (see `profile`).

    Attributes:
        runtime: "litert" or "xla".
        batch_size: The batch the times are for.
        threads: LiteRT interpreter threads (None: LiteRT's default).
        tables: `LayerTable` by layer signature.
        scale: The unpruned model's measured time over the table's sum for
            it: what the layers outside the table (adds, pooling, copies)
            add, taken as proportional to the layers' time.
        dense_ms: Measured time of the unpruned model.
        null_ms: Measured time of a call that does almost nothing (the
            runtime's own cost per call), taken off every table entry.
        signature: The cache key (architecture, runtime, settings, machine).
        seconds: Time it took to build the profile.
    """

    runtime: str
    batch_size: int
    threads: int | None
    tables: dict
    scale: float
    dense_ms: float
    null_ms: float
    signature: str
    seconds: float

    def table_ms(self, model: keras.Model, alphas: dict | None = None) -> float:
        """The sum of the table over the layers of `slim(model)` (unfitted ms)."""
        return sum(self.layer_ms(model, alphas).values())

    def layer_ms(self, model: keras.Model, alphas: dict | None = None) -> dict:
        """Table time (ms, before the affine fit) of each computing layer of
        `slim(model)`, by layer name (calls of one layer add up)."""
        graph = unwrap(flatten(model), alphas)
        plan = plan_channels(graph)
        costs: dict[str, float] = {}
        for site in _sites(graph, plan):
            table = self.tables.get(site.signature)
            if table is None:
                raise ValueError(
                    f"LatencyProfile: layer '{site.op.layer.name}' ({type(site.op.layer).__name__}, "
                    f"input {site.shape}) is not in this profile, which was measured on another "
                    "model. Build a profile of this model with keras_psp.latency.profile(model).")
            costs[site.op.layer.name] = costs.get(site.op.layer.name, 0.0) + table.at(
                site.cin, site.cout)
        return costs

    def predict(self, model: keras.Model, alphas: dict | None = None) -> float:
        """Predicted latency (ms) of `slim(model)` on this profile's runtime.

        Args:
            model: A PSP-wrapped model of the profiled architecture (or the
                plain model itself).
            alphas: α values to use instead of the layers' own, by `id` of
                the α variable (a candidate cut); None: their α.
        """
        return self.scale * self.table_ms(model, alphas)

    def to_json(self) -> dict:
        return {"format": _FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> LatencyProfile:
        data = dict(data)
        if data.pop("format", None) != _FORMAT:
            raise ValueError("LatencyProfile: this file was written by another version of "
                             "keras_psp; build the profile again.")
        data["tables"] = {k: LayerTable(**v) for k, v in data["tables"].items()}
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the profile as JSON."""
        pathlib.Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyProfile:
        """Reads a profile written by `save`."""
        return cls.from_json(json.loads(pathlib.Path(path).read_text()))

    def __str__(self) -> str:
        points = sum(len(t.inputs) * max(len(t.outputs), 1) for t in self.tables.values())
        return (f"LatencyProfile({self.runtime}, batch {self.batch_size}): {len(self.tables)} "
                f"distinct layers, {points} points; unpruned model {self.dense_ms:.3f} ms "
                f"(layers {self.dense_ms / self.scale:.3f} ms, x{self.scale:.2f} for the rest); "
                f"built in {self.seconds:.1f} s")


@dataclasses.dataclass
class _Site:
    """A computing layer call and its widths in a channel plan."""

    index: int  # position in the graph's ops (the same in every flatten of the model)
    op: object
    rule: object
    shape: tuple  # the input's shape in the unpruned model
    cin: int
    cout: int
    full_out: int
    signature: str


def _signature(op, shape) -> str:
    config = {k: v for k, v in op.layer.get_config().items() if k not in ("name", "trainable")}
    text = json.dumps([type(op.layer).__name__, config, list(shape[1:])], sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _sites(graph, plan) -> list[_Site]:
    """Every live op that computes (has a MAC count), at the plan's widths."""
    rule_of = {id(op): rule for op, rule in zip(graph.ops, plan.rules, strict=True)}
    sites = []
    for index, op in enumerate(graph.ops):
        if id(op) not in plan.live or family(op.layer).macs is None:
            continue
        key_in, key_out = op.inputs[0], op.outputs[0]
        shape = graph.shapes[key_in]
        if not width(shape) or not width(graph.shapes[key_out]):
            continue
        own = plan.own.get(id(op))
        cin = int(np.sum(plan.present[key_in] if own is None else own))
        cout = int(np.sum(plan.present[key_out]))
        sites.append(_Site(index, op, rule_of[id(op)], tuple(shape), cin, cout,
                           width(graph.shapes[key_out]), _signature(op, shape)))
    return sites


def _levels(low: int, full: int, step: int, levels: int) -> list[int]:
    """At most `levels` widths from `low` to `full`: aligned steps, both ends included."""
    values = sorted({low, full, *range(-(-low // step) * step, full, step)} - {0})
    if len(values) <= levels:
        return values
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, levels)).astype(int))
    return [values[i] for i in picks]


def _cut_everything(layers, step: int) -> dict:
    """α values that cut every structure but one aligned block per layer or group."""
    values = {}
    for layer in layers:
        alpha = np.ravel(keras.ops.convert_to_numpy(layer.alpha)).astype("float32").copy()
        keep = max(1, min(step, alpha.size))
        order = np.argsort(-np.abs(alpha), kind="stable")
        alpha[order[keep:]] = 0.0
        values[id(layer.alpha)] = alpha.reshape(tuple(layer.alpha.shape))
    return values


def _micro_model(site: _Site, cin: int, cout: int, batch: int) -> keras.Model:
    """The site's layer alone, rebuilt by its surgery rule at widths `(cin, cout)`."""
    full_in = site.shape[-1]
    keep_in = np.arange(full_in) < cin
    if site.rule.boundary:
        keep_out = np.arange(site.full_out) < cout
    elif site.full_out % full_in == 0:  # depthwise: outputs follow their input channel
        keep_out = np.repeat(keep_in, site.full_out // full_in)
    else:
        keep_out = np.ones(site.full_out, bool)
    layer, weights = site.rule.rebuild(site.op, [keep_in], [keep_out])
    x = keras.Input(batch_shape=(batch, *site.shape[1:-1], cin))
    y = layer(x)
    if isinstance(weights, list):
        layer.set_weights(weights)
    return keras.Model(x, y)


def _median_times(runs: list, rounds: int, invokes: int, seed: int = 0) -> list[float]:
    """Median ms per call of each zero-argument function in `runs`, timed
    interleaved: `rounds` rounds, each calling every function `invokes`
    times, in a fresh random order."""
    samples = interleaved(dict(enumerate(runs)), rounds, invokes, warmup=1, seed=seed)
    return list(medians_ms(samples).values())


def _fixed_specs(model: keras.Model, batch: int) -> list[tuple]:
    """`(shape, dtype)` of each input of `model`, the batch axis set to `batch`."""
    return [((batch, *tuple(t.shape)[1:]), t.dtype) for t in model.inputs]


def _inputs(model: keras.Model, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape).astype(dtype) if "float" in str(dtype)
            else np.zeros(shape, dtype) for shape, dtype in _fixed_specs(model, batch)]


def _call(model: keras.Model):
    """`model` called in inference mode on a list of inputs, as its structure takes them."""
    return lambda *xs: model(xs[0] if len(xs) == 1 else list(xs), training=False)


def _endpoint(model: keras.Model):
    """`model`'s inference call on a list of inputs, returning `{"y": outputs}`."""
    call = _call(model)

    def endpoint(xs):
        return {"y": call(*xs)}

    return endpoint


def _invoke(runner):
    """Runs a LiteRT signature on the inputs it was last given. Calling the
    runner would resize and allocate its tensors and copy them in and out on
    every call, which costs as much as a small layer."""
    wrapper = getattr(runner, "_interpreter_wrapper", None)
    index = getattr(runner, "_subgraph_index", None)
    if wrapper is None or index is None:  # another ai-edge-litert: the public call
        inputs = {name: np.zeros(d["shape"], d["dtype"])
                  for name, d in runner.get_input_details().items()}
        return lambda: runner(**inputs)
    return lambda: wrapper.Invoke(index)


def _litert_runs(models: list, batch: int, threads: int | None, workdir: str) -> list:
    """One flatbuffer with a signature per model (one conversion); a callable per model."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    archive = keras.export.ExportArchive()  # tracks Keras variables: constant weights
    for i, model in enumerate(models):
        archive.track(model)
        specs = [tf.TensorSpec(shape, dtype, name=f"x{j}")
                 for j, (shape, dtype) in enumerate(_fixed_specs(model, batch))]
        archive.add_endpoint(f"point_{i}", _endpoint(model), input_signature=[specs])
    path = os.path.join(workdir, "points")
    archive.write_out(path, verbose=False)
    keys = [f"point_{i}" for i in range(len(models))]
    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=keys)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert(), num_threads=threads)
    runs = []
    for i, model in enumerate(models):
        runner = interpreter.get_signature_runner(f"point_{i}")
        runner(**{f"x{j}": x for j, x in enumerate(_inputs(model, batch, i))})
        runs.append(_invoke(runner))
    return runs


def _xla_runs(models: list, batch: int) -> list:
    """A callable per model: jit-compiled on a random batch (compiled on its first call)."""
    import tensorflow as tf

    runs = []
    for i, model in enumerate(models):
        fn = tf.function(_call(model), jit_compile=True, autograph=False)
        xs = [tf.constant(x) for x in _inputs(model, batch, i)]
        runs.append(lambda fn=fn, xs=xs: keras.tree.map_structure(np.asarray, fn(*xs)))
    return runs


def _progress(verbose: int, start: float, what: str) -> None:
    if verbose:
        print(f"latency.profile: {time.perf_counter() - start:5.1f} s: {what}", flush=True)


def _planned(model, alphas) -> tuple:
    """`(graph, plan)` of `slim(model)` with α `alphas` (by `id` of the α variable)."""
    graph = unwrap(flatten(model), alphas)
    return graph, plan_channels(graph)


def _machine() -> str:
    return f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}"


def _cache_path(cache_dir, signature: str) -> pathlib.Path:
    if cache_dir is None:
        root = os.environ.get("KERAS_PSP_CACHE") or os.path.join("~", ".cache", "keras_psp")
        cache_dir = os.path.join(root, "latency")
    return pathlib.Path(cache_dir).expanduser() / f"{signature}.json"


def profile(
    model: keras.Model,
    runtime: str = "litert",
    batch_size: int = 1,
    multiple_of: int = 8,
    levels: int = 3,
    rounds: int = 7,
    invokes: int = 10,
    threads: int | None = 1,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    verbose: int = 1,
) -> LatencyProfile:
    """Measures how each computing layer's time changes with its width.

    Args:
        model: A PSP-wrapped model (`keras_psp.wrap`), with a fixed input
            shape; its α decide nothing here (the unpruned widths are used).
        runtime: "litert" (a `.tflite` file, `ai-edge-litert`'s interpreter)
            or "xla" (a jit-compiled `tf.function`; TensorFlow backend).
        batch_size: The batch to time; 1 is typical for LiteRT.
        multiple_of: Widths are measured at multiples of this (the aligned
            widths `prune_to(multiple_of=...)` leaves).
        levels: At most this many widths per axis of each layer (more
            widths are interpolated).
        rounds: Interleaved timing rounds; the median is kept.
        invokes: Calls per point and round.
        threads: LiteRT interpreter threads (XLA uses TensorFlow's pools).
        cache: Read and write the profile in `cache_dir`.
        cache_dir: Where cached profiles live; None: `$KERAS_PSP_CACHE/latency`
            or `~/.cache/keras_psp/latency`.
        verbose: 1 prints what is measured and the fit.

    Returns:
        A `LatencyProfile`.

    Example:

    ```python
    table = keras_psp.latency.profile(wrapped, runtime="litert")
    print(table)
    keras_psp.prune_to(wrapped, latency=0.6, profile=table)
    table.predict(wrapped) / table.dense_ms       # ≈ 0.6
    ```
    """
    check_graph_model(model, "latency.profile")
    if runtime not in RUNTIMES:
        raise ValueError(f"latency.profile: `runtime` must be one of {RUNTIMES}, got {runtime!r}.")
    for name, value in (("batch_size", batch_size), ("multiple_of", multiple_of),
                        ("levels", levels), ("rounds", rounds), ("invokes", invokes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "levels"
                                                                             else 1):
            raise ValueError(f"latency.profile: `{name}` must be an integer >= "
                             f"{2 if name == 'levels' else 1}, got {value!r}.")
    if runtime == "xla" and keras.backend.backend() != "tensorflow":
        raise ValueError("latency.profile: runtime='xla' times a jit-compiled tf.function and "
                         "needs the TensorFlow backend (KERAS_BACKEND=tensorflow); use "
                         "runtime='litert' on other backends.")
    layers = psp_layers(model)
    if not layers:
        raise ValueError(f"latency.profile: model '{model.name}' has no PSP layers; wrap it "
                         "first (keras_psp.wrap(model)).")
    start = time.perf_counter()
    dense_alphas = {id(layer.alpha): np.ones(tuple(layer.alpha.shape), "float32")
                    for layer in layers}
    graph = unwrap(flatten(model), dense_alphas)
    full = _sites(graph, plan_channels(graph))
    for site in full:
        if None in site.shape[1:]:
            raise ValueError(f"latency.profile: layer '{site.op.layer.name}' has input shape "
                             f"{site.shape}; build the model on a fixed input shape.")
    smallest = {s.index: s for s in _sites(*_planned(model, _cut_everything(layers, multiple_of)))}
    signature = hashlib.sha1(json.dumps(
        [_FORMAT, runtime, batch_size, multiple_of, levels, threads, _machine(),
         sorted(s.signature for s in full)]).encode()).hexdigest()[:20]
    path = _cache_path(cache_dir, signature)
    if cache and path.exists():
        try:
            cached = LatencyProfile.load(path)
            if verbose:
                print(f"latency.profile: cached profile {path}", flush=True)
            return cached
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # an unreadable or older file: measure again

    points, owners = [], []  # (site, cin, cout) per grid point; its table signature
    grids: dict[str, tuple] = {}
    for site in full:
        if site.signature in grids:
            continue
        low = smallest.get(site.index, site)
        inputs = _levels(min(low.cin, site.cin), site.cin, multiple_of, levels)
        outputs = (_levels(min(low.cout, site.cout), site.cout, multiple_of, levels)
                   if site.rule.boundary else [])
        grids[site.signature] = (site, inputs, outputs)
        for cin in inputs:
            for cout in outputs or [None]:
                points.append((site, cin, cout))
                owners.append(site.signature)
    if verbose:
        print(f"latency.profile: {len(points)} points of {len(grids)} distinct layers on "
              f"{runtime}, batch {batch_size}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = [_micro_model(site, cin, cout if cout is not None else cin, batch_size)
                  for site, cin, cout in points]
    null = keras.Sequential([keras.Input(batch_shape=(batch_size, 1, 1, 1)),
                             keras.layers.Conv2D(1, 1)], name="null")  # a call's own cost
    dense = slim_graph(*_planned(model, dense_alphas), name="dense")
    _progress(verbose, start, f"{len(models)} layer models built; " + (
        "converting them to one LiteRT file" if runtime == "litert" else "compiling them"))
    with tempfile.TemporaryDirectory() as workdir:
        if runtime == "litert":  # two files: one with many small signatures, the whole model
            runs = _litert_runs([*models, null], batch_size, threads, workdir)
            _progress(verbose, start, "converting the whole model")
            runs += _litert_runs([dense], batch_size, threads, workdir)
        else:
            runs = _xla_runs([*models, null, dense], batch_size)
        _progress(verbose, start, f"timing, {rounds} interleaved rounds")
        times = _median_times(runs, rounds, invokes)
    *times, null_ms, dense_ms = times
    tables = {}
    for signature_key, (site, inputs, outputs) in grids.items():
        values = [max(t - null_ms, 0.0) for owner, t in zip(owners, times, strict=True)
                  if owner == signature_key]
        shape = (len(inputs), max(len(outputs), 1))
        tables[signature_key] = LayerTable(site.op.layer.name, inputs, outputs,
                                           np.reshape(values, shape).tolist())
    result = LatencyProfile(runtime, batch_size, threads, tables, 1.0, dense_ms, null_ms,
                            signature, 0.0)
    result.scale = float(dense_ms / max(result.table_ms(model, dense_alphas), 1e-12))
    result.seconds = time.perf_counter() - start
    if verbose:
        print(result, flush=True)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    return result


