"""Group α (`wrap(structure="group")`): one α per coupled channel group."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from keras_psp import models
from keras_psp.graph import flatten
from keras_psp.groups import ChannelGroups, decode, encode, group_layers, group_views

#: slim must equal the pruned model: relative to the largest |output|.
RTOL = 1e-4


def _gathers(model) -> int:
    return sum(type(op.layer).__name__ == "Take" for op in flatten(model).ops)


def _se_net():
    """Residual stream, depthwise multiplier, concatenation, SE gate, Flatten → Dense."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="stem")(inputs)))
    for b in range(2):
        r = L.ReLU()(L.BatchNormalization()(L.Conv2D(12, 3, padding="same", name=f"b{b}a")(h)))
        r = L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name=f"b{b}b")(r))
        h = L.ReLU()(L.Add()([h, r]))
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(h)
    d = L.Conv2D(10, 1, name="pw")(d)
    c = L.Concatenate()([h, d])
    s = L.Dense(6, activation="relu", name="se1")(L.GlobalAveragePooling2D()(c))
    s = L.Reshape((1, 1, 26))(L.Dense(26, activation="sigmoid", name="se2")(s))
    c = L.Conv2D(8, 3, strides=2, name="down")(L.Multiply()([c, s]))
    outputs = L.Dense(5, name="head")(L.Flatten()(c))
    return keras.Model(inputs, outputs)


