"""`FlopsBudget`: steer the α strength so the slimmed model meets a FLOPs target."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.slim_cost import SlimCost
from keras_psp.slim_cost import masks as _masks
from keras_psp.slim_cost import require_psp_layers as _require_psp_layers


def _strength(layer) -> float:
    """The α strength in use by a PSP layer (L2 or L1 only)."""
    if layer.alpha_strength is None:
        layer.set_strength(0.0)  # raises the error naming the layer and what to do
    return float(keras.ops.convert_to_numpy(layer.alpha_strength))


def set_strength(model: keras.Model, strength: float) -> None:
    """Sets the L2/L1 α strength of every PSP layer, e.g. `set_strength(model, 5e-2)`.

    The strength lives in a variable of each layer (`PSP.alpha_strength`), so
    the next training step uses it: no new trace of the train function (TF
    graph, XLA or JAX jit), also in the middle of `fit`. On JAX inside `fit`,
    call `model.jax_state_sync()` first (as `FlopsBudget` does at its checks).
    """
    if not strength >= 0:
        raise ValueError(f"set_strength: `strength` must be >= 0, got {strength}.")
    for layer in _require_psp_layers(model, "set_strength"):
        layer.set_strength(strength)


def _zero_entries(optimizer, variable, entries: np.ndarray) -> None:
    """Sets `entries` (a flat boolean mask) of `variable` and of its optimizer
    slots (Keras names them `<variable path>_<slot>`) to 0."""
    slot_prefix = variable.path.replace("/", "_") + "_"
    slots = [v for v in getattr(optimizer, "variables", [])
             if v.name.startswith(slot_prefix) and tuple(v.shape) == tuple(variable.shape)]
    for target in [variable, *slots]:
        value = np.ravel(keras.ops.convert_to_numpy(target)).copy()
        value[entries] = 0
        target.assign(value.reshape(tuple(target.shape)).astype(target.dtype))


class FlopsBudget(keras.callbacks.Callback):
    """Adapts the α regularization strength so the slimmed model meets a FLOPs budget.

    At `checks_per_epoch` points of each epoch it takes the FLOPs of
    `keras_psp.slim(model)` as a fraction of the unpruned model's and
    multiplies the strength of every PSP layer's α regularizer (L2 or L1; one
    strength for all) by `factor ** step` (pushes: at most `factor` per
    epoch; brakes: per check):
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
      |step| in [0.25, 1]. Brakes act in full; pushes after hard brakes
      (about to pass the target) are damped. The default `ramp` (0.3) front-
      loads the pruning: with a decaying learning rate, late epochs move α
      little whatever the strength.
    - once the fraction reaches `target + tolerance / 4` it holds the cut set:
      the strength goes to `min_strength`, and at every later check the α
      of cut structures and their optimizer slots are set to exactly 0 and
      each layer's `threshold` is kept 100× below its smallest kept relative
      |α|, so no more structures are cut (with BN, α already on their way
      down go on falling for epochs even at zero strength: on Fashion-MNIST
      0.28 → 0.16 of the FLOPs). `locked_at` records when (in epochs).
    A strength change takes effect at the next step (`set_strength` writes
    the layers' strength variables: no new trace); a threshold lowered
    while holding rebuilds the train function. Logs
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
        checks_per_epoch: Checks (and possible strength changes) per epoch;
            the last at the epoch end. More than one needs a known number of
            steps per epoch. Pruning can collapse within one epoch once the
            strength passes a point (Fashion-MNIST: 0.74 → 0.27 of the FLOPs
            in the epoch after a doubling), so the default checks 4 times.
        verbose: 1 prints one line per epoch; 0 is silent.

    Example:

    ```python
    budget = keras_psp.FlopsBudget(target=0.5)
    model.fit(x, y, epochs=20, callbacks=[keras_psp.SeparationMonitor(), budget])
    keras_psp.count_flops(keras_psp.slim(model)) / keras_psp.count_flops(model)  # ≈ 0.5
    ```
    """

    def __init__(self, target: float = 0.5, tolerance: float = 0.05, factor: float = 2.0,
                 ramp: float = 0.3, lookahead: float = 3.0, initial_strength: float | None = None,
                 min_strength: float | None = None, max_strength: float | None = None,
                 checks_per_epoch: int = 4, verbose: int = 1):
        super().__init__()
        if not isinstance(checks_per_epoch, int) or checks_per_epoch < 1:
            raise ValueError("FlopsBudget: `checks_per_epoch` must be an integer >= 1, got "
                             f"{checks_per_epoch!r}.")
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
        self.checks_per_epoch = checks_per_epoch
        self.history, self.checks, self.fraction, self.strength = [], [], None, None
        self.locked_at, self._held = None, {}
        if checks_per_epoch > 1:  # only then: a batch hook turns off async dispatch
            self.on_train_batch_end = self._on_step

    def on_train_begin(self, logs=None):
        from keras_psp.wrapper import DEFAULT_STRENGTH

        self._layers = _require_psp_layers(self.model, "FlopsBudget", graph=True)
        now = [_strength(layer) for layer in self._layers]
        start = self.initial_strength or float(np.mean(now)) or DEFAULT_STRENGTH
        self._bounds = (self.min_strength or start / 100, self.max_strength or start * 10)
        if self._bounds[0] > self._bounds[1]:
            raise ValueError(f"FlopsBudget: min_strength > max_strength: {self._bounds}.")
        self._gain, self._trend, self.history, self.checks, self.fraction = 1.0, 0.0, [], [], None
        self.locked_at, self._held = None, {}
        steps, checks = (self.params or {}).get("steps"), self.checks_per_epoch
        self._check_at = sorted({round(k * steps / checks) for k in range(1, checks)} - {0, steps}
                                ) if steps else []
        self._epoch = 0
        self._set(float(np.clip(start, *self._bounds)))
        self._cost, self._look = (SlimCost(self.model, self._layers) for _ in range(2))

    def _set(self, strength: float) -> None:
        self.strength = strength
        set_strength(self.model, strength)

    def _hold_cut_set(self) -> bool:
        """Keeps the cut set. Cut structures (those cut now, or at any check
        since the hold began) get α = 0 and their optimizer slots (momentum)
        zeroed: cut whatever the threshold, no change to the function (they
        are zero in the forward pass already), and no velocity left to carry
        them back. Each layer's threshold is kept 100× below its smallest
        kept |α| (relative): with BN, α on their way down go on falling after
        the strength is lowered, faster than 2× between checks (DESIGN.md
        §3). True if a threshold changed (the train function must be rebuilt)."""
        changed = False
        for layer in self._layers:
            alpha = np.ravel(keras.ops.convert_to_numpy(layer.alpha)).astype("float64")
            if not np.all(np.isfinite(alpha)):
                continue
            cut = self._held.get(layer.name, np.zeros(alpha.size, bool)) | ~np.ravel(layer.mask())
            if cut.all():
                continue
            self._held[layer.name] = cut
            if cut.any():
                _zero_entries(self.model.optimizer, layer.alpha, cut)
            reference = 1.0 if layer.structure == "layer" else np.abs(alpha).max()
            smallest = np.abs(alpha[~cut]).min() / reference
            if smallest < 10 * layer.threshold:
                layer.threshold = max(smallest / 100, 1e-12)
                changed = True
        return changed

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

    def goal(self, epoch: int | float) -> float:
        """The FLOPs fraction aimed at after `epoch` (0-based; fractions: mid-epoch)."""
        ramp = max(1, math.ceil(self.ramp * ((self.params or {}).get("epochs") or 1)))
        return 1.0 - (1.0 - self.target) * min(1.0, (epoch + 1) / ramp)

    def _step(self, predicted: float, next_goal: float) -> tuple[float, bool]:
        """Strength change in powers of `factor` from the prediction's distance
        to the next check's goal (aimed at from above, held within a quarter
        tolerance), and whether it is a hard brake: the final target is about
        to be passed. Braking only because ahead of the ramp is mild."""
        quarter = self.tolerance / 4
        distance = predicted - (next_goal + 2 * quarter)
        if abs(distance) <= quarter:
            return 0.0, False
        step = float(np.clip(distance / (2 * self.tolerance), -1.0, 1.0))
        if step < 0 and predicted >= self.target + quarter:
            return max(step, -0.25), False
        return step, step < 0

    def _control(self, done: float, fraction: float) -> float:
        """One check after `done` epochs (fractional mid-epoch); returns the
        prediction. Pushes move at most `factor` per epoch, brakes per check."""
        used, interval = self.strength, 1.0 / self.checks_per_epoch
        reached = self.locked_at is None and fraction <= self.target + self.tolerance / 4
        if reached:  # hold this cut set from now on, at the lowest strength
            self.locked_at = done
            self._set(self._bounds[0])
        if self.locked_at is not None:
            if self._hold_cut_set():  # a threshold is a Python float in the trace
                self.model.make_train_function(force=True)
            self.fraction = fraction
            self.checks.append({"epochs": done, "psp_flops": fraction, "predicted": fraction,
                                "goal": self.goal(done - 1), "strength": used,
                                "new_strength": self.strength})
            return fraction
        if not math.isfinite(fraction):  # diverged: stop pushing
            predicted, step, hard = fraction, -1.0, True
        else:
            if self.fraction is not None:
                self._trend = (self._trend + fraction - self.fraction) / 2
            predicted = fraction + self._trend
            if self.lookahead > 1:
                predicted = min(predicted, self._looking_ahead())
            step, hard = self._step(predicted, self.goal(done - 1 + interval))
        if step:  # brakes in full, pushes damped after hard brakes
            self._gain = self._gain / 2 if hard else min(1.0, self._gain * 1.5)
            power = step * self._gain * interval if step > 0 else step
            new = float(np.clip(used * self.factor ** power, *self._bounds))
            if abs(new / used - 1) > 1e-3:
                self._set(new)
        self.fraction = fraction
        self.checks.append({"epochs": done, "psp_flops": fraction, "predicted": predicted,
                            "goal": self.goal(done - 1), "strength": used,
                            "new_strength": self.strength})
        return predicted

    def _on_step(self, batch, logs=None):
        if batch + 1 not in self._check_at:
            return
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the trained α
        done = self._epoch + (batch + 1) / self.params["steps"]
        self._control(done, self._cost(_masks(self._layers))[0])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        fraction = logs.get("psp_flops")
        if fraction is None or not math.isfinite(fraction):
            fraction = logs["psp_flops"] = self._cost(_masks(self._layers))[0]
        used = logs["psp_strength"] = self.strength
        predicted = self._control(epoch + 1, fraction)
        self.history.append({"epoch": epoch, "psp_flops": fraction, "predicted": predicted,
                             "goal": self.goal(epoch), "strength": used})
        if self.verbose:
            io_utils.print_msg(
                f"FlopsBudget epoch {epoch + 1}: FLOPs {fraction:.3f} (goal {self.goal(epoch):.3f}"
                f", predicted {predicted:.3f}), strength {used:.3g} -> {self.strength:.3g}"
                + ("" if self.locked_at is None else f"; holding the cut set since epoch "
                   f"{self.locked_at:.2f}"))

    def on_train_end(self, logs=None):
        if self.fraction is not None and not abs(self.fraction - self.target) <= self.tolerance:
            advice = ("Train for more epochs, or raise `max_strength` (too little pruning)."
                      if self.fraction > self.target else "Lower `factor` or `max_strength`, "
                      "or raise `ramp` (pruning overshot).")
            warnings.warn(f"FlopsBudget: training ended at a FLOPs fraction of {self.fraction:.3f}, "
                          f"outside {self.target:g} ± {self.tolerance:g}. {advice}", stacklevel=2)
