"""Callbacks that watch and steer PSP training: `SeparationMonitor`, `FlopsBudget`.

Both take the slimmed model's cost from `keras_psp.slim` itself (one slim per
check, reused while the cut set stays the same): what slimming will give."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.cloning import psp_layers
from keras_psp.flops import count_flops
from keras_psp.stats import FLOOR, model_stats
from keras_psp.surgery.slim import slim


def _require_psp_layers(model, who: str) -> list:
    layers = psp_layers(model)
    if not layers:
        raise ValueError(f"{who}: model '{model.name}' has no PSP layers, nothing to watch; "
                         "wrap it first (`keras_psp.wrap(model)` or `keras_psp.PSP` layers).")
    return layers


def _masks(layers, finite=None, previous=None) -> list[np.ndarray]:
    """Keep masks; a layer with non-finite α keeps its `previous` mask."""
    finite = finite or [True] * len(layers)
    return [np.ravel(layer.mask()) if ok else old
            for layer, ok, old in zip(layers, finite, previous or finite, strict=True)]


class _SlimCost:
    """(FLOPs, parameters) of `slim(model)` over the unpruned model's; cached by masks."""

    def __init__(self, model, layers):
        self.model, self.flops = model, count_flops(model)
        self.params = model.count_params() - sum(  # the stripped (plain) model
            int(np.prod(layer.alpha.shape)) for layer in layers)
        self._key, self.value, self.error = None, (math.nan, math.nan), None

    def __call__(self, masks) -> tuple[float, float]:
        key = b"|".join(np.packbits(m).tobytes() for m in masks)
        if key != self._key:
            self._key, self.value, self.error = key, (math.nan, math.nan), None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small = slim(self.model)
                self.value = (count_flops(small) / max(self.flops, 1),
                              small.count_params() / max(self.params, 1))
            except Exception as error:  # non-finite α, a cut-off model: NaN
                self.error = error
        return self.value


