"""`keras_psp.latency`: measured lookup tables, latency targets for `prune_to`
and `LatencyBudget`.

Times are measured on this machine, so the tests assert what must hold
whatever the machine's speed: the order of layers whose costs differ about
5-fold, the cache, and that cuts land on the profile's own prediction. How
close a prediction comes to a measured slim model is a benchmark
(`benchmarks/latency_target.py`), not a test.
"""

import keras
import numpy as np
import pytest

import keras_psp
from keras_psp import latency
from keras_psp.cloning import psp_layers

pytestmark = pytest.mark.tensorflow_only  # LiteRT conversion and XLA timing need TensorFlow

#: Quick settings: the smallest grid, few rounds (the tables are small).
QUICK = {"levels": 2, "rounds": 5, "invokes": 20, "verbose": 0}


def _model() -> keras.Model:
    """Three convolutions whose MACs differ about 5-fold: c2 (2.4 M) > c3 (0.5 M) > c1 (0.1 M)."""
    x = keras.Input((16, 16, 3))
    y = x
    for name, filters, size in (("c1", 16, 3), ("c2", 64, 3), ("c3", 32, 1)):
        y = keras.layers.Conv2D(filters, size, padding="same", use_bias=False, name=name)(y)
        y = keras.layers.BatchNormalization(name=f"{name}_bn")(y)
        y = keras.layers.ReLU(name=f"{name}_relu")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(10, name="head")(y))


def _wrapped(seed: int = 0) -> keras.Model:
    model = keras_psp.wrap(_model(), structure="group")
    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        layer.alpha.assign(rng.random(tuple(layer.alpha.shape)).astype("float32"))
    return model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def table(cache_dir):
    return latency.profile(_wrapped(), cache_dir=cache_dir, **QUICK)


def _order(profile, model) -> list[str]:
    costs = profile.layer_ms(model)
    return sorted((name for name in costs if name != "head"), key=costs.get, reverse=True)


def test_profile_tables_and_a_stable_order_of_layers(table, tmp_path):
    model = _wrapped()
    # one table per distinct computing layer, widths on the aligned grid, times >= 0
    assert {t.name for t in table.tables.values()} == {"c1", "c2", "c3", "head"}
    c2 = next(t for t in table.tables.values() if t.name == "c2")
    assert c2.inputs == [8, 16] and c2.outputs == [8, 64]
    assert all(v >= 0 for t in table.tables.values() for row in t.ms for v in row)
    assert c2.at(16, 64) > c2.at(8, 8)  # a narrower layer costs less
    assert table.predict(model) == pytest.approx(table.dense_ms, rel=1e-9)
    assert table.dense_ms > 0 and table.scale > 0 and table.seconds > 0
    # a second build, measured afresh, orders the layers the same way
    again = latency.profile(model, cache=False, **QUICK)
    assert _order(table, model) == _order(again, model) == ["c2", "c3", "c1"]


def test_xla_profile_predicts_from_its_own_table():
    model = _wrapped()
    table = latency.profile(model, runtime="xla", batch_size=8, cache=False, **QUICK)
    assert table.runtime == "xla" and table.batch_size == 8
    assert _order(table, model)[0] == "c2"  # 20 times the MACs of c1
    keras_psp.prune_to(model, latency=0.7, profile=table)
    assert table.predict(model) / table.dense_ms <= 0.7


