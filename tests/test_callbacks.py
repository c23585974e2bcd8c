"""SeparationMonitor and FlopsBudget: statistics, logs, TensorBoard, patience, budget."""

import csv
import glob
import math
import warnings

import keras
import numpy as np
import pytest
import scipy.stats

from helpers import small_cnn
from keras_psp import FlopsBudget, SeparationMonitor, count_flops, slim, wrap
from keras_psp.budget import set_strength
from keras_psp.cloning import psp_layers
from keras_psp.stats import separation

FIGURES = ("psp_cut", "psp_separation", "psp_changed", "psp_flops", "psp_params")


def _model(batchnorm=True, strength=None, lr=0.05, jit_compile="auto", regularizer=None):
    kwargs = {} if regularizer is None else {"regularizer": regularizer}
    model = wrap(small_cnn(batchnorm=batchnorm), strength=strength, **kwargs)
    model.compile(keras.optimizers.SGD(lr, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    return model


def _check(monitor, model, epoch=0):
    """One epoch-end check without fit; returns the logs."""
    monitor.set_model(model)
    if not hasattr(monitor, "_psp"):
        monitor.on_train_begin()
    logs = {}
    monitor.on_epoch_end(epoch, logs)
    return logs


def _bimodal(n, rng, cut):
    alpha = rng.uniform(0.5, 1.0, n)
    alpha[:cut] = rng.uniform(1e-7, 1e-6, cut)
    return alpha.astype("float32")


def _log_normal(n, decades=1.0):
    """n Gaussian quantiles in log10 |α|, centred on the 1e-2 threshold."""
    quantiles = scipy.stats.norm.ppf((np.arange(n) + 0.5) / n)
    return 10.0 ** (-2.0 + decades * quantiles) / 10.0 ** (-2.0 + decades * quantiles.max())


# -- the statistic ------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 1000])
def test_separation_statistic(n, rng):
    # one Gaussian in log10 |α| scores ~0 wherever the threshold cuts it
    for decades in (0.5, 1.0, 3.0):
        assert separation(_log_normal(n, decades), 1e-2) < 0.05
        assert separation(_log_normal(n, decades), 1e-4) < 0.05
    # two compact groups decades apart score near 1, a flat spread in between
    two = np.r_[10 ** rng.normal(-0.2, 0.2, n - n // 5), 10 ** rng.normal(-7, 0.3, n // 5)]
    assert separation(two / two.max(), 1e-2) > 0.9
    flat = np.logspace(0, -8, n)
    assert 0.2 < separation(flat, 1e-4) < 0.4
    # 0 when one group is empty; floor: α = 0 counts as 1e-8
    assert separation(np.ones(n), 1e-2) == 0.0
    assert separation(np.r_[np.ones(n - 1), 0.0], 1e-2) == 1.0
    # pulling the cut group further down raises it; tails into the gap lower it
    assert separation(two / two.max() * np.r_[np.ones(n - n // 5), np.full(n // 5, 0.1)],
                      1e-2) > separation(two / two.max(), 1e-2)
    tails = np.r_[two / two.max(), np.logspace(-1.5, -3, n // 5)]
    assert separation(tails, 1e-2) < separation(two / two.max(), 1e-2) - 0.05


@pytest.mark.parametrize("batchnorm", [True, False], ids=["with_bn", "without_bn"])
def test_separation_high_for_bimodal_low_for_unimodal(batchnorm, rng):
    model = _model(batchnorm)
    conv1 = model.get_layer("conv1")  # 8 input-channel α
    monitor = SeparationMonitor(flops=False, verbose=0)
    conv1.alpha.assign(_bimodal(8, rng, cut=3))
    bimodal = _check(monitor, model)
    by_layer = monitor.history[-1]["layers"]["conv1"]
    assert by_layer["cut"] == 3 and by_layer["separation"] > 0.9
    assert bimodal["psp_separation"] > 0.9
    # unimodal: log-normal (Gaussian quantiles in log10) around the threshold
    conv1.alpha.assign(_log_normal(8).astype("float32"))
    unimodal = _check(monitor, model, 1)
    assert monitor.history[-1]["layers"]["conv1"]["cut"] > 0
    assert monitor.history[-1]["layers"]["conv1"]["separation"] < 0.2
    assert unimodal["psp_separation"] < 0.2
    # a uniform rescaling (what BN cancels) changes nothing
    for alpha in (_bimodal(8, np.random.default_rng(1), 3), _log_normal(8)):
        conv1.alpha.assign(np.asarray(alpha, "float32"))
        before = _check(monitor, model, 2)
        conv1.alpha.assign(np.asarray(alpha, "float32") * 0.01)
        after = _check(monitor, model, 3)
        assert after["psp_changed"] == 0
        assert after["psp_cut"] == before["psp_cut"]
        assert after["psp_separation"] == pytest.approx(before["psp_separation"], abs=1e-6)


def test_no_psp_layers_is_an_error():
    monitor = SeparationMonitor()
    monitor.set_model(small_cnn())
    with pytest.raises(ValueError, match="no PSP layers"):
        monitor.on_train_begin()
    budget = FlopsBudget()
    budget.set_model(small_cnn())
    with pytest.raises(ValueError, match="no PSP layers"):
        budget.on_train_begin()


# -- during fit ---------------------------------------------------------------


def test_logs_in_history_csv_and_step_checks(digits, tmp_path):
    (x, y), _ = digits
    model = _model()
    monitor = SeparationMonitor(every_n_steps=5, verbose=0)
    path = str(tmp_path / "log.csv")
    history = model.fit(x[:320], y[:320], batch_size=32, epochs=2, verbose=0,
                        callbacks=[monitor, keras.callbacks.CSVLogger(path)])
    for key in FIGURES:
        assert len(history.history[key]) == 2
    assert history.history["psp_flops"][0] == pytest.approx(1.0)  # nothing cut yet
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(FIGURES) <= set(rows[0])
    assert [r["step"] for r in monitor.step_history] == [5, 10, 15, 20]
    assert [s.name for s in monitor.layers] == [p.name for p in psp_layers(model)]
    assert len(monitor.history) == 2 and set(monitor.history[0]["layers"]) == {
        "conv0", "conv1", "head"}


def test_flops_and_params_match_slim(rng):
    model = _model()
    model.get_layer("conv1").alpha.assign(_bimodal(8, rng, cut=4))
    model.get_layer("head").alpha.assign(_bimodal(16, rng, cut=6))
    logs = _check(SeparationMonitor(verbose=0), model)
    small = slim(model)
    assert logs["psp_flops"] == pytest.approx(count_flops(small) / count_flops(model))
    plain = model.count_params() - sum(  # minus α and one strength variable per layer
        int(np.prod(p.alpha.shape)) + 1 for p in psp_layers(model))
    assert logs["psp_params"] == pytest.approx(small.count_params() / plain)
    assert logs["psp_cut"] == pytest.approx(10 / 25)


@pytest.mark.tensorflow_only
def test_tensorboard_event_file(digits, tmp_path):
    import tensorflow as tf

    (x, y), _ = digits
    model = _model()
    monitor = SeparationMonitor(log_dir=str(tmp_path), every_n_steps=10, verbose=0)
    model.fit(x[:320], y[:320], batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert len(files) == 1
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(files[0]):
        for value in event.summary.value:
            data = tf.make_ndarray(value.tensor)
            seen.setdefault(value.tag, []).append((event.step, data))
            plugin = "histograms" if "alpha" in value.tag else "scalars"
            assert value.metadata.plugin_data.plugin_name == plugin
    assert [s for s, _ in seen["epoch_psp_cut"]] == [0, 1]
    assert [s for s, _ in seen["batch_psp_separation"]] == [10, 20]
    assert float(seen["epoch_psp_flops"][0][1]) == pytest.approx(1.0)
    histogram = seen["epoch_log10_alpha/conv1"][0][1]
    assert histogram.shape[1] == 3 and histogram[:, 2].sum() == 8  # 8 α in 30 buckets
    assert "epoch_psp_separation/head" in seen


def test_patience_stops_a_frozen_run(digits, rng):
    (x, y), _ = digits
    model = _model(strength=0.0, lr=0.0)  # α cannot move: the cut set is frozen
    model.get_layer("conv1").alpha.assign(_bimodal(8, rng, cut=3))
    monitor = SeparationMonitor(patience=2, min_separation=0.5, flops=False, verbose=0)
    history = model.fit(x[:64], y[:64], batch_size=32, epochs=10, verbose=0, callbacks=[monitor])
    assert len(history.history["loss"]) == 2 and monitor.stopped_epoch == 1
    # ... but not when the separation is below the target
    monitor = SeparationMonitor(patience=2, min_separation=1.0, flops=False, verbose=0)
    history = model.fit(x[:64], y[:64], batch_size=32, epochs=4, verbose=0, callbacks=[monitor])
    assert len(history.history["loss"]) == 4 and monitor.stopped_epoch is None


def test_non_finite_alpha_warns_and_never_stops(digits, rng):
    (x, y), _ = digits
    model = _model(strength=0.0, lr=0.0)
    alpha = _bimodal(8, rng, cut=3)
    alpha[5] = np.nan
    model.get_layer("conv1").alpha.assign(alpha)
    monitor = SeparationMonitor(patience=1, min_separation=0.0, verbose=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x[:64], y[:64], batch_size=32, epochs=3, verbose=0,
                            callbacks=[monitor])
    assert len(history.history["loss"]) == 3 and monitor.stopped_epoch is None
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert any("PSP layer 'conv1' has non-finite α" in m for m in messages)
    assert len(messages) == len(set(messages))  # once per layer (the NaN spreads to all)
    assert math.isnan(history.history["psp_flops"][-1])


def test_warns_when_a_layer_is_about_to_lose_every_structure(rng):
    model = _model()
    # flops=False: with every structure cut, slim itself refuses (only path)
    monitor = SeparationMonitor(verbose=0, flops=False)
    alpha = np.full(8, 1e-6, "float32")
    alpha[2] = 1.0  # one kept of 8
    model.get_layer("conv1").alpha.assign(alpha)
    with pytest.warns(UserWarning, match="'conv1' is about to lose every structure"):
        _check(monitor, model)
    model.get_layer("conv1").alpha.assign(np.zeros(8, "float32"))  # all cut: warned already
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _check(monitor, model, 1)
    with pytest.warns(UserWarning) as record:  # a fresh monitor with FLOPs: NaN, and why
        logs = _check(SeparationMonitor(verbose=0), model)
    messages = " | ".join(str(w.message) for w in record)
    assert "'conv1' is about to lose every structure (0 of 8 kept)" in messages
    assert "cannot slim the model now" in messages and "only path" in messages
    assert math.isnan(logs["psp_flops"]) and logs["psp_cut"] == pytest.approx(8 / 25)


def test_verbose_line(capsys, rng):
    model = _model()
    monitor = SeparationMonitor(verbose=1)
    monitor.set_model(model)
    monitor.on_train_begin()  # nothing cut yet
    model.get_layer("conv1").alpha.assign(_bimodal(8, rng, cut=2))
    _check(monitor, model, 4)
    line = capsys.readouterr().out.strip()
    assert line.startswith("PSP epoch 5: cut 2/25 (8.0%), separation ")
    assert "changed 2, FLOPs " in line and "params" in line


# -- strength and FlopsBudget -------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "jit"])
def test_strength_change_applies_without_a_new_trace(jit_compile, digits):
    """The strength is a variable read by the traced step, not a baked-in float."""
    (x, y), _ = digits
    model = _model(strength=1e-2, lr=0.0, jit_compile=jit_compile,  # lr 0: nothing moves
                   regularizer="l2")  # its loss is strength × Σα²
    for layer in psp_layers(model):
        layer.alpha.assign(np.full(layer.alpha.shape, 10.0, "float32"))
    sum_sq = sum(float(np.sum(np.square(keras.ops.convert_to_numpy(p.alpha))))
                 for p in psp_layers(model))  # 25 α of 10: 2500
    batch = (x[:32], y[:32])
    before = model.train_on_batch(*batch)
    train_function = model.train_function
    set_strength(model, 3e-2)
    after = model.train_on_batch(*batch)
    assert model.train_function is train_function  # the same traced function
    assert after - before == pytest.approx(2e-2 * sum_sq, rel=1e-3)
    for layer in psp_layers(model):
        assert float(keras.ops.convert_to_numpy(layer.alpha_strength)) == pytest.approx(3e-2)
        assert layer.get_config()["regularizer"]["config"]["l2"] == pytest.approx(3e-2)
    with pytest.raises(ValueError, match=">= 0"):
        set_strength(model, -1.0)


@pytest.mark.parametrize("regularizer", ["l2", "relative_l1"])
def test_strength_is_saved_with_the_model(tmp_path, regularizer):
    model = wrap(small_cnn(), strength=1e-2, regularizer=regularizer)
    set_strength(model, 4e-2)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for layer in psp_layers(loaded):
        assert float(keras.ops.convert_to_numpy(layer.alpha_strength)) == pytest.approx(4e-2)
        assert layer.get_config()["regularizer"]["config"][
            "l2" if regularizer == "l2" else "strength"] == pytest.approx(4e-2)


def test_budget_argument_errors():
    for target in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`target` must be in \\(0, 1\\]"):
            FlopsBudget(target=target)
    with pytest.raises(ValueError, match="`end` must be in"):
        FlopsBudget(begin=0.5, end=0.4)
    with pytest.raises(ValueError, match="`begin`"):
        FlopsBudget(begin=1.0)
    with pytest.raises(ValueError, match="`checks_per_epoch`"):
        FlopsBudget(checks_per_epoch=0)
    with pytest.raises(ValueError, match="`min_keep`"):
        FlopsBudget(min_keep=0)


def test_schedule_falls_from_one_to_the_target():
    from keras_psp.budget import schedule

    goals = [schedule(p, 0.4, 0.1, 0.6) for p in np.linspace(0, 1, 21)]
    assert goals[:3] == [1.0, 1.0, 1.0]  # nothing before `begin`
    assert all(a >= b for a, b in zip(goals, goals[1:], strict=False))  # only falls
    assert schedule(0.6, 0.4, 0.1, 0.6) == pytest.approx(0.4) and goals[-1] == pytest.approx(0.4)
    # cubic: half-way through the ramp, seven eighths of the way down
    assert schedule(0.35, 0.4, 0.1, 0.6) == pytest.approx(0.4 + 0.6 / 8)


def test_budget_cuts_down_to_the_schedule_at_each_check(rng):
    model = _model(strength=1e-2)
    model.fit(rng.random((4, 8, 8, 1)), np.arange(4) % 2, verbose=0)  # optimizer slots
    budget = FlopsBudget(target=0.5, end=0.5, verbose=0)
    budget.set_model(model)
    budget.set_params({"epochs": 4, "steps": 8})
    budget.on_train_begin()
    assert all(p.threshold == 0.0 for p in psp_layers(model))  # only its own cuts
    assert budget._check_at == [2, 4, 6]
    conv1 = model.get_layer("conv1")
    conv1.alpha.assign(np.linspace(0.1, 1.0, 8).astype("float32"))  # a clear ranking
    fractions = []
    for epoch in range(4):
        budget.on_epoch_begin(epoch)
        for step in budget._check_at:
            budget._on_step(step - 1)
        budget.on_epoch_end(epoch, {})
        fractions.append(budget.fraction)
        assert budget.fraction <= budget.goal(epoch + 1) + 1e-9
        assert budget.fraction == pytest.approx(count_flops(slim(model)) / count_flops(model))
    step = 8 * 8 * 9 * 16 / count_flops(model)  # one conv1 input channel: 0.117 of the FLOPs
    assert fractions[0] > fractions[1] > 0.5 - step - 0.01  # at the target, by one step at most
    assert fractions[1] <= 0.5 and fractions[2] == fractions[3] and len(budget.checks) == 16
    alpha = keras.ops.convert_to_numpy(conv1.alpha)
    cut = ~conv1.mask()
    assert cut.any() and np.all(alpha[cut] == 0)  # cut = exactly zero
    assert alpha[cut].size == 0 or np.all(np.flatnonzero(cut) < np.flatnonzero(~cut).min())
    momentum = [v for v in model.optimizer.variables if "conv1" in v.name and v.shape == (8,)]
    assert momentum and all(np.all(keras.ops.convert_to_numpy(v)[cut] == 0) for v in momentum)


def test_budget_refuses_an_unreachable_target_at_the_start():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="small")(inputs)
    x = keras.layers.Dense(2048, name="big")(keras.layers.GlobalAveragePooling2D()(x))
    model = wrap(keras.Model(inputs, x), layers=["small"])  # most FLOPs sit in "big"
    model.compile("sgd", "mse")
    budget = FlopsBudget(target=0.3, verbose=0)
    with pytest.raises(ValueError, match=r"target 0.300 cannot be reached.*leaves 0.69"):
        model.fit(np.zeros((4, 8, 8, 3)), np.zeros((4, 2048)), epochs=1, verbose=0,
                  callbacks=[budget])


def _digits_cnn(widths=(32, 64)):
    """small_cnn's shape (conv → BN → relu, twice; GAP; dense), wider: finer FLOPs steps."""
    inputs = x = keras.Input((8, 8, 1))
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"bn{i}")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_reaches_the_target_on_digits(seed, digits, capsys):
    """The cut follows the schedule, so the target is met whatever the training noise:
    two seeds, both within one structure of 0.5, and the model still classifies."""
    (x, y), (x_test, y_test) = digits
    keras.utils.set_random_seed(seed)
    model = wrap(_digits_cnn())
    epochs, batch = 6, 32
    steps = epochs * math.ceil(len(x) / batch)
    model.compile(keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, steps),
                                       momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    budget = FlopsBudget(target=0.5, recalibrate=x, verbose=1)
    history = model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0,
                        validation_data=(x_test, y_test),
                        callbacks=[SeparationMonitor(verbose=0), budget])
    fraction = count_flops(slim(model)) / count_flops(model)
    assert 0.48 <= fraction <= 0.5, budget.history
    assert fraction == pytest.approx(budget.fraction)
    assert history.history["psp_flops"][-1] == pytest.approx(fraction)
    cuts = [h["cut"] for h in budget.history]
    assert cuts == sorted(cuts) and cuts[0] > 0  # cuts only add up, from the first epoch
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert history.history["val_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)  # recalibrated
    assert accuracy > 0.9
    lines = [line for line in capsys.readouterr().out.splitlines() if "FlopsBudget" in line]
    assert len(lines) == epochs and lines[-1].startswith(f"FlopsBudget epoch {epochs}/{epochs}: ")
    assert "val_accuracy" in lines[-1]