def _random_alphas(model, rng, cut=0.4):
    for group in group_views(model):
        alpha = rng.uniform(0.2, 2.0, group.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        alpha[rng.integers(alpha.size)] = 1.0
        group.alpha.assign(alpha)


def test_encode_decode_round_trip(rng):
    index = np.stack([np.repeat([0, -1, 2], 6), np.r_[np.arange(6), np.zeros(6), np.arange(6) * 2]],
                     axis=1).astype(int)
    index[-1, 1] = 40  # a run of its own
    np.testing.assert_array_equal(decode(encode(index)), np.where(index[:, :1] < 0, [[-1, 0]], index))
    assert len(encode(np.stack([np.zeros(64, int), np.arange(64)], axis=1)).split(",")) == 1


def test_wrap_starts_equal_and_leaves_the_model_alone(rng):
    model = _se_net()
    before = [w.copy() for w in model.get_weights()]
    x = rng.random((8, 8, 8, 3)).astype("float32")
    wrapped = keras_psp.wrap(model, structure="group")
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    (layer,) = group_layers(wrapped)
    groups = group_views(wrapped)
    assert [g.alpha.shape[0] for g in groups] == [16, 12, 12, 10, 6, 8]
    assert len(layer._inbound_nodes) == 9  # one call per reader
    # the stem's channels run through the stream, the depthwise, the concat and the gate
    assert groups[0].readers() == ["b0a", "b1a", "pw", "se1", "down"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not group_layers(model)


def test_a_cut_group_leaves_every_member_and_slim_needs_no_gather(rng):
    model = keras_psp.wrap(_se_net(), structure="group")
    x = rng.random((16, 8, 8, 3)).astype("float32")
    stem = group_views(model)[0]
    alpha = np.ones(16, "float32")
    alpha[[1, 5, 6]] = 0.0
    stem.alpha.assign(alpha)
    small = keras_psp.slim(model, check_inputs=x)
    assert _gathers(small) == 0
    assert small.get_layer("stem").filters == 13
    for name in ("b0b", "b1b"):  # every producer of the stream
        assert small.get_layer(name).filters == 13
    for name in ("b0a", "b1a", "down"):  # and every reader
        assert small.get_layer(name).kernel.shape[-2] == (13 if name != "down" else 13 + 10)
    assert small.get_layer("pw").kernel.shape[-2] == 26  # through the depthwise, ×2
    assert small.get_layer("se1").kernel.shape[0] == 23 and small.get_layer("se2").units == 23
    scale = max(float(np.abs(model.predict(x, verbose=0)).max()), 1e-12)
    assert keras_psp.verify(model, small, x) <= RTOL * scale


@pytest.mark.parametrize("build", [
    lambda: models.cifar_resnet(20, input_shape=(16, 16, 3)),
    lambda: models.densenet(22, growth_rate=16, input_shape=(16, 16, 3)),
    lambda: keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, alpha=0.35,
                                           classes=10),
], ids=["resnet20", "densenet22", "mobilenetv2"])
def test_prune_to_lands_on_target_aligned_and_without_gathers(build, rng):
    model = keras_psp.wrap(build(), structure="group")
    _random_alphas(model, rng, cut=0.0)
    cut = keras_psp.prune_to(model, 0.5, multiple_of=8)
    x = rng.random((4, *model.input_shape[1:])).astype("float32")
    small = keras_psp.slim(model, check_inputs=x)
    ratio = keras_psp.count_flops(small) / keras_psp.count_flops(model)
    assert 0.46 <= ratio <= 0.5 and abs(ratio - cut.flops) < 1e-9
    assert _gathers(small) == 0
    kept = {g.name: int(g.mask().sum()) for g in group_views(model)}
    sizes = {g.name: g.alpha.shape[0] for g in group_views(model)}
    # every group keeps a multiple of 8, or stays whole when it is narrower than a block
    assert all(k % 8 == 0 or k == sizes[n] for n, k in kept.items()), kept
    widths = [layer.filters for layer in small.layers if isinstance(layer, L.Conv2D)
              and not isinstance(layer, L.DepthwiseConv2D)]
    assert sum(w % 8 == 0 for w in widths) >= 0.9 * len(widths), widths


def test_prune_to_refuses_what_groups_cannot_reach():
    model = keras_psp.wrap(models.cifar_resnet(8, input_shape=(8, 8, 3)), structure="group")
    with pytest.raises(ValueError, match="cannot reach 0.010"):
        keras_psp.prune_to(model, 0.01, multiple_of=8)
    with pytest.raises(ValueError, match="multiple_of"):
        keras_psp.prune_to(model, 0.5, multiple_of=0)


def test_tying_survives_save_and_load(tmp_path, rng):
    model = keras_psp.wrap(_se_net(), structure="group")
    _random_alphas(model, rng)
    x = rng.random((8, 8, 8, 3)).astype("float32")
    path = tmp_path / "group.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (layer,) = group_layers(loaded)
    assert len(layer._inbound_nodes) == 9  # still one layer, called by every reader
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    masks = [g.mask() for g in group_views(loaded)]
    assert all(np.array_equal(a, g.mask()) for a, g in zip(masks, group_views(model), strict=True))
    # one variable for all readers: zeroing a stem channel cuts it from every one of them
    stem = group_views(loaded)[0]
    alpha = keras.ops.convert_to_numpy(stem.alpha).copy()
    keep = np.flatnonzero(alpha)
    alpha[keep[0]] = 0.0
    stem.alpha.assign(alpha)
    before = keras_psp.slim(model).get_layer("b0b").filters
    after = keras_psp.slim(loaded)
    assert after.get_layer("b0b").filters == before - 1 and _gathers(after) == 0
    assert after.get_layer("b1a").kernel.shape[-2] == before - 1


def test_training_moves_group_alpha_and_budget_cuts_groups(rng):
    model = keras_psp.wrap(_se_net(), structure="group", strength=1e-2)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = rng.random((32, 8, 8, 3)).astype("float32")
    y = rng.random((32, 5)).astype("float32")
    start = [keras.ops.convert_to_numpy(g.alpha).copy() for g in group_views(model)]
    monitor = keras_psp.SeparationMonitor(verbose=0)
    budget = keras_psp.FlopsBudget(target=0.5, end=0.7, checks_per_epoch=2, verbose=0,
                                   multiple_of=2)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[budget, monitor])
    moved = [np.abs(keras.ops.convert_to_numpy(g.alpha) - a).max()
             for g, a in zip(group_views(model), start, strict=True)]
    assert min(moved) > 0  # every group's α trained
    # at or below the target by at most one block: 2 stem channels are 7 % of this net's FLOPs
    assert 0.40 <= budget.fraction <= 0.5
    assert set(monitor.history[-1]["layers"]) == {g.name for g in group_views(model)}
    sizes = {g.name: (int(g.mask().sum()), g.alpha.shape[0]) for g in group_views(model)}
    assert all(k % 2 == 0 or k == n for k, n in sizes.values()), sizes
    small = keras_psp.slim(model, check_inputs=x[:8])
    assert _gathers(small) == 0
    assert keras_psp.count_flops(small) / keras_psp.count_flops(model) == pytest.approx(
        budget.fraction)


