"""`SeparationMonitor`: a callback that shows how PSP's α separate during `fit`.

It takes the slimmed model's cost from `keras_psp.slim` itself (one slim per
check, reused while the cut set stays the same): what slimming will give.
Its sibling `keras_psp.budget.FlopsBudget` steers the α strength instead."""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.cloning import psp_layers
from keras_psp.distributed.cluster import is_chief
from keras_psp.graph import counted_at_input_shape
from keras_psp.slim_cost import SlimCost
from keras_psp.slim_cost import masks as _masks
from keras_psp.slim_cost import require_psp_layers as _require_psp_layers
from keras_psp.stats import FLOOR, model_stats


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
            TensorFlow backend only (else one warning). Written by the chief
            process only (`keras_psp.distributed.is_chief`).
        patience: Stop once the cut set has not changed for this many epochs
            and the separation is >= `min_separation`; never with non-finite α.
        min_separation: Separation needed for `patience` to stop.
        flops: Compute the slimmed model's FLOPs and parameters.
        verbose: 1 prints one line per epoch; 0 is silent.
        input_shape: For a model whose inputs have sizes left open (token
            sequences): the size of one example to count FLOPs at, as
            `keras_psp.count_flops` takes it. None: the model's own shapes.

    Example:

    ```python
    monitor = keras_psp.SeparationMonitor(patience=3)
    model.fit(x, y, epochs=30, callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
    monitor.history[-1]["psp_flops"]   # FLOPs of the slimmed model / unpruned
    ```
    """

    def __init__(self, every_n_steps: int | None = None, log_dir: str | None = None,
                 patience: int | None = None, min_separation: float = 0.5, flops: bool = True,
                 verbose: int = 1, input_shape=None):
        super().__init__()
        self.input_shape = input_shape
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
        self._wait, self._step, self._steps_done, self._writer = 0, 0, 0, None
        self._next_check, self._warned, self.stopped_epoch = self.every_n_steps or 0, set(), None
        self._started = False
        layers = psp_layers(self.model)
        if not layers or all(layer.built for layer in layers):
            self._start()  # else: a model that fit builds on its first batch

    @counted_at_input_shape
    def _start(self):
        self._psp = _require_psp_layers(self.model, "SeparationMonitor", graph=self.flops)
        if self.flops and getattr(self._cost, "model", None) is not self.model:
            self._cost = SlimCost(self.model, self._psp)  # kept across fits of one model
        self._last = self._epoch_start = _masks(self._psp)
        self._started = True
        if self.log_dir and keras.backend.backend() != "tensorflow":
            warnings.warn(f"SeparationMonitor: `log_dir` needs the TensorFlow backend; the "
                          f"'{keras.backend.backend()}' backend writes no event file.", stacklevel=2)
        elif self.log_dir and is_chief():  # several processes: one writer
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    @counted_at_input_shape
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
        if not self._started:
            self._start()
        self._step = self._steps_done + batch + 1  # steps since training began
        if self._step < self._next_check:
            return
        self._next_check = (self._step // self.every_n_steps + 1) * self.every_n_steps
        getattr(self.model, "jax_state_sync", lambda: None)()  # JAX: the trained α
        record = self._check(self._last)[0]
        self.step_history.append({"step": self._step, **record})
        self._write("batch", self._step, record, self.layers)

    def on_epoch_end(self, epoch, logs=None):
        if not self._started:
            self._start()
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
                f"\nPSP epoch {epoch + 1}: cut {cut}/{total} ({100 * record['psp_cut']:.1f}%), "
                f"separation {record['psp_separation']:.3f}, changed {record['psp_changed']}"
                + (f", FLOPs {record['psp_flops']:.3f}, params {record['psp_params']:.3f}"
                   if "psp_flops" in record else "") + ("" if finite else ", NON-FINITE α"))
        if (self.patience is not None and finite and self._wait >= self.patience
                and record["psp_separation"] >= self.min_separation):
            self.stopped_epoch, self.model.stop_training = epoch, True
            if self.verbose:
                io_utils.print_msg(f"\nPSP: cut set unchanged for {self._wait} epoch(s) at "
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
