"""`FlopsBudget` and `LatencyBudget`: cut on a schedule until the slimmed model meets a
FLOPs or a measured-latency target."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.cloning import psp_layers
from keras_psp.flops import count_flops
from keras_psp.graph import counted_at_input_shape
from keras_psp.ranking import ALLOCATIONS, prune_to, reachable
from keras_psp.recalibration import recalibrate
from keras_psp.slim_cost import require_psp_layers as _require_psp_layers
from keras_psp.slim_cost import warn_partial
from keras_psp.surgery.cost import slim_flops

#: The threshold `FlopsBudget` gives every PSP layer: only its own cuts (α set to
#: exactly 0) remove structures, so that it alone decides how many.
BUDGET_THRESHOLD = 0.0


def set_strength(model: keras.Model, strength: float) -> None:
    """Sets the α penalty strength of every PSP layer, e.g. `set_strength(model, 5e-2)`.

    The strength lives in a variable of each layer (`PSP.alpha_strength`), so
    the next training step uses it: no new trace of the train function (TF
    graph, XLA or JAX jit), also in the middle of `fit`. On JAX inside `fit`,
    call `model.jax_state_sync()` first.
    """
    if not strength >= 0:
        raise ValueError(f"set_strength: `strength` must be >= 0, got {strength}.")
    for layer in _require_psp_layers(model, "set_strength"):
        layer.set_strength(strength)


def schedule(progress: float, target: float, begin: float, end: float) -> float:
    """The FLOPs fraction aimed at when `progress` of the training is done.

    1 until `begin`, then a cubic fall to `target` at `end` (fractions of the
    training; Zhu & Gupta's gradual pruning schedule): most structures go
    early, while the network can still adapt, and the last ones slowly.
    """
    if progress <= begin:
        return 1.0
    done = min(1.0, (progress - begin) / max(end - begin, 1e-12))
    return target + (1.0 - target) * (1.0 - done) ** 3


class FlopsBudget(keras.callbacks.Callback):
    """Cuts structures during `fit` so that the slimmed model meets a FLOPs target.

    PSP's penalty decides *which* structures are unimportant (their α
    shrink); this callback decides *how many* go, and when. At
    `checks_per_epoch` points of each epoch it computes the goal of a
    schedule (`schedule`: 1 until `begin`, then a cubic fall to `target` at
    `end`, as fractions of the epochs) and, when the slimmed model's FLOPs
    are above it, cuts the lowest-ranked structures until they are not
    (`keras_psp.prune_to`: α relative to its layer, ranked over the whole
    model; a cut sets α and its optimizer slots to exactly 0, so it stays cut
    and nothing retraces). Cuts only add up; after `end`, the rest of the
    training fine-tunes the final network, with the α penalty switched off
    (strength 0: it would only go on shrinking α of structures that stay).
    The fraction reached lands at or just below `target` (by at most one
    structure's FLOPs), whatever the number of epochs or the penalty's
    strength.

    While it runs, every PSP layer's threshold is `BUDGET_THRESHOLD` (0:
    only α that are exactly 0 are cut), so that α crossing the usual
    threshold (an L1-type penalty pins small α near 0 as the learning rate
    decays) do not cut structures behind its back; the thresholds stay there
    after training, which keeps the cut set that met the target.

    Progress is visible: with `verbose=1` one line per epoch (FLOPs, goal,
    structures cut, and the validation accuracy when there is one). A target
    that cutting cannot reach (the FLOPs sit in layers PSP does not wrap) is
    an error at the start of `fit`, not a surprise at its end.

    BatchNormalization statistics go stale after a cut (training mode uses
    batch statistics, inference the slow moving averages): give
    `recalibrate=` some training inputs, and they are re-estimated
    (`keras_psp.recalibrate`) before each validation and at the end of
    training, so that the validation accuracy `fit` logs is the pruned
    model's real one, and so is the trained model's.

    Logs `psp_flops` (the fraction after the epoch's cuts) and `psp_goal`.

    Args:
        target: FLOPs of the slimmed model over the unpruned model's, in (0, 1].
        begin: Fraction of the epochs before the first cut, in [0, 1).
        end: Fraction of the epochs at which `target` is reached, in
            (`begin`, 1].
        checks_per_epoch: Cut checks per epoch (the last at the epoch end);
            more than one needs a known number of steps per epoch.
        allocation: How cuts spread over the layers (`keras_psp.prune_to`):
            "uniform" (the same fraction of each layer) or "global".
        min_keep: Structures every PSP layer keeps at least.
        recalibrate: Training inputs (array, `(x, y)` tuple, `tf.data.Dataset`
            or iterable of batches) to re-estimate BN statistics on; None:
            no recalibration.
        recalibration_steps: Batches of `recalibrate` used each time.
        verbose: 1 prints one line per epoch; 0 is silent.
        multiple_of: Cut in blocks so that every PSP layer and channel group
            keeps a multiple of this many structures (`keras_psp.prune_to`);
            with `structure="group"` the slim model's widths are multiples.
        input_shape: For a model whose inputs have sizes left open (token
            sequences): the size of one example to count FLOPs at, as
            `keras_psp.count_flops` takes it. None: the model's own shapes.

    Example:

    ```python
    budget = keras_psp.FlopsBudget(target=0.5, recalibrate=x_train[:2048])
    model.fit(x, y, epochs=3, validation_data=(x_val, y_val), callbacks=[budget])
    keras_psp.count_flops(keras_psp.slim(model)) / keras_psp.count_flops(model)  # ≤ 0.5
    ```
    """

    def __init__(self, target: float = 0.5, begin: float = 0.0, end: float = 0.5,
                 checks_per_epoch: int = 4, allocation: str = "uniform", min_keep: int = 1,
                 recalibrate=None, recalibration_steps: int = 16, verbose: int = 1,
                 multiple_of: int | None = None, input_shape=None):
        super().__init__()
        self.input_shape = input_shape
        for name, value, ok, what in (
            ("target", target, 0 < target <= 1, f"in (0, 1] (a fraction of the unpruned {self._what})"),
            ("begin", begin, 0 <= begin < 1, "in [0, 1)"),
            ("end", end, begin < end <= 1, f"in (begin={begin}, 1]"),
            ("checks_per_epoch", checks_per_epoch,
             isinstance(checks_per_epoch, int) and checks_per_epoch >= 1, "an integer >= 1"),
            ("min_keep", min_keep, isinstance(min_keep, int) and min_keep >= 1, "an integer >= 1"),
            ("recalibration_steps", recalibration_steps,
             isinstance(recalibration_steps, int) and recalibration_steps >= 1, "an integer >= 1"),
            ("multiple_of", multiple_of, multiple_of is None or (
                isinstance(multiple_of, int) and not isinstance(multiple_of, bool)
                and multiple_of >= 1), "a positive integer or None"),
        ):
            if not ok:
                raise ValueError(f"{type(self).__name__}: `{name}` must be {what}, got {value!r}.")
        self.target, self.begin, self.end = float(target), float(begin), float(end)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"{type(self).__name__}: `allocation` must be one of {ALLOCATIONS}, got "
                             f"{allocation!r}.")
        self.checks_per_epoch, self.min_keep, self.allocation = checks_per_epoch, min_keep, allocation
        self.recalibration_data, self.recalibration_steps = recalibrate, recalibration_steps
        self.verbose, self.multiple_of = verbose, multiple_of
        self.history, self.checks, self.fraction = [], [], None
        self._started, self._in_fit, self._epoch_end_done, self._stale = False, False, False, False
        if checks_per_epoch > 1:  # only then: a batch hook turns off async dispatch
            self.on_train_batch_end = self._on_step

    # -- the schedule ---------------------------------------------------------

    def goal(self, epochs_done: float) -> float:
        """The FLOPs fraction aimed at after `epochs_done` epochs (fractional mid-epoch)."""
        total = (self.params or {}).get("epochs") or 1
        return schedule(epochs_done / total, self.target, self.begin, self.end)

    def on_train_begin(self, logs=None):
        self.history, self.checks, self.fraction, self._started = [], [], None, False
        self._epoch, self._stale, self._epoch_end_done, self._in_fit = 0, False, False, True
        steps, checks = (self.params or {}).get("steps"), self.checks_per_epoch
        self._check_at = sorted({round(k * steps / checks) for k in range(1, checks)} - {0, steps}
                                ) if steps else []
        layers = psp_layers(self.model)
        if not layers or all(layer.built for layer in layers):
            self._start()  # else: a model that fit builds on its first batch

    @counted_at_input_shape
    def _start(self):
        self._layers = _require_psp_layers(self.model, "FlopsBudget", graph=True)
        smallest = reachable(self.model, self.min_keep, self.multiple_of, self._profile)
        if smallest > self.target:
            raise ValueError(
                f"{type(self).__name__}: the target {self.target:.3f} cannot be reached on model "
                f"'{self.model.name}': cutting every structure but {self.min_keep} per PSP layer "
                f"leaves {smallest:.3f} of the {self._what} (the rest sits in layers PSP does not wrap "
                "or surgery keeps whole). Wrap more layers, or aim at "
                f"{math.ceil(smallest * 100) / 100:.2f} or more."
            )
        for layer in self._layers:
            layer.threshold = min(layer.threshold, BUDGET_THRESHOLD)
        self._total = self._measure()
        self.fraction, self._started, self._penalty = self._total, True, True

    #: What the target is a fraction of, and the key `fit` logs the fraction under.
    _what, _log = "FLOPs", "psp_flops"
    _profile = None

    def _measure(self) -> float:
        """The fraction of the slimmed model now (FLOPs here)."""
        return slim_flops(self.model) / self._unpruned()

    def _cut(self, goal: float):
        return prune_to(self.model, goal, allocation=self.allocation, min_keep=self.min_keep,
                        optimizer=getattr(self.model, "optimizer", None),
                        multiple_of=self.multiple_of)

    def _switch_off_penalty(self) -> None:
        """After `end`: the cut set is final, and a penalty would only go on eroding the
        kept structures (their α shrink although nothing more will be cut)."""
        for layer in self._layers:
            if layer.alpha_strength is not None:
                layer.set_strength(0.0)
        self._penalty = False

    def _unpruned(self) -> float:
        if not hasattr(self, "_unpruned_flops"):
            self._unpruned_flops = max(count_flops(self.model), 1)
            warn_partial(self.model, type(self).__name__)
        return self._unpruned_flops

    # -- checks -----------------------------------------------------------------

    @counted_at_input_shape
    def _control(self, done: float) -> None:
        """One check after `done` epochs: cut down to the schedule's goal."""
        if not self._started:
            self._start()
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the trained α
        goal = self.goal(done)
        if done / ((self.params or {}).get("epochs") or 1) >= self.end - 1e-9 and self._penalty:
            self._switch_off_penalty()
        before = self.fraction = self._measure()
        if self.fraction > goal:
            cut = self._cut(goal)
            self.fraction = cut.reached
            self._stale = self._stale or cut.count > 0
        self.checks.append({"epochs": done, "goal": goal, "before": before,
                            self._log: self.fraction})

    def _on_step(self, batch, logs=None):
        if batch + 1 in self._check_at:
            self._control(self._epoch + (batch + 1) / self.params["steps"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_end_done = epoch, False

    def _recalibrate(self) -> None:
        if self.recalibration_data is not None and self._started:
            getattr(self.model, "jax_state_sync", lambda: None)()
            recalibrate(self.model, self.recalibration_data, steps=self.recalibration_steps)
            self._stale = False

    def on_test_begin(self, logs=None):  # fit's validation comes before on_epoch_end
        if not self._in_fit:
            return
        if not self._epoch_end_done:  # the epoch's last check, so validation sees its cut
            self._control(self._epoch + 1)
            self._epoch_end_done = True
        self._recalibrate()

    @counted_at_input_shape
    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        if not self._epoch_end_done:
            self._control(epoch + 1)
        self._epoch_end_done = True
        self._recalibrate()
        logs[self._log], logs["psp_goal"] = self.fraction, self.goal(epoch + 1)
        cut = sum(int(np.size(layer.mask()) - np.sum(layer.mask())) for layer in self._layers)
        total = sum(int(np.size(layer.mask())) for layer in self._layers)
        record = {"epoch": epoch, self._log: self.fraction, "goal": self.goal(epoch + 1),
                  "cut": cut, "total": total}
        record.update({k: v for k, v in logs.items() if k.startswith("val_")})
        self.history.append(record)
        if self.verbose:
            validation = "".join(f", {k} {v:.4f}" for k, v in logs.items()
                                 if k in ("val_accuracy", "val_loss"))
            io_utils.print_msg(  # a line of its own after the progress bar, as Keras's do
                f"\n{type(self).__name__} epoch {epoch + 1}/{self.params.get('epochs', '?')}: "
                f"{self._what} "
                f"{self.fraction:.3f} (goal {self.goal(epoch + 1):.3f}, target {self.target:.3f}), "
                f"{cut}/{total} structures cut{validation}")

    def on_train_end(self, logs=None):
        self._in_fit = False
        self._recalibrate()


class LatencyBudget(FlopsBudget):
    """`FlopsBudget`'s counterpart for measured time: cuts until the slimmed
    model's latency, as a `keras_psp.latency.LatencyProfile` predicts it, is
    `target` times the unpruned model's.

    Everything else is as in `FlopsBudget` (the schedule, recalibration, the
    penalty switched off after `end`); the cuts go first where α is small per
    millisecond saved (`keras_psp.prune_to(latency=...)`). Logs
    `psp_latency` (the predicted fraction after the epoch's cuts) and
    `psp_goal`.

    Args:
        target: Predicted latency of the slimmed model over the unpruned
            model's, in (0, 1].
        profile: A `LatencyProfile` of the model being trained
            (`keras_psp.latency.profile(model, runtime=...)`).
        **kwargs: `FlopsBudget`'s other arguments.

    Example:

    ```python
    table = keras_psp.latency.profile(model, runtime="litert")
    budget = keras_psp.LatencyBudget(0.6, table, recalibrate=x_train[:2048])
    model.fit(x, y, epochs=3, callbacks=[budget])
    table.predict(model) / table.dense_ms       # ≤ 0.6
    ```
    """

    _what, _log = "predicted latency", "psp_latency"

    def __init__(self, target: float = 0.6, profile=None, **kwargs):
        if not hasattr(profile, "predict") or not hasattr(profile, "dense_ms"):
            raise ValueError("LatencyBudget: `profile` must be a LatencyProfile from "
                             f"keras_psp.latency.profile(model); got {profile!r}.")
        super().__init__(target, **kwargs)
        self._profile = profile

    def _measure(self) -> float:
        return self._profile.predict(self.model) / self._profile.dense_ms

    def _cut(self, goal: float):
        return prune_to(self.model, latency=goal, profile=self._profile,
                        allocation=self.allocation, min_keep=self.min_keep,
                        optimizer=getattr(self.model, "optimizer", None),
                        multiple_of=self.multiple_of)
