"""examples/fashion_mnist_vit.py in a quick configuration, on real Fashion-MNIST."""

import importlib.util
import json
import pathlib
import sys
import zipfile

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_example():
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("fashion_mnist_vit",
                                                  ROOT / "examples" / "fashion_mnist_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.tensorflow_only
def test_vit_example_prunes_heads_and_neurons_and_the_slim_vit_loads_without_keras_psp(
        tmp_path, capsys):
    job = _load_example()
    result = job.main(["--train-limit", "512", "--test-limit", "256", "--epochs", "1",
                       "--prune-epochs", "2", "--depth", "2", "--allocation", "uniform",
                       "--out", str(tmp_path), "--verbose", "0"])  # uniform: both kinds cut
    out = capsys.readouterr().out
    assert "key ratio:" in out.splitlines()[-1]
    before, after = result["flops"]
    assert 0.45 * before <= after <= 0.52 * before  # FlopsBudget(0.5)
    assert len(result["heads"]) == 2
    assert all(1 <= h <= 4 for h in result["heads"]) and sum(result["heads"]) < 8
    assert len(result["neurons"]) == 2 and all(n < 128 for n in result["neurons"])
    assert all(t > 0 for pair in result["latency_ms"].values() for t in pair)
    assert pathlib.Path(result["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = result["slim_path"]
    with zipfile.ZipFile(path) as archive:  # stock Keras objects only: loads without keras_psp
        config = json.loads(archive.read("config.json"))
    modules = set(_values_of(config, "module"))
    assert modules and all(m.split(".")[0] == "keras" for m in modules), modules
    small = keras.saving.load_model(path)
    heads = [layer.num_heads for layer in small.layers
             if isinstance(layer, keras.layers.MultiHeadAttention)]
    assert heads == result["heads"]
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               result["slim_model"].predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def _values_of(tree, key: str):
    """Every value of `key` in nested dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, str):
                yield v
            yield from _values_of(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _values_of(v, key)


def test_vit_example_flags():
    job = _load_example()
    default = job.parse_args([])
    assert (default.target, default.heads, default.width, default.mlp, default.allocation) == (
        0.5, 4, 64, 128, "global")
    for bad in (["--target", "0"], ["--width", "30"], ["--prune-epochs", "0"],
                ["--test-limit", "100"]):
        with pytest.raises(SystemExit):
            job.parse_args(bad)