def test_strip_summary_and_the_penalty(rng):
    model = keras_psp.wrap(_se_net(), structure="group")
    _random_alphas(model, rng)
    x = rng.random((8, 8, 8, 3)).astype("float32")
    plain = keras_psp.strip(model)
    assert not any(isinstance(layer, ChannelGroups) for layer in plain.layers)
    assert len(plain.layers) == len(_se_net().layers)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    rows = keras_psp.summary(model, print_fn=lambda text: None)
    groups = [r for r in rows if r["structure"] == "group"]
    assert [r["name"] for r in groups] == [g.name for g in group_views(model)]
    assert rows[-1]["params_before"] == plain.count_params()  # α is not deployed
    # "relative_l1" is scale-invariant per group: a uniform scale of α changes nothing
    (layer,) = group_layers(model)
    loss = float(keras.ops.convert_to_numpy(keras.ops.sum(layer.losses)))
    for group in group_views(model):
        group.alpha.assign(3.0 * keras.ops.convert_to_numpy(group.alpha))
    assert float(keras.ops.convert_to_numpy(keras.ops.sum(layer.losses))) == pytest.approx(loss,
                                                                                          rel=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_groups_stop_at_layers_surgery_does_not_know():
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, name="a")(inputs)
    h = L.Lambda(lambda t: t * 2.0, name="opaque")(h)
    h = L.Conv2D(8, 3, name="b")(h)
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(h))
    with pytest.warns(UserWarning, match="'opaque'.*get no group α"):
        model = keras_psp.wrap(keras.Model(inputs, outputs), structure="group")
    assert [g.name for g in group_views(model)] == ["b_group"]  # a's channels are pinned
    with pytest.raises(ValueError, match="no `layers` selection"):
        keras_psp.wrap(model, structure="group", layers=["b"])
    with pytest.raises(ValueError, match="already has PSP layers or channel groups"):
        keras_psp.wrap(model, structure="group")


def test_keep_mask_rounds_up_to_multiples():
    alpha = np.array([1.0, 0.5, 0.001, 0.002, 0.0, 0.9, 0.003, 0.004, 0.0005, 0.8], "float32")

    def kept(multiple_of):
        mask = keras.ops.convert_to_numpy(keras_psp.keep_mask(alpha, 1e-2, "channel", multiple_of))
        return set(np.flatnonzero(mask))

    assert kept(None) == {0, 1, 5, 9}
    assert kept(3) == {0, 1, 5, 9, 6, 7}  # the largest |α| below the threshold join
    assert kept(8) == {0, 1, 5, 9, 6, 7, 3, 2}
    assert kept(20) == set(range(10)) - {4}  # all but the exact zero


def test_multiple_of_is_in_the_config_and_groups_default_to_8():
    layer = keras_psp.PSP(L.Dense(4), multiple_of=4)
    assert keras_psp.PSP.from_config(layer.get_config()).multiple_of == 4
    with pytest.raises(ValueError, match="multiple_of"):
        keras_psp.PSP(L.Dense(4), multiple_of=0)
    model = keras_psp.wrap(_se_net(), structure="group")
    (groups,) = group_layers(model)
    assert groups.multiple_of == 8 and ChannelGroups.from_config(groups.get_config()).multiple_of == 8
    unaligned = keras_psp.wrap(_se_net(), structure="group", multiple_of=None)
    assert group_layers(unaligned)[0].multiple_of is None


def test_bad_group_arguments_and_diverged_alpha_are_refused(tmp_path):
    with pytest.raises(ValueError, match="FlopsBudget: `multiple_of`"):
        keras_psp.FlopsBudget(multiple_of=0)
    with pytest.raises(ValueError, match="one positive entry per group"):
        ChannelGroups([4, 0], ["a", "b"])
    with pytest.raises(ValueError, match="`threshold` must be in"):
        ChannelGroups([4], ["a"], threshold=1.5)
    model = keras_psp.wrap(_se_net(), structure="group")
    (layer,) = group_layers(model)
    with pytest.raises(ValueError, match="needs the `index`"):
        layer(np.ones((1, 4), "float32"))
    stem = group_views(model)[0]
    alpha = keras.ops.convert_to_numpy(stem.alpha).copy()
    alpha[0] = np.nan
    stem.alpha.assign(alpha)
    with pytest.raises(ValueError, match="channel group 'stem_group'.*non-finite"):
        keras_psp.slim(model)
    with pytest.raises(ValueError, match="group 'stem_group'.*non-finite"):
        model.save(tmp_path / "diverged.keras")