def test_profile_is_cached_by_model_signature(table, cache_dir, monkeypatch):
    first, tmp_path = table, cache_dir
    assert len(list(tmp_path.glob("*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("measured again although the profile is cached")

    monkeypatch.setattr(latency, "_litert_runs", fail)
    again = latency.profile(_wrapped(seed=1), cache_dir=tmp_path, **QUICK)  # same architecture
    assert again.tables == first.tables and again.signature == first.signature
    other = keras_psp.wrap(_model(), structure="group")  # other settings: another key
    with pytest.raises(AssertionError, match="measured again"):
        latency.profile(other, cache_dir=tmp_path, **{**QUICK, "levels": 3})
    loaded = latency.LatencyProfile.load(next(tmp_path.glob("*.json")))
    assert loaded.predict(_wrapped()) == pytest.approx(first.predict(_wrapped()), rel=1e-12)


def test_prune_to_latency_lands_on_the_prediction(table):
    model = _wrapped()
    flops_before = keras_psp.count_flops(model)
    step = latency_step(table, model)  # on the uncut model: the widest layers, the largest drop
    cut = keras_psp.prune_to(model, latency=0.6, profile=table)
    predicted = table.predict(model) / table.dense_ms
    assert cut.metric == "latency" and cut.latency == pytest.approx(predicted, rel=1e-9)
    assert 0.6 - step <= predicted <= 0.6
    assert cut.count > 0 and cut.flops < 1.0
    small = keras_psp.slim(model)
    assert keras_psp.count_flops(small) == pytest.approx(cut.flops * flops_before, rel=1e-6)
    assert all(layer.filters % 8 == 0 for layer in small.layers if hasattr(layer, "filters"))
    # cutting more never predicts more time
    keras_psp.prune_to(model, latency=0.4, profile=table)
    assert table.predict(model) / table.dense_ms <= predicted


def latency_step(table, model) -> float:
    """The largest drop of predicted latency (a fraction) one block of 8 can make from
    this model's widths (at least prune_to's landing tolerance, 0.02)."""
    drops = []
    for layer in psp_layers(model):
        alpha = np.ravel(keras.ops.convert_to_numpy(layer.alpha))
        kept = np.flatnonzero(alpha)
        if len(kept) <= 8:
            continue
        trial = alpha.copy()
        trial[kept[:8]] = 0
        values = {id(layer.alpha): trial.reshape(tuple(layer.alpha.shape))}
        drops.append(table.predict(model) - table.predict(model, values))
    return max(max(drops, default=0.0) / table.dense_ms, 0.02)


def test_latency_targets_refuse_bad_arguments(table):
    model = _wrapped()
    with pytest.raises(ValueError, match="exactly one target"):
        keras_psp.prune_to(model, flops=0.5, latency=0.5, profile=table)
    with pytest.raises(ValueError, match="exactly one target"):
        keras_psp.prune_to(model)
    with pytest.raises(ValueError, match="needs `profile=`"):
        keras_psp.prune_to(model, latency=0.5)
    with pytest.raises(ValueError, match="`latency` must be in"):
        keras_psp.prune_to(model, latency=1.5, profile=table)
    with pytest.raises(ValueError, match="cannot reach 0.010 of the predicted latency"):
        keras_psp.prune_to(model, latency=0.01, profile=table)
    with pytest.raises(ValueError, match="LatencyBudget: `profile` must be a LatencyProfile"):
        keras_psp.LatencyBudget(0.5)
    with pytest.raises(ValueError, match="`runtime` must be one of"):
        latency.profile(model, runtime="onnx")
    with pytest.raises(ValueError, match="has no PSP layers"):
        latency.profile(_model())
    with pytest.raises(ValueError, match="`levels` must be an integer >= 2"):
        latency.profile(model, levels=1)
    narrow = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3),
                               keras.layers.Flatten(), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="not in this profile"):
        table.predict(keras_psp.wrap(narrow, structure="group"))


def test_latency_budget_cuts_during_fit_to_the_target(table):
    model = _wrapped()
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 64)
    budget = keras_psp.LatencyBudget(0.6, table, end=0.5, verbose=0)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[budget])
    final = table.predict(model) / table.dense_ms
    assert final <= 0.6 and history.history["psp_latency"][-1] == pytest.approx(final)
    assert history.history["psp_goal"][-1] == pytest.approx(0.6)
    assert [r["psp_latency"] for r in budget.history] == history.history["psp_latency"]
