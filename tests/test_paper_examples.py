"""The paper examples end to end, a couple of steps each, on tfds mock data.

`tfds.testing.mock_data` fakes CIFAR-10/100 and ILSVRC2012 (random images
and labels, no files, no download). Models are tiny: ResNet-8 4-8-16,
DenseNet-BC-10 with k = 4, ResNet-18 4-8-16-32 on 32×32 images.
"""

import importlib
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_psp
from keras_psp.cloning import psp_layers

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
QUICK = ["--steps-per-epoch", "2", "--batch-size", "4", "--train-limit", "12",
         "--eval-limit", "8", "--verbose", "0"]

pytestmark = pytest.mark.tensorflow_only


@pytest.fixture
def load(monkeypatch):
    """Imports an example by name (they import their shared `_data`, `_paper`)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


class Preempted(Exception):
    pass


class PreemptAt(keras.callbacks.Callback):
    """Raises at the start of epoch `epoch`: a job killed mid-training."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Preempted(f"preempted before epoch {epoch}")


def _run(module, argv, tmp_path, examples=8, **kwargs):
    with tfds.testing.mock_data(num_examples=examples):
        return module.main([*QUICK, *argv, "--data-dir", str(tmp_path / "tfds")], **kwargs)


def _check_outputs(out: pathlib.Path, results: dict, epochs: int, reload_wrapped=False):
    """What every run must leave in its output folder; the reloaded wrapped model."""
    assert json.loads((out / "results.json").read_text())["flops"] == results["flops"]
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["epochs"]["total"] == epochs
    for key in ("flops", "params"):
        before, after = results[key]["before"], results[key]["after"]
        assert 0 < after <= before and results[key]["ratio"] == pytest.approx(after / before)
    cut = results["structures"]
    assert cut["total"] > 0 and 0 <= cut["cut"] <= cut["total"]
    assert sum(v["total"] for v in cut["by_layer"].values()) == cut["total"]
    assert 0.0 <= results["separation"] <= 1.0
    assert len(results["separation_by_epoch"]) == epochs  # the CSV log, across resumed runs
    assert results["slim_max_difference"] < 1e-4
    assert all(t >= 0 for t in results["timings_s"].values())
    assert (out / "backup" / "latest.weights.h5").exists()
    backup = json.loads((out / "backup" / "training_metadata.json").read_text())
    assert backup["epoch"] == epochs
    for folder in ("train", "psp"):  # keras.callbacks.TensorBoard and SeparationMonitor
        assert list((out / "tensorboard" / folder).glob("*tfevents*")), folder
    assert "Total" in (out / "summary.txt").read_text()

    assert (out / "psp_model.keras").stat().st_size > 0
    small = keras.saving.load_model(out / "slim_model.keras")
    assert not psp_layers(small)
    saved = results["exports"]["saved_model"]
    assert saved["size_bytes"] > 0 and saved["max_difference"] < 1e-4
    served = tf.saved_model.load(saved["path"])
    x = np.random.default_rng(0).normal(size=(3, *small.input_shape[1:])).astype("float32")
    expected = keras.ops.convert_to_numpy(small(x, training=False))
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    if not reload_wrapped:  # slow (optimizer and all); the CIFAR-10 test does it
        return None
    wrapped = keras.saving.load_model(out / "psp_model.keras")
    assert psp_layers(wrapped)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapped(x, training=False)), expected,
                               rtol=1e-4, atol=1e-5)
    return wrapped


