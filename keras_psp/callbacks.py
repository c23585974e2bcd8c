"""Callbacks that watch and steer PSP training: `SeparationMonitor`, `FlopsBudget`.

Both read the cost of the slimmed model from `keras_psp.slim` itself (one
slim per check, reused while the set of cut structures stays the same), so
what they report is what slimming will give.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.cloning import psp_layers
from keras_psp.flops import count_flops
from keras_psp.stats import FLOOR, model_stats

_STRENGTH_ATTRS = ("l1", "l2")


def _require_psp_layers(model, who: str) -> list:
    layers = psp_layers(model)
    if not layers:
        raise ValueError(
            f"{who}: model '{model.name}' has no PSP layers, so there is nothing to "
            "watch. Wrap the model first (`keras_psp.wrap(model)`) or wrap layers "
            "with `keras_psp.PSP`."
        )
    return layers


def _masks(layers, finite=None, previous=None) -> list[np.ndarray]:
    """Current keep masks; a layer with non-finite α keeps its previous mask."""
    if previous is None:
        return [np.ravel(layer.mask()) for layer in layers]
    return [np.ravel(layer.mask()) if ok else old
            for layer, ok, old in zip(layers, finite, previous, strict=True)]


class _SlimCost:
    """Cost of `slim(model)` as fractions of the unpruned model, cached by masks."""

    def __init__(self, model, layers):
        self.model, self.layers = model, layers
        self.flops = count_flops(model)
        alphas = sum(int(np.prod(layer.alpha.shape)) for layer in layers)
        self.params = model.count_params() - alphas  # the stripped (plain) model
        self._key, self._value, self.error = None, (math.nan, math.nan), None

    def __call__(self, masks) -> tuple[float, float]:
        key = b"".join(np.packbits(m).tobytes() + b"|" for m in masks)
        if key != self._key:
            from keras_psp.surgery.slim import slim

            self._key, self.error = key, None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small = slim(self.model)
                    flops = count_flops(small)
                self._value = (flops / max(self.flops, 1), small.count_params() / max(self.params, 1))
            except Exception as error:  # non-finite α, a cut-off model: report NaN
                self._value, self.error = (math.nan, math.nan), error
        return self._value


class SeparationMonitor(keras.callbacks.Callback):
    """Shows, during `fit`, how clearly PSP's α split into kept and cut groups.

    At the end of every epoch (and every `every_n_steps` training steps, if
    given) it computes for each PSP layer and for the whole model: the number
    of structures, how many are below the pruning threshold (cut), the
    separation statistic of `keras_psp.stats.separation` (0 = no split,
    near 1 = cut structures many decades below every kept one; unchanged by
    a uniform rescaling of a layer's α), how many structures changed side,
    and, with `flops=True`, the FLOPs and parameters of `keras_psp.slim(model)`
    as fractions of the unpruned model.

    The overall figures go into the epoch `logs` as `psp_cut` (fraction of
    structures cut), `psp_separation`, `psp_changed` (structures that changed
    side during the epoch), `psp_flops` and `psp_params`, so `History`, the
    progress bar, `CSVLogger` and `TensorBoard` show them: list the monitor
    *before* `CSVLogger`/`TensorBoard` in `callbacks`. The latest per-layer
    `keras_psp.stats.LayerStats` are in `monitor.layers`, one dict per epoch in
    `monitor.history` (per-step checks in `monitor.step_history`; both go on
    across `fit` calls, like `keras.callbacks.History`).

    Warns once per layer, naming it, when its α becomes non-finite, and when
    a layer is about to lose every structure (at most one of several kept;
    a layer-wise α within a factor 2 of its threshold).

    Overhead: one pass over the α at each check, plus one `slim` whenever the
    set of cut structures changed (with `flops=True`). `every_n_steps` also
    disables Keras's asynchronous batch callbacks and, on JAX, syncs the model
    state at each check.

    Args:
        every_n_steps: Also check every this many training steps (None: only
            at epoch ends).
        log_dir: Folder for a TensorBoard event file with the scalars and,
            per layer, histograms of log10 relative |α| (tags `epoch_*`,
            `batch_*` for step checks). Needs the TensorFlow backend;
            elsewhere it is skipped with one warning.
        patience: Stop training once the set of cut structures has not
            changed for this many epochs and the separation is at least
            `min_separation`. Never stops while some α is non-finite.
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

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_dir: str | None = None,
        patience: int | None = None,
        min_separation: float = 0.5,
        flops: bool = True,
        verbose: int = 1,
    ):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("patience", patience)):
            if value is not None and (not isinstance(value, int) or value < (name == "every_n_steps")):
                raise ValueError(
                    f"SeparationMonitor: `{name}` must be a "
                    f"{'positive' if name == 'every_n_steps' else 'non-negative'} integer "
                    f"or None, got {value!r}."
                )
        if not 0.0 <= float(min_separation) <= 1.0:
            raise ValueError(
                f"SeparationMonitor: `min_separation` must be in [0, 1] (the range of "
                f"the separation statistic), got {min_separation}."
            )
        self.every_n_steps, self.log_dir, self.patience = every_n_steps, log_dir, patience
        self.min_separation, self.flops, self.verbose = float(min_separation), flops, verbose
        self.layers, self.history, self.step_history = [], [], []
        self.stopped_epoch, self._cost = None, None
        if every_n_steps:  # only then: a batch hook turns off async dispatch
            self.on_train_batch_end = self._on_step

    def on_train_begin(self, logs=None):
        model = self.model
        self._psp = _require_psp_layers(model, "SeparationMonitor")
        if self.flops and getattr(self._cost, "model", None) is not model:
            self._cost = _SlimCost(model, self._psp)  # kept across fits of one model
        self._last = self._epoch_start = _masks(self._psp)
        self._wait, self._step, self._steps_done = 0, 0, 0
        self._next_check = self.every_n_steps or 0
        self._warned, self.stopped_epoch = set(), None
        self._writer = self._open_writer() if self.log_dir else None

    def _open_writer(self):
        if keras.backend.backend() != "tensorflow":
            warnings.warn(
                f"SeparationMonitor: `log_dir` needs the TensorFlow backend; the "
                f"'{keras.backend.backend()}' backend writes no event file.",
                stacklevel=3,
            )
            return None
        import tensorflow as tf

        return tf.summary.create_file_writer(self.log_dir)

    def _check(self, since) -> tuple[dict, list]:
        """Figures now; `since` are the masks to count changes against."""
        stats, pooled = model_stats(self._psp)
        masks = _masks(self._psp, [s.finite for s in stats], self._last)
        changed = [int((m != p).sum()) for m, p in zip(masks, since, strict=True)]
        total = sum(s.total for s in stats)
        record = {
            "psp_cut": sum(s.cut for s in stats) / max(total, 1),
            "psp_separation": pooled,
            "psp_changed": sum(changed),
        }
        if self._cost is not None:
            record["psp_flops"], record["psp_params"] = self._cost(masks)
            if self._cost.error is not None and all(s.finite for s in stats):
                self._warn_once("cost", f"SeparationMonitor: cannot slim the model now "
                                f"({self._cost.error}); FLOPs and parameters are NaN.")
        record["layers"] = {
            s.name: {"total": s.total, "cut": s.cut, "separation": s.separation,
                     "changed": c, "finite": s.finite}
            for s, c in zip(stats, changed, strict=True)
        }
        self.layers, self._last = stats, masks
        self._warn_layers(stats)
        return record, masks

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _warn_layers(self, stats):
        for s, layer in zip(stats, self._psp, strict=True):
            if not s.finite:
                self._warn_once(("nan", s.name), (
                    f"SeparationMonitor: PSP layer '{s.name}' has non-finite α (NaN or "
                    "inf); training has diverged. Lower the learning rate or the α "
                    "strength and restart from an earlier checkpoint."))
                continue
            kept = s.total - s.cut
            near = layer.structure == "layer" and kept and s.relative.max() < 2 * layer.threshold
            if kept == 0 or (s.total > 1 and kept == 1) or near:
                self._warn_once(("cut", s.name), (
                    f"SeparationMonitor: PSP layer '{s.name}' is about to lose every "
                    f"structure ({kept} of {s.total} kept); slimming then removes the "
                    "layer, or fails if it is the only path to the output. Lower the α "
                    "strength or the threshold, or leave this layer unwrapped."))

    def _write(self, prefix, step, record, stats):
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
        record, _ = self._check(self._last)
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
            line = (f"PSP epoch {epoch + 1}: cut {cut}/{total} ({100 * cut / max(total, 1):.1f}%)"
                    f", separation {record['psp_separation']:.3f}, changed {record['psp_changed']}")
            if "psp_flops" in record:
                line += f", FLOPs {record['psp_flops']:.3f}, params {record['psp_params']:.3f}"
            io_utils.print_msg(line + ("" if finite else ", NON-FINITE α"))
        if (self.patience is not None and finite and self._wait >= self.patience
                and record["psp_separation"] >= self.min_separation):
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.verbose:
                io_utils.print_msg(
                    f"PSP epoch {epoch + 1}: cut set unchanged for {self._wait} epoch(s) at "
                    f"separation {record['psp_separation']:.3f}; stopping.")

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary(tag, value, step, histogram=False, bins=30):
    """Writes a TensorBoard scalar or histogram (the formats TensorBoard's
    own `tf.summary.scalar/histogram` write; those need `tensorboard`)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "histograms" if histogram else "scalars"
    if histogram:
        values = np.asarray(value, "float64")
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
        tensor = np.stack([edges[:-1], edges[1:], counts.astype("float64")], axis=1)
    else:
        tensor = np.asarray(value, "float32")
    tf.summary.write(tag, tf.constant(tensor), step=int(step), metadata=metadata)


def _strength_slots(layer) -> list[tuple[object, str]]:
    """(regularizer, attribute) pairs holding the α strength of a PSP layer."""
    regularizers = {id(r): r for r in (layer.alpha_regularizer, getattr(layer.alpha, "regularizer", None))
                    if r is not None}
    slots = [(r, a) for r in regularizers.values() for a in _STRENGTH_ATTRS
             if isinstance(r, (keras.regularizers.L1, keras.regularizers.L2)) and hasattr(r, a)]
    if not slots:
        raise ValueError(
            f"PSP layer '{layer.name}' has α regularizer "
            f"{type(layer.alpha_regularizer).__name__ if layer.alpha_regularizer else None}; "
            "only keras.regularizers.L2 or L1 strengths can be set. Wrap with "
            "regularizer='l2' (the default) or 'l1'."
        )
    return slots


def set_strength(model: keras.Model, strength: float) -> None:
    """Sets the α regularization strength of every PSP layer of `model`.

    Keras bakes a regularizer's strength into the train function when it
    traces it (graph mode, XLA, JAX's jit), so a compiled model's train
    function is rebuilt here (`make_train_function(force=True)`); the next
    training step traces it again.

    Args:
        model: A model with PSP layers whose α regularizer is L2 or L1.
        strength: The new strength (>= 0).

    Example:

    ```python
    keras_psp.callbacks.set_strength(model, 5e-2)
    ```
    """
    if not strength >= 0:
        raise ValueError(f"set_strength: `strength` must be >= 0, got {strength}.")
    for layer in _require_psp_layers(model, "set_strength"):
        for regularizer, attr in _strength_slots(layer):
            setattr(regularizer, attr, float(strength))
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


class FlopsBudget(keras.callbacks.Callback):
    """Adapts the α regularization strength so the slimmed model meets a FLOPs budget.

    After every epoch it measures the FLOPs of `keras_psp.slim(model)` as a
    fraction of the unpruned model and multiplies the strength of every PSP
    layer's α regularizer (L2 or L1; ratios between layers are kept) by
    `factor ** (gain * step)`:

    - the *goal* falls linearly from 1 to `target` over the first `ramp` of
      the epochs (gradual pruning), then stays at `target`;
    - `step` is the distance to the goal over 2 × `tolerance`, clipped to
      [-1, 1] (more strength above the goal, less below), and 0 within
      `tolerance / 2` of it: fast far from the goal, slow near it, holding
      inside;
    - `gain` (starting at 1) halves whenever the step changes sign and grows
      by 1.5 (up to 1) while it keeps its sign, so the strength settles
      instead of oscillating: cut structures can come back while their α
      are small, and the response lags the strength by an epoch or more.

    A change takes effect by rebuilding the train function (see
    `set_strength`): one retrace at the start of the next epoch. Logs
    `psp_strength` (mean strength during the epoch) and, unless a
    `SeparationMonitor` listed earlier put it there, `psp_flops`.

    Args:
        target: FLOPs of the slimmed model as a fraction of the unpruned
            model's, in (0, 1].
        tolerance: Accepted distance from `target`, in (0, 1).
        factor: Largest change of the strength per epoch (> 1).
        ramp: Fraction of the epochs over which the goal reaches `target`
            (0: aim at `target` from the first epoch).
        initial_strength: Strength to start from; None keeps the layers' own.
        min_strength, max_strength: Bounds of the (mean) strength; None:
            the starting strength / 100 and × 4 (stronger decay hurts accuracy:
            measured on Fashion-MNIST).
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
        for name, value, ok, what in (
            ("target", target, 0 < target <= 1, "in (0, 1] (a fraction of the unpruned FLOPs)"),
            ("tolerance", tolerance, 0 < tolerance < 1, "in (0, 1)"),
            ("factor", factor, factor > 1, "> 1"),
            ("ramp", ramp, 0 <= ramp <= 1, "in [0, 1]"),
            ("lookahead", lookahead, lookahead >= 1, ">= 1"),
            *((n, v, v is None or v > 0, "> 0 or None")
              for n, v in (("initial_strength", initial_strength),
                           ("min_strength", min_strength), ("max_strength", max_strength))),
        ):
            if not ok:
                raise ValueError(f"FlopsBudget: `{name}` must be {what}, got {value!r}.")
        self.target, self.tolerance, self.factor, self.ramp = target, tolerance, factor, ramp
        self.lookahead, self.initial_strength, self.verbose = lookahead, initial_strength, verbose
        self.min_strength, self.max_strength = min_strength, max_strength
        self.history, self.fraction = [], None

    def on_train_begin(self, logs=None):
        self._layers = _require_psp_layers(self.model, "FlopsBudget")
        self._slots = [(r, a) for layer in self._layers for r, a in _strength_slots(layer)]
        base = np.asarray([getattr(r, a) for r, a in self._slots], "float64")
        if self.initial_strength is not None or not base.any():
            from keras_psp.wrapper import DEFAULT_STRENGTH

            base = np.full(len(base), self.initial_strength or DEFAULT_STRENGTH)
        start = float(base.mean())
        self._bounds = (self.min_strength or start / 100, self.max_strength or start * 4)
        if self._bounds[0] > self._bounds[1]:
            raise ValueError(f"FlopsBudget: min_strength > max_strength: {self._bounds}.")
        self._base, self._scale, self._gain = base / start, start, 1.0
        self._trend = 0.0
        self._set(float(np.clip(start, *self._bounds)))
        self._cost = _SlimCost(self.model, self._layers)
        self._look = _SlimCost(self.model, self._layers)
        self.history, self.fraction = [], None

    def _looking_ahead(self) -> float:
        """FLOPs fraction if the threshold were `lookahead` times higher."""
        thresholds = [layer.threshold for layer in self._layers]
        try:
            for layer, threshold in zip(self._layers, thresholds, strict=True):
                layer.threshold = min(threshold * self.lookahead, 0.5)
            return self._look(_masks(self._layers))[0]
        finally:
            for layer, threshold in zip(self._layers, thresholds, strict=True):
                layer.threshold = threshold

    @property
    def strength(self) -> float:
        """The current strength (mean over the PSP layers' regularizers)."""
        return self._scale

    def _set(self, strength):
        self._scale = strength
        for (regularizer, attr), base in zip(self._slots, self._base, strict=True):
            setattr(regularizer, attr, float(base * strength))
        self.model.make_train_function(force=True)

    def goal(self, epoch: int) -> float:
        """The FLOPs fraction aimed at after `epoch` (0-based)."""
        epochs = (self.params or {}).get("epochs") or 1
        progress = min(1.0, (epoch + 1) / max(1, math.ceil(self.ramp * epochs)))
        return 1.0 - (1.0 - self.target) * (progress if self.ramp else 1.0)

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        fraction = logs.get("psp_flops")
        if fraction is None or not math.isfinite(fraction):
            fraction = logs["psp_flops"] = self._cost(_masks(self._layers))[0]
        used, goal = self.strength, self.goal(epoch + 1)  # aim one epoch ahead
        logs["psp_strength"] = used
        if self.fraction is not None and math.isfinite(fraction):
            self._trend = (self._trend + fraction - self.fraction) / 2
        predicted = fraction + self._trend  # where the pruning is heading: next epoch
        if self.lookahead > 1 and math.isfinite(fraction):
            predicted = min(predicted, self._looking_ahead())
        aim = goal + self.tolerance / 2  # from above: cuts are hard to undo
        if not math.isfinite(fraction):  # diverged: stop pushing
            step = -1.0
        elif abs(predicted - aim) <= self.tolerance / 2:
            step = 0.0
        else:
            step = float(np.clip((predicted - aim) / (2 * self.tolerance), -1.0, 1.0))
        if step:  # brake at full strength; push more gently after each brake
            self._gain = self._gain / 2 if step < 0 else min(1.0, self._gain * 1.5)
            new = used * self.factor ** (step if step < 0 else self._gain * step)
            new = float(np.clip(new, *self._bounds))
            if abs(new / used - 1) > 1e-3:
                self._set(new)
        self.fraction = fraction
        self.history.append({"epoch": epoch, "psp_flops": fraction, "predicted": predicted, "goal": self.goal(epoch),
                             "strength": used, "next_strength": self.strength})
        if self.verbose:
            io_utils.print_msg(
                f"FlopsBudget epoch {epoch + 1}: FLOPs {fraction:.3f} (next goal {goal:.3f}, target "
                f"{self.target:g} ± {self.tolerance:g}), strength {used:.3g} -> {self.strength:.3g}")

    def on_train_end(self, logs=None):
        if self.fraction is not None and not abs(self.fraction - self.target) <= self.tolerance:
            warnings.warn(
                f"FlopsBudget: training ended at a FLOPs fraction of {self.fraction:.3f}, "
                f"outside {self.target:g} ± {self.tolerance:g}. Train for more epochs or "
                "start from a different `initial_strength`.", stacklevel=2)
