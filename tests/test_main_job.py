"""The README's main job, in a quick configuration, on real Fashion-MNIST."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest

from keras_psp.cloning import psp_layers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("fashion_mnist", ROOT / "examples" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.tensorflow_only
def test_main_job_trains_saves_and_reports(tmp_path, capsys):
    job = _load_example()
    result = job.main(["--epochs", "1", "--prune-epochs", "2", "--train-limit", "1024",
                       "--test-limit", "512", "--out", str(tmp_path), "--verbose", "0"])
    out = capsys.readouterr().out
    assert "unpruned reference: test accuracy" in out
    assert "epoch 1: accuracy" in out and "epoch 2: accuracy" in out
    assert "structures cut" in out and "key ratio:" in out.splitlines()[-1]
    assert "XLA latency, batch 128 ms" in out and "LiteRT latency, batch 1 ms" in out
    assert "parameters" in out and "FLOPs" in out and ".tflite size" in out
    before, after = result["flops"]
    assert 0.45 * before <= after <= 0.5 * before  # FlopsBudget's default target, 0.5
    assert 0.1 < result["reference_accuracy"] <= 1.0
    assert "separation" in out and len(result["separation"]) == 2
    assert all(0.0 <= s <= 1.0 for s in result["separation"])
    assert pathlib.Path(result["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Total" in pathlib.Path(result["summary_path"]).read_text()
    assert list((tmp_path / "tensorboard").rglob("*tfevents*"))
    assert result["difference"] < 1e-4
    assert len(result["history"]["accuracy"]) == 2
    assert 0.3 < result["test_accuracy"] <= 1.0  # well above chance (0.1)

    exported = result["exported"]
    for report in exported.values():  # each file was reloaded and compared
        assert report.checked == 256 and report.max_diff < 1e-4
    # float32 weights dominate the file
    slim_params = keras.saving.load_model(result["slim_path"]).count_params()
    assert 4 * slim_params < exported["slim_tflite"].size < 4 * slim_params + 100_000
    assert (tmp_path / "slim_saved_model" / "saved_model.pb").exists()
    assert all(t > 0 for pair in result["latency_ms"].values() for t in pair)
    from ai_edge_litert.interpreter import Interpreter

    lite = Interpreter(model_path=str(tmp_path / "slim_model.tflite"))
    lite.allocate_tensors()
    x1 = np.random.default_rng(1).random((1, 28, 28, 1)).astype("float32")
    lite.set_tensor(lite.get_input_details()[0]["index"], x1)
    lite.invoke()
    wrapped = keras.saving.load_model(result["wrapped_path"])
    np.testing.assert_allclose(lite.get_tensor(lite.get_output_details()[0]["index"]),
                               wrapped.predict(x1, verbose=0), rtol=1e-4, atol=1e-5)
    plain = keras.saving.load_model(result["slim_path"])
    # the default: group α, one per channel group (stem stream, 2 stage streams, 3 inner widths)
    assert len(psp_layers(wrapped)) == 6 and not psp_layers(plain)
    assert all(g.structure == "group" for g in psp_layers(wrapped))
    assert not any(type(layer).__name__ == "Take" for layer in plain.layers)  # no gathers
    assert all(layer.filters % 8 == 0 for layer in plain.layers if hasattr(layer, "filters"))
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), wrapped.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_main_job_flags():
    job = _load_example()
    args = job.parse_args(["--epochs", "30", "--structure", "filter", "--strength", "0.01"])
    assert (args.epochs, args.structure, args.strength) == (30, "filter", 0.01)
    default = job.parse_args([])
    assert (default.workflow, default.target, default.regularizer, default.structure) == (
        "trained", 0.5, "relative_l1", "group")
    for bad in (["--target", "0"], ["--target", "1.5"], ["--prune-epochs", "0"],
                ["--test-limit", "100"]):
        with pytest.raises(SystemExit):
            job.parse_args(bad)