class SeparationMonitor(keras.callbacks.Callback):
    """Shows, during `fit`, how clearly PSP's α split into kept and cut groups.

    At each epoch end (and every `every_n_steps` steps) it computes, per PSP
    layer and overall: structures, how many are cut (below the threshold),
    the separation of `keras_psp.stats.separation` (0: no split, near 1: cut
    α decades below every kept one; unchanged by a uniform rescaling of a
    layer's α), how many changed side, and with `flops=True` the FLOPs and
    parameters of `keras_psp.slim(model)` as fractions of the unpruned model.

    Overall figures go into the epoch `logs` (list the monitor before
    `CSVLogger`/`TensorBoard`): `psp_cut` (fraction cut), `psp_separation`,
    `psp_changed` (during the epoch), `psp_flops`, `psp_params`. The latest
    per-layer `keras_psp.stats.LayerStats` are `monitor.layers`; one dict per
    epoch (step check) goes to `monitor.history` (`.step_history`). Warns once
    per layer, naming it, when α becomes non-finite and when a layer is about
    to lose every structure (one of several kept; a layer α within 2× of its
    threshold). Cost: a pass over α per check and a `slim` when the cut set
    changed; `every_n_steps` turns off async batch callbacks (JAX: syncs state).

    Args:
        every_n_steps: Also check every this many training steps.
        log_dir: Folder for a TensorBoard event file: scalars and per-layer
            histograms of log10 relative |α| (tags `epoch_*`, `batch_*`).
            TensorFlow backend only (else one warning).
        patience: Stop once the cut set has not changed for this many epochs
            and the separation is >= `min_separation`; never with non-finite α.
        min_separation: Separation needed for `patience` to stop.
        flops: Compute the slimmed model's FLOPs and parameters.
        verbose: 1 prints one line per epoch; 0 is silent.

    Example:

    ```python
    monitor = keras_psp.SeparationMonitor(patience=3)
    model.fit(x, y, epochs=30, callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
    monitor.history[-1]["psp_flops"]   # FLOPs of the slimmed model / unpruned
    ```
    """

    def __init__(self, every_n_steps: int | None = None, log_dir: str | None = None,
                 patience: int | None = None, min_separation: float = 0.5, flops: bool = True,
                 verbose: int = 1):
        super().__init__()
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("patience", patience, 0)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"SeparationMonitor: `{name}` must be an integer >= {low} or "
                                 f"None, got {value!r}.")
        if not 0.0 <= float(min_separation) <= 1.0:
            raise ValueError("SeparationMonitor: `min_separation` must be in [0, 1] (the "
                             f"separation's range), got {min_separation}.")
        self.every_n_steps, self.log_dir, self.patience = every_n_steps, log_dir, patience
        self.min_separation, self.flops, self.verbose = float(min_separation), flops, verbose
        self.layers, self.history, self.step_history, self.stopped_epoch = [], [], [], None
        self._cost = None
        if every_n_steps:  # only then: a batch hook turns off async dispatch
            self.on_train_batch_end = self._on_step

    def on_train_begin(self, logs=None):
        self._psp = _require_psp_layers(self.model, "SeparationMonitor")
        if self.flops and getattr(self._cost, "model", None) is not self.model:
            self._cost = _SlimCost(self.model, self._psp)  # kept across fits of one model
        self._last = self._epoch_start = _masks(self._psp)
        self._wait, self._step, self._steps_done, self._writer = 0, 0, 0, None
        self._next_check, self._warned, self.stopped_epoch = self.every_n_steps or 0, set(), None
        if self.log_dir and keras.backend.backend() != "tensorflow":
            warnings.warn(f"SeparationMonitor: `log_dir` needs the TensorFlow backend; the "
                          f"'{keras.backend.backend()}' backend writes no event file.", stacklevel=2)
        elif self.log_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _check(self, since) -> tuple[dict, list]:
        """Figures now; `since` are the masks to count changes against."""
        stats, pooled = model_stats(self._psp)
        masks = _masks(self._psp, [s.finite for s in stats], self._last)
        changed = [int((m != p).sum()) for m, p in zip(masks, since, strict=True)]
        total = sum(s.total for s in stats)
        record = {"psp_cut": sum(s.cut for s in stats) / max(total, 1),
                  "psp_separation": pooled, "psp_changed": sum(changed)}
        if self._cost is not None:
            record["psp_flops"], record["psp_params"] = self._cost(masks)
            if self._cost.error is not None and all(s.finite for s in stats):
                self._warn_once("cost", f"SeparationMonitor: cannot slim the model now "
                                f"({self._cost.error}); FLOPs and parameters are NaN.")
        record["layers"] = {s.name: {"total": s.total, "cut": s.cut, "separation": s.separation,
                                     "changed": c, "finite": s.finite}
                            for s, c in zip(stats, changed, strict=True)}
        self.layers, self._last = stats, masks
        self._warn_layers(stats)
        return record, masks

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _warn_layers(self, stats):
        for s, layer in zip(stats, self._psp, strict=True):
            kept = s.total - s.cut
            near = layer.structure == "layer" and kept and s.relative.max() < 2 * layer.threshold
            if not s.finite:
                self._warn_once(("nan", s.name), f"SeparationMonitor: PSP layer '{s.name}' has "
                                "non-finite α (NaN or inf); training has diverged. Lower the "
                                "learning rate or α strength; restart from a checkpoint.")
            elif kept == 0 or (s.total > 1 and kept == 1) or near:
                self._warn_once(("cut", s.name), (
                    f"SeparationMonitor: PSP layer '{s.name}' is about to lose every "
                    f"structure ({kept} of {s.total} kept); slim then removes it, or fails "
                    "if it is the only path to the output. Lower the α strength or the "
                    "threshold, or leave this layer unwrapped."))

    def _write(self, prefix, step, record, stats):  # tags like keras.callbacks.TensorBoard's
        if self._writer is None:
            return
        with self._writer.as_default():
            for key, value in record.items():
                if key != "layers":
                    _summary(f"{prefix}_{key}", value, step)
            for s in stats:
                _summary(f"{prefix}_psp_separation/{s.name}", s.separation, step)
                _summary(f"{prefix}_psp_cut/{s.name}", s.cut / max(s.total, 1), step)
                if s.finite and s.relative.size:
                    values = np.log10(np.maximum(s.relative, FLOOR))
                    _summary(f"{prefix}_log10_alpha/{s.name}", values, step, histogram=True)
        self._writer.flush()

    def _on_step(self, batch, logs=None):
        self._step = self._steps_done + batch + 1  # steps since training began
        if self._step < self._next_check:
            return
        self._next_check = (self._step // self.every_n_steps + 1) * self.every_n_steps
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the trained α
        record = self._check(self._last)[0]
        self.step_history.append({"step": self._step, **record})
        self._write("batch", self._step, record, self.layers)

    def on_epoch_end(self, epoch, logs=None):
        self._steps_done = max(self._steps_done, self._step)
        record, masks = self._check(self._epoch_start)
        self._epoch_start = masks
        if logs is not None:
            logs.update({k: v for k, v in record.items() if k != "layers"})
        self.history.append({"epoch": epoch, **record})
        self._write("epoch", epoch, record, self.layers)
        finite = all(s.finite for s in self.layers)
        self._wait = self._wait + 1 if finite and record["psp_changed"] == 0 else 0
        if self.verbose:
            cut, total = sum(s.cut for s in self.layers), sum(s.total for s in self.layers)
            io_utils.print_msg(
                f"PSP epoch {epoch + 1}: cut {cut}/{total} ({100 * record['psp_cut']:.1f}%), "
                f"separation {record['psp_separation']:.3f}, changed {record['psp_changed']}"
                + (f", FLOPs {record['psp_flops']:.3f}, params {record['psp_params']:.3f}"
                   if "psp_flops" in record else "") + ("" if finite else ", NON-FINITE α"))
        if (self.patience is not None and finite and self._wait >= self.patience
                and record["psp_separation"] >= self.min_separation):
            self.stopped_epoch, self.model.stop_training = epoch, True
            if self.verbose:
                io_utils.print_msg(f"PSP: cut set unchanged for {self._wait} epoch(s) at "
                                   f"separation {record['psp_separation']:.3f}; stopping.")

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


def _summary(tag, value, step, histogram=False, bins=30):
    """A TensorBoard scalar or histogram, as `tf.summary.scalar/histogram`
    (which need the `tensorboard` package) write them."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "histograms" if histogram else "scalars"
    tensor = np.asarray(value, "float64" if histogram else "float32")
    if histogram:  # (k, 3): left edge, right edge, count
        lo, hi = float(tensor.min()), float(tensor.max())
        lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        counts, edges = np.histogram(tensor, bins=bins, range=(lo, hi))
        tensor = np.stack([edges[:-1], edges[1:], counts.astype("float64")], axis=1)
    tf.summary.write(tag, tf.constant(tensor), step=int(step), metadata=metadata)


def _strength_slots(layer) -> list[tuple[object, str]]:
    """(regularizer, attribute) pairs holding the α strength of a PSP layer."""
    found = (layer.alpha_regularizer, getattr(layer.alpha, "regularizer", None))
    slots = {(id(r), a): (r, a) for r in found for a in ("l1", "l2")
             if isinstance(r, (keras.regularizers.L1, keras.regularizers.L2)) and hasattr(r, a)}
    if not slots:
        kind = type(layer.alpha_regularizer).__name__ if layer.alpha_regularizer else None
        raise ValueError(f"PSP layer '{layer.name}' has α regularizer {kind}; only "
                         "keras.regularizers.L2 or L1 strengths can be set. Wrap with "
                         "regularizer='l2' (the default) or 'l1'.")
    return list(slots.values())


def set_strength(model: keras.Model, strength: float) -> None:
    """Sets the L2/L1 α strength of every PSP layer, e.g. `set_strength(model, 5e-2)`.

    Keras bakes a regularizer's strength into the traced train function (TF
    graph, XLA, JAX jit), so a compiled model's train function is rebuilt
    (`make_train_function(force=True)`): the next step traces it again.
    """
    if not strength >= 0:
        raise ValueError(f"set_strength: `strength` must be >= 0, got {strength}.")
    for layer in _require_psp_layers(model, "set_strength"):
        for regularizer, attr in _strength_slots(layer):
            setattr(regularizer, attr, float(strength))
    model.make_train_function(force=True)


class FlopsBudget(keras.callbacks.Callback):
    """Adapts the α regularization strength so the slimmed model meets a FLOPs budget.

    After each epoch it takes the FLOPs of `keras_psp.slim(model)` as a
    fraction of the unpruned model's and multiplies the strength of every PSP
    layer's α regularizer (L2 or L1; one strength for all) by `factor ** step`:
    - the goal falls linearly from 1 to `target` over the first `ramp` of the
      epochs; the prediction for the next epoch is the fraction plus its
      trend or, if lower, the fraction at a `lookahead` × higher threshold;
    - it pushes (`step` > 0) while the prediction is behind the ramp
      (above `goal + tolerance / 2`), brakes (`step` < 0) only when the
      prediction is about to pass the final target (below `target +
      tolerance / 4`: cuts rarely come back, and with BN pruning goes on for
      a while even at zero strength), and otherwise holds: being ahead of the
      ramp is no reason to slow down, since a cosine learning rate leaves
      little decay for late epochs. `step` = distance / (2 × tolerance),
      |step| in [0.25, 1]. Brakes act in full; pushes after brakes are damped.
    A change takes effect via a rebuilt train function (`set_strength`). Logs
    `psp_strength` (during the epoch), and `psp_flops` unless a monitor did.
    `tolerance` is absolute: 0.05 accepts 0.45 to 0.55 for a target of 0.5.

    Args:
        target: FLOPs of the slimmed model over the unpruned model's, in (0, 1].
        tolerance: Accepted distance from `target`, in (0, 1).
        factor: Largest change of the strength per epoch (> 1).
        ramp: Fraction of the epochs over which the goal reaches `target`.
        lookahead: Threshold multiple for the prediction (1: off).
        initial_strength: Strength to start from; None: the layers' (mean).
        min_strength, max_strength: Bounds; None: start / 100 and start × 10.
        verbose: 1 prints one line per epoch; 0 is silent.

    Example:

    ```python
    budget = keras_psp.FlopsBudget(target=0.5)
    model.fit(x, y, epochs=20, callbacks=[keras_psp.SeparationMonitor(), budget])
    keras_psp.count_flops(keras_psp.slim(model)) / keras_psp.count_flops(model)  # ≈ 0.5
    ```
    """

    def __init__(self, target: float = 0.5, tolerance: float = 0.05, factor: float = 2.0,
                 ramp: float = 0.5, lookahead: float = 3.0, initial_strength: float | None = None,
                 min_strength: float | None = None, max_strength: float | None = None,
                 verbose: int = 1):
        super().__init__()
        positive = {"initial_strength": initial_strength, "min_strength": min_strength,
                    "max_strength": max_strength}
        for name, value, ok, what in (
            ("target", target, 0 < target <= 1, "in (0, 1] (a fraction of the unpruned FLOPs)"),
            ("tolerance", tolerance, 0 < tolerance < 1, "in (0, 1)"),
            ("factor", factor, factor > 1, "> 1"), ("ramp", ramp, 0 <= ramp <= 1, "in [0, 1]"),
            ("lookahead", lookahead, lookahead >= 1, ">= 1"),
            *((n, v, v is None or v > 0, "> 0 or None") for n, v in positive.items()),
        ):
            if not ok:
                raise ValueError(f"FlopsBudget: `{name}` must be {what}, got {value!r}.")
        self.target, self.tolerance, self.factor, self.ramp = target, tolerance, factor, ramp
        self.lookahead, self.initial_strength, self.verbose = lookahead, initial_strength, verbose
        self.min_strength, self.max_strength = min_strength, max_strength
        self.history, self.fraction, self.strength = [], None, None

    def on_train_begin(self, logs=None):
        from keras_psp.wrapper import DEFAULT_STRENGTH

        self._layers = _require_psp_layers(self.model, "FlopsBudget")
        now = [getattr(r, a) for layer in self._layers for r, a in _strength_slots(layer)]
        start = self.initial_strength or float(np.mean(now)) or DEFAULT_STRENGTH
        self._bounds = (self.min_strength or start / 100, self.max_strength or start * 10)
        if self._bounds[0] > self._bounds[1]:
            raise ValueError(f"FlopsBudget: min_strength > max_strength: {self._bounds}.")
        self._gain, self._trend, self.history, self.fraction = 1.0, 0.0, [], None
        self._set(float(np.clip(start, *self._bounds)))
        self._cost, self._look = (_SlimCost(self.model, self._layers) for _ in range(2))

    def _set(self, strength: float) -> None:
        self.strength = strength
        set_strength(self.model, strength)

    def _looking_ahead(self) -> float:
        """FLOPs fraction if the threshold were `lookahead` times higher."""
        thresholds = [layer.threshold for layer in self._layers]
        try:
            for layer in self._layers:
                layer.threshold = min(layer.threshold * self.lookahead, 0.5)
            return self._look(_masks(self._layers))[0]
        finally:
            for layer, threshold in zip(self._layers, thresholds, strict=True):
                layer.threshold = threshold

    def goal(self, epoch: int) -> float:
        """The FLOPs fraction aimed at after `epoch` (0-based)."""
        ramp = max(1, math.ceil(self.ramp * ((self.params or {}).get("epochs") or 1)))
        return 1.0 - (1.0 - self.target) * min(1.0, (epoch + 1) / ramp)

    def _step(self, predicted: float, epoch: int) -> float:
        """Strength change in powers of `factor`, from the prediction's
        distance to next epoch's goal (aimed at from above, held within a
        quarter tolerance); braking only because ahead of the ramp is mild
        (a quarter step) unless the final target is about to be passed."""
        quarter = self.tolerance / 4
        distance = predicted - (self.goal(epoch + 1) + 2 * quarter)
        if abs(distance) <= quarter:
            return 0.0
        step = float(np.clip(distance / (2 * self.tolerance), -1.0, 1.0))
        if step < 0 and predicted >= self.target + quarter:
            step = max(step, -0.25)
        return step

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        fraction = logs.get("psp_flops")
        if fraction is None or not math.isfinite(fraction):
            fraction = logs["psp_flops"] = self._cost(_masks(self._layers))[0]
        used = logs["psp_strength"] = self.strength
        if not math.isfinite(fraction):  # diverged: stop pushing
            predicted, step = fraction, -1.0
        else:
            if self.fraction is not None:
                self._trend = (self._trend + fraction - self.fraction) / 2
            predicted = fraction + self._trend
            if self.lookahead > 1:
                predicted = min(predicted, self._looking_ahead())
            step = self._step(predicted, epoch)
        if step:  # brakes in full, pushes damped after brakes
            self._gain = self._gain / 2 if step < 0 else min(1.0, self._gain * 1.5)
            new = float(np.clip(used * self.factor ** (step * (self._gain if step > 0 else 1)),
                                *self._bounds))
            if abs(new / used - 1) > 1e-3:
                self._set(new)
        self.fraction = fraction
        self.history.append({"epoch": epoch, "psp_flops": fraction, "predicted": predicted,
                             "goal": self.goal(epoch), "strength": used})
        if self.verbose:
            io_utils.print_msg(
                f"FlopsBudget epoch {epoch + 1}: FLOPs {fraction:.3f} (goal {self.goal(epoch):.3f}"
                f", predicted {predicted:.3f}), strength {used:.3g} -> {self.strength:.3g}")

    def on_train_end(self, logs=None):
        if self.fraction is not None and not abs(self.fraction - self.target) <= self.tolerance:
            advice = ("Train for more epochs, or raise `max_strength` (too little pruning)."
                      if self.fraction > self.target else "Lower `factor` or `max_strength`, "
                      "or raise `ramp` (pruning overshot).")
            warnings.warn(f"FlopsBudget: training ended at a FLOPs fraction of {self.fraction:.3f}, "
                          f"outside {self.target:g} ± {self.tolerance:g}. {advice}", stacklevel=2)