def test_cifar10_resnet_resumes_after_preemption_and_after_completion(load, tmp_path):
    example = load("cifar10_resnet")
    out = tmp_path / "run"
    argv = ["--depth", "8", "--widths", "4,8,16", "--epochs", "2", "--run-eagerly", "--out", str(out)]
    with pytest.raises(Preempted):
        _run(example, argv, tmp_path, callbacks=[PreemptAt(1)])
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    assert not (out / "results.json").exists()

    results = _run(example, argv, tmp_path)  # the same command again
    assert results["epochs"] == {"total": 2, "resumed_from": 1, "trained_now": 1}
    wrapped = _check_outputs(out, results, epochs=2, reload_wrapped=True)
    assert int(wrapped.optimizer.iterations) == 4  # optimizer state came back with the backup
    assert results["model"] == "resnet8" and len(results["structures"]["by_layer"]) == 10
    assert len(results["val_accuracy_by_epoch"]) == 2

    again = _run(example, argv, tmp_path)  # finished: nothing to train, slim and export again
    assert again["epochs"] == {"total": 2, "resumed_from": 2, "trained_now": 0}
    assert again["flops"] == results["flops"] and again["accuracy"] == results["accuracy"]
    rerun = keras.saving.load_model(out / "psp_model.keras")  # the trained weights, restored
    for a, b in zip(wrapped.weights, rerun.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_cifar10_layer_structure_wraps_branch_ends_and_cut_branches_leave(load):
    example = load("cifar10_resnet")
    args = example.parse_args(["--structure", "layer", "--depth", "8", "--widths", "4,8,16"])
    assert args.block == "preact"
    model, layers = example.build_model(args)
    assert layers == ["s1b1b_conv", "s2b1b_conv", "s3b1b_conv"]
    assert all(isinstance(model.get_layer(n).kernel.regularizer, keras.regularizers.L2)
               for n in layers)
    wrapped = keras_psp.wrap(model, structure="layer", layers=layers)
    assert [layer.name for layer in psp_layers(wrapped)] == layers
    wrapped.get_layer("s2b1b_conv").alpha.assign([0.0])  # cut one residual branch
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    small = keras_psp.slim(wrapped, check_inputs=x)
    names = {layer.name for layer in small.layers}
    assert "s2b1b_conv" not in names and "s2b1a_conv" not in names and "s2b1p_conv" in names
    assert keras_psp.count_flops(small) < keras_psp.count_flops(model)
    with pytest.raises(SystemExit):
        example.parse_args(["--structure", "layer", "--block", "basic"])


def test_cifar100_densenet_bc_with_quantized_tflite(load, tmp_path):
    example = load("cifar100_densenet")
    out = tmp_path / "run"
    results = _run(example, ["--bc", "--depth", "10", "--growth-rate", "4", "--epochs", "1",
                             "--tflite", "dynamic", "--out", str(out)], tmp_path)  # tf.function
    assert not results["args"]["run_eagerly"]
    assert results["model"] == "densenet_bc10" and results["dataset"] == "cifar100"
    assert results["args"]["nesterov"] and results["args"]["compression"] == 0.5
    _check_outputs(out, results, epochs=1)
    tflite = results["exports"]["tflite"]
    assert tflite["quantize"] == "dynamic" and (out / "model.tflite").stat().st_size == tflite["size_bytes"]


def test_imagenet_resnet18_tiny_images_mirrored(load, tmp_path):
    """Column α with a FlopsBudget under --distribution mirrored: wrapped and
    compiled under MirroredStrategy (one CPU replica here), trained with
    keras_psp.distributed.fit, slimmed from a process-local copy."""
    example = load("imagenet_resnet")
    out = tmp_path / "run"
    argv = ["--arch", "resnet18", "--width", "4", "--image-size", "32", "--epochs", "1",
            "--structure", "column", "--run-eagerly", "--flops-target", "0.9",
            "--distribution", "mirrored", "--out", str(out)]
    results = _run(example, argv, tmp_path)
    (fraction,) = results["flops_by_epoch"]  # FlopsBudget's, logged per epoch
    assert fraction <= 0.9 and results["flops"]["ratio"] == pytest.approx(fraction)
    assert results["model"] == "resnet18" and results["dataset"] == "imagenet2012"
    assert results["args"]["distribution"] == "mirrored"
    assert 0.0 <= results["accuracy"] <= results["metrics"]["top5"] <= 1.0
    assert results["preprocessing"]["input"] == "RGB 32x32"
    _check_outputs(out, results, epochs=1)
    with pytest.raises(SystemExit, match="KERAS_BACKEND=jax"):
        example.main(["--distribution", "jax"])


def test_imagenet_resnet50_is_keras_applications_with_kernel_decay(load):
    example = load("imagenet_resnet")
    args = example.parse_args(["--image-size", "32", "--weight-decay", "2e-4"])
    model = example.build_model(args, num_classes=10)
    assert model.name == "resnet50" and model.output.shape == (None, 10)
    convs = [la for la in model.layers if isinstance(la, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(convs) == 54
    assert all(la.kernel.regularizer.l2 == pytest.approx(1e-4) for la in convs)
    with pytest.raises(SystemExit):
        example.parse_args(["--image-size", "16"])


def test_pipelines_shapes_and_normalization(load):
    data = load("_data")
    with tfds.testing.mock_data(num_examples=6):
        cifar = data.cifar("cifar10", 4, steps_per_epoch=3)
        imagenet = data.imagenet(4, image_size=40, train_limit=5)
    assert (cifar.steps_per_epoch, cifar.train_examples, cifar.num_classes) == (3, 6, 10)
    assert imagenet.steps_per_epoch == 1 and imagenet.train_examples == 5
    for ds, size in ((cifar.train, 32), (imagenet.train, 40)):
        images, labels = next(iter(ds.take(3)))  # repeated: more batches than examples
        assert images.shape == (4, size, size, 3) and images.dtype == tf.float32
        assert labels.shape == (4,)
        assert -3.0 < float(tf.reduce_mean(images)) < 3.0  # normalized, not 0-255
    batches = list(imagenet.eval)  # one pass, the last batch partial
    assert [int(b[0].shape[0]) for b in batches] == [4, 2]
    again = list(imagenet.eval)
    np.testing.assert_array_equal(batches[0][0].numpy(), again[0][0].numpy())  # no augmentation


def test_learning_rate_schedules(load):
    paper = load("_paper")
    example = load("cifar10_resnet")
    args = example.parse_args(["--epochs", "8", "--milestones", "0.5,0.75"])
    step = paper.learning_rate(args, steps_per_epoch=10)
    lrs = [float(step(i)) for i in (0, 39, 41, 61, 79)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)
    args = example.parse_args(["--epochs", "8", "--schedule", "cosine", "--warmup-epochs", "1"])
    cosine = paper.learning_rate(args, steps_per_epoch=10)
    np.testing.assert_allclose([float(cosine(i)) for i in (0, 10, 80)], [0.01, 0.1, 0.0],
                               atol=1e-6)
    args = example.parse_args(["--warmup-epochs", "1"])
    with pytest.raises(ValueError, match="cosine"):
        paper.learning_rate(args, 10)


@pytest.mark.parametrize("name", ["cifar10_resnet", "cifar100_densenet", "imagenet_resnet"])
def test_help_lists_the_common_flags(load, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--structure", "--strength", "--threshold",
                 "--out", "--data-dir", "--steps-per-epoch", "--train-limit", "--tflite"):
        assert flag in text, flag
    if name == "imagenet_resnet":
        assert "--manual-dir" in text and "--image-size" in text and "manual download" in text
