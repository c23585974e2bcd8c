"""summary (per-layer table) and plot_alphas (α histograms as PNG)."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from helpers import small_cnn
from keras_psp import count_flops, plot_alphas, slim, summary, wrap
from keras_psp.cloning import psp_layers
from keras_psp.flops import layer_flops
from keras_psp.stats import model_stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny():
    """conv0 (2 → 4, 3x3 same) → relu → conv1 (4 → 3, 1x1) → GAP → head (3 → 2)."""
    inputs = keras.Input((6, 6, 2))
    x = L.ReLU()(L.Conv2D(4, 3, padding="same", name="conv0")(inputs))
    x = L.GlobalAveragePooling2D()(L.Conv2D(3, 1, name="conv1")(x))
    return keras.Model(inputs, L.Dense(2, name="head")(x), name="tiny")


def _cut(model, pattern):
    for name, alpha in pattern.items():
        model.get_layer(name).alpha.assign(np.asarray(alpha, "float32"))


@pytest.fixture
def tiny_cut():
    model = wrap(_tiny(), structure="channel")  # α: conv0 (2,), conv1 (4,), head (3,)
    _cut(model, {"conv1": [1, 0, 1, 0], "head": [1, 1, 0]})
    return model


def test_tiny_model_by_hand(tiny_cut):
    lines = []
    rows = summary(tiny_cut, print_fn=lines.append)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["conv0", "conv1", "head", "Total"]
    # conv1 reads 2 of conv0's 4 filters; head reads 2 of conv1's 3 filters.
    expected = {  # name: (kept, total, MACs before, after, params before, after)
        "conv0": (2, 2, 36 * 9 * 2 * 4, 36 * 9 * 2 * 2, 9 * 2 * 4 + 4, 9 * 2 * 2 + 2),
        "conv1": (2, 4, 36 * 4 * 3, 36 * 2 * 2, 4 * 3 + 3, 2 * 2 + 2),
        "head": (2, 3, 3 * 2, 2 * 2, 3 * 2 + 2, 2 * 2 + 2),
    }
    keys = ("kept", "total", "flops_before", "flops_after", "params_before", "params_after")
    for name, values in expected.items():
        row = by_name[name]
        assert row["type"] in ("Conv2D", "Dense") and row["structure"] == "channel"
        assert tuple(row[k] for k in keys) == values, name
    total = rows[-1]
    assert total["type"] is None
    assert (total["kept"], total["total"]) == (6, 9)
    small = slim(tiny_cut)
    assert total["flops_before"] == count_flops(tiny_cut) == 2592 + 432 + 6
    assert total["flops_after"] == count_flops(small) == 1296 + 144 + 4
    n_alpha = sum(int(np.prod(layer.alpha.shape)) for layer in psp_layers(tiny_cut))
    assert n_alpha == 9
    n_strength = len(psp_layers(tiny_cut))  # one α strength variable per PSP layer
    assert total["params_before"] == tiny_cut.count_params() - n_alpha - n_strength == 76 + 15 + 8
    assert total["params_after"] == small.count_params() == 38 + 6 + 6

    assert len(lines) == 1
    text = lines[0]
    for name in ("conv0", "conv1", "head", "Conv2D", "Dense", "2/4", "tiny"):
        assert name in text
    assert "2,592 → 1,296" in text
    total_line = next(line for line in text.splitlines() if line.startswith("Total"))
    assert "3,030 → 1,444" in total_line and "99 → 50" in total_line


def test_wrapped_cnn_with_batchnorm_matches_the_slim_model():
    model = wrap(small_cnn(), structure="channel")
    rng = np.random.default_rng(0)
    for layer in psp_layers(model)[1:]:
        alpha = rng.uniform(0.5, 1.5, layer.alpha.shape).astype("float32")
        alpha[::3] = 0.0
        layer.alpha.assign(alpha)
    small = slim(model)
    rows = summary(model, print_fn=lambda text: None, slim_model=small)
    names = [r["name"] for r in rows]
    assert names == ["conv0", "bn0", "conv1", "bn1", "head", "Total"]  # no ReLU, no pooling
    for row in rows[:-1]:
        layer, twin = model.get_layer(row["name"]), small.get_layer(row["name"])
        inner = layer.layer if isinstance(layer, keras_psp.PSP) else layer
        assert row["params_before"] == inner.count_params()
        assert row["params_after"] == twin.count_params()
        if isinstance(layer, keras_psp.PSP):
            mask = layer.mask()
            assert (row["kept"], row["total"]) == (int(mask.sum()), mask.size)
            assert row["flops_after"] < row["flops_before"] or row["name"] == "conv0"
        else:
            assert row["type"] == "BatchNormalization" and row["structure"] == "—"
            assert row["kept"] is None and row["flops_before"] == 0
            assert row["params_after"] == 4 * twin.gamma.shape[0]
    for name, positions in (("conv0", 64), ("conv1", 64), ("head", 1)):  # 8x8, same padding
        row = rows[names.index(name)]
        kernel = small.get_layer(name).kernel.shape
        assert row["flops_after"] == positions * int(np.prod(kernel))
    total = rows[-1]
    assert total["flops_before"] == count_flops(model)
    assert total["flops_after"] == count_flops(small)
    assert total["params_before"] == model.count_params() - sum(
        int(np.prod(layer.alpha.shape)) + 1 for layer in psp_layers(model)  # α and its strength
    )
    assert total["params_after"] == small.count_params()


def test_plain_and_nested_model():
    block = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Conv2D(4, 3, padding="same", name="inner_conv"), L.ReLU()],
        name="block",
    )
    inputs = keras.Input((6, 6, 2))
    x = L.GlobalAveragePooling2D()(block(inputs))
    model = keras.Model(inputs, L.Dense(3, name="out")(x), name="plain")
    lines = []
    rows = summary(model, print_fn=lines.append)
    assert [r["name"] for r in rows] == ["inner_conv", "out", "Total"]
    for row in rows[:-1]:
        assert row["structure"] == "—" and row["kept"] is None and row["total"] is None
        assert row["flops_before"] == row["flops_after"] > 0
        assert row["params_before"] == row["params_after"] > 0
    assert rows[0]["flops_before"] == 36 * 9 * 2 * 4
    total = rows[-1]
    assert total["kept"] is None
    assert total["flops_before"] == total["flops_after"] == count_flops(model)
    assert total["params_before"] == total["params_after"] == model.count_params()
    assert "inner_conv" in lines[0] and "100.0% of the FLOPs" in lines[0]


def test_layer_flops_sums_calls_and_matches_count_flops():
    shared = L.Dense(4, name="shared")
    a, b = keras.Input((3,)), keras.Input((5,))
    out = L.Add()([shared(a), shared(L.Dense(3, name="proj")(b))])
    model = keras.Model([a, b], out)
    assert layer_flops(model) == {"shared": 2 * 3 * 4, "proj": 5 * 3}
    assert sum(layer_flops(model).values()) == count_flops(model)


def _png_ok(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def _record_figure(monkeypatch):
    """Captures the texts of the figure plot_alphas saves."""
    from matplotlib.figure import Figure

    seen, save = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        for ax in self.axes:
            seen.append((ax.get_title(), [t.get_text() for t in ax.texts]))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def test_plot_alphas_writes_a_png(tiny_cut, tmp_path, monkeypatch):
    import matplotlib

    backend = matplotlib.rcParams["backend"]
    seen = _record_figure(monkeypatch)
    path = tmp_path / "alphas.png"
    assert plot_alphas(tiny_cut, path, bins=10) == str(path)
    assert path.stat().st_size > 0
    _png_ok(path)
    titles = [title for title, _ in seen if title]
    stats, overall = model_stats(psp_layers(tiny_cut))
    assert 0 < overall <= 1 and stats[1].separation > 0
    assert titles == [
        f"all layers (3/9 cut, separation {overall:.2f})",
        "conv0 (0/2 cut)",
        f"conv1 (2/4 cut, sep. {stats[1].separation:.2f})",
        f"head (1/3 cut, sep. {stats[2].separation:.2f})",
    ]
    assert matplotlib.rcParams["backend"] == backend


def test_plot_alphas_non_finite_panel(tiny_cut, tmp_path, monkeypatch):
    seen = _record_figure(monkeypatch)
    tiny_cut.get_layer("conv1").alpha.assign(np.array([1, np.nan, 1, 0], "float32"))
    path = plot_alphas(tiny_cut, str(tmp_path / "nan.png"))
    _png_ok(path)
    texts = {title: texts for title, texts in seen if title}
    assert texts["conv1 (0/4 cut)"] == ["non-finite α"]
    _, overall = model_stats(psp_layers(tiny_cut))
    assert texts["conv0 (0/2 cut)"] == []
    assert texts[f"all layers (1/5 cut, separation {overall:.2f})"] == []


def test_plot_alphas_with_a_zero_threshold(tiny_cut, tmp_path, monkeypatch):
    """FlopsBudget's threshold 0 (only exact zeros cut): drawn at the floor, not log10(0)."""
    seen = _record_figure(monkeypatch)
    for layer in psp_layers(tiny_cut):
        layer.threshold = 0.0
    tiny_cut.get_layer("conv1").alpha.assign(np.array([1, 0.5, 0, 0], "float32"))
    _png_ok(plot_alphas(tiny_cut, str(tmp_path / "zero.png")))
    assert "conv1 (2/4 cut, sep. 1.00)" in [title for title, _ in seen]


def test_plot_alphas_errors(tmp_path):
    with pytest.raises(ValueError, match="no PSP layers"):
        plot_alphas(_tiny(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="bins"):
        plot_alphas(wrap(_tiny()), tmp_path / "x.png", bins=0)
    with pytest.raises(TypeError, match="keras.Model"):
        plot_alphas(L.Dense(2), tmp_path / "x.png")


def test_plot_alphas_without_matplotlib(tiny_cut, tmp_path, monkeypatch):
    import sys

    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_alphas(tiny_cut, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
