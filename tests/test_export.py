"""export: real SavedModel and LiteRT round trips, verification, refusals."""

import os

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from helpers import load_digits, small_cnn, to_numpy
from keras_psp.export import ExportReport, VerificationError
from keras_psp.formats import FORMATS, Format
from keras_psp.samples import collect

pytestmark = pytest.mark.tensorflow_only

export = keras_psp.export


def _randomize_batchnorm(model, rng):
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.2, beta.shape).astype("float32"),
                rng.normal(0, 0.2, mean.shape).astype("float32"),
                rng.uniform(0.5, 1.5, var.shape).astype("float32"),
            ])


@pytest.fixture(scope="module")
def slim_model():
    """A PSP-wrapped small CNN with 3 of conv1's 8 input channels cut, slimmed."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    base = small_cnn()
    _randomize_batchnorm(base, rng)
    wrapped = keras_psp.wrap(base)
    wrapped.get_layer("conv1").alpha.assign(np.array([1, 0, 1, 0, 1, 1, 0, 1], "float32"))
    small = keras_psp.slim(wrapped)
    assert small.get_layer("conv1").kernel.shape[2] == 5
    return small


@pytest.fixture(scope="module")
def digits_classifier():
    """A small CNN trained 5 epochs on scikit-learn digits, and its data."""
    (x, y), (x_test, _) = load_digits()
    keras.utils.set_random_seed(0)
    model = small_cnn(batchnorm=False)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=5, verbose=0)
    return model, x, x_test


@pytest.fixture
def x(rng):
    return rng.random((6, 8, 8, 1)).astype("float32")


def _litert(path, x):
    """Runs a .tflite file with ai_edge_litert directly, one example at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    rows = []
    for example in x:
        interpreter.set_tensor(inp["index"], example[None].astype(inp["dtype"]))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(rows), inp["dtype"]


def _no_staging_left(folder):
    return not [n for n in os.listdir(folder) if n.startswith(".keras_psp_export_")]


def test_saved_model_round_trip(slim_model, x, tmp_path):
    import tensorflow as tf

    path = tmp_path / "serving"
    report = export(slim_model, path)
    assert isinstance(report, ExportReport) and report.format == "saved_model"
    assert report.checked == 16 and report.checked_on == "random inputs"
    assert report.max_diff <= 1e-4 * 1.0 and not report.jit_compile
    assert report.size == sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
    )
    assert report.ops["Conv2D"] == 2 and report.ops["MatMul"] == 1
    loaded = tf.saved_model.load(str(path))
    serving = loaded.signatures["serving_default"]
    assert list(serving.structured_input_signature[1]) == [slim_model.inputs[0].name]
    expected = to_numpy(slim_model(x, training=False))
    for batch in (1, 6):  # dynamic batch size
        outputs = serving(**{slim_model.inputs[0].name: tf.constant(x[:batch])})
        np.testing.assert_allclose(outputs["output_0"].numpy(), expected[:batch], atol=1e-6)
    np.testing.assert_allclose(np.asarray(loaded.serve(x)), expected, atol=1e-6)
    assert "SavedModel, " in str(report) and "verified on 16 examples" in str(report)
    assert _no_staging_left(tmp_path)


def test_saved_model_jit_compile_is_xla_in_the_file(slim_model, x, tmp_path):
    import tensorflow as tf

    report = export(slim_model, tmp_path / "xla", jit_compile=True, check_inputs=x)
    assert report.jit_compile and report.checked == 6 and report.checked_on == "check_inputs"
    assert "SavedModel + XLA" in str(report)
    assert b"_XlaMustCompile" in (tmp_path / "xla" / "saved_model.pb").read_bytes()
    loaded = tf.saved_model.load(str(tmp_path / "xla"))
    np.testing.assert_allclose(
        np.asarray(loaded.serve(x)), to_numpy(slim_model(x, training=False)), atol=1e-5
    )


def test_tflite_float_matches_keras(slim_model, x, tmp_path):
    path = tmp_path / "model.tflite"
    report = export(slim_model, path, format="tflite", check_inputs=x)
    assert report.size == os.path.getsize(path) and report.quantize is None
    assert report.max_diff < 1e-5
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(report.ops)
    assert not [op for op in report.ops if "FLEX" in op.upper() or op == "DELEGATE"]
    y, dtype = _litert(path, x)
    assert dtype == np.float32
    np.testing.assert_allclose(y, to_numpy(slim_model(x, training=False)), atol=1e-5)
    assert "LiteRT float32" in str(report)


@pytest.mark.parametrize("quantize", ["dynamic", "float16"])
def test_tflite_weight_quantization_is_smaller_and_close(digits_classifier, tmp_path, quantize):
    model = digits_classifier[0]  # conv1 has 1152 weights (LiteRT skips kernels < 1024)
    base = export(model, tmp_path / "f32.tflite", format="tflite", verify=False)
    assert base.checked == 0 and base.max_diff is None and "not verified" in str(base)
    report = export(model, tmp_path / "q.tflite", format="tflite", quantize=quantize)
    assert report.size < base.size
    assert report.relative_error < 0.05 and report.max_diff < 0.05
    if quantize == "float16":
        assert "DEQUANTIZE" in report.ops and "max |difference| ≤" in report.criterion
    else:
        assert report.criterion == "relative RMS error ≤ 0.1"


def test_int8_reports_agreement_on_the_representative_data(digits_classifier, tmp_path):
    model, x_train, _ = digits_classifier
    path = tmp_path / "int8.tflite"
    report = export(model, path, format="tflite", quantize="int8", representative_data=x_train)
    assert report.checked == 256 and report.checked_on == "representative_data"
    assert report.agreement >= 0.9 and report.relative_error < 0.1
    assert 0 < report.max_diff < 0.5
    assert "QUANTIZE" in report.ops and "DEQUANTIZE" in report.ops  # float32 I/O
    text = str(report)
    assert "int8 (float32 inputs/outputs)" in text and "top-1 agreement" in text
    y, dtype = _litert(path, x_train[:32])
    assert dtype == np.float32
    keras_top1 = model.predict(x_train[:32], verbose=0).argmax(-1)
    assert np.mean(y.argmax(-1) == keras_top1) >= 0.85


def test_int8_io_quantizes_inputs_and_outputs(digits_classifier, tmp_path):
    model, x_train, x_test = digits_classifier
    report = export(
        model, tmp_path / "io.tflite", format="tflite", quantize="int8",
        representative_data=x_train[:128], check_inputs=x_test, int8_io=True,
    )
    assert report.int8_io and report.checked == len(x_test) and report.agreement >= 0.9
    assert "int8 inputs/outputs" in str(report)
    _, dtype = _litert(tmp_path / "io.tflite", x_test[:1])
    assert dtype == np.int8


def test_int8_with_wrong_calibration_is_refused(digits_classifier, tmp_path):
    model, x_train, x_test = digits_classifier
    with pytest.raises(VerificationError, match=r"relative RMS error 0\.[2-9].*Nothing was written"):
        export(model, tmp_path / "bad.tflite", format="tflite", quantize="int8",
               representative_data=x_train[:128] * 0.05, check_inputs=x_test)
    assert not (tmp_path / "bad.tflite").exists() and _no_staging_left(tmp_path)


def test_a_file_that_differs_is_never_written(slim_model, x, tmp_path, monkeypatch):
    target = tmp_path / "model.tflite"
    good = export(slim_model, target, format="tflite")
    content = target.read_bytes()
    wrong = keras.models.clone_model(slim_model)
    wrong.set_weights([w * 1.5 for w in slim_model.get_weights()])  # a faulty writer
    real = FORMATS["tflite"]
    monkeypatch.setitem(FORMATS, "tflite", Format(
        lambda model, path, options, workdir: real.write(wrong, path, options, workdir),
        real.runner, real.quantize, real.options,
    ))
    with pytest.raises(VerificationError) as info:
        export(slim_model, target, format="tflite", overwrite=True)
    message = str(info.value)
    assert "max |difference|" in message and "required max |difference| ≤" in message
    assert "existing one is unchanged" in message
    assert target.read_bytes() == content and good.size == len(content)
    with pytest.raises(VerificationError, match="Nothing was written"):
        export(slim_model, tmp_path / "new.tflite", format="tflite")
    assert not (tmp_path / "new.tflite").exists() and _no_staging_left(tmp_path)


def test_overwrite_replaces_a_directory_and_a_file(slim_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    export(slim_model, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    (tmp_path / "m.tflite").write_bytes(b"old")
    report = export(slim_model, tmp_path / "m.tflite", format="tflite", overwrite=True)
    assert os.path.getsize(tmp_path / "m.tflite") == report.size > 3


def test_multi_input_model_round_trips_by_name(tmp_path, rng):
    image = keras.Input((4, 4, 2), name="image")
    extra = keras.Input((3,), name="extra")
    h = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, padding="same")(image))
    model = keras.Model({"image": image, "extra": extra}, L.Dense(5)(L.Concatenate()([h, extra])))
    data = {"image": rng.random((10, 4, 4, 2)).astype("float32"),
            "extra": rng.random((10, 3)).astype("float32")}
    for fmt, name in (("saved_model", "sm"), ("tflite", "m.tflite")):
        report = export(model, tmp_path / name, format=fmt, check_inputs=data)
        assert report.checked == 10 and report.max_diff < 1e-5, fmt
    report = export(model, tmp_path / "q.tflite", format="tflite", quantize="int8",
                    representative_data=data)
    assert report.relative_error < 0.1 and report.checked == 10


def test_representative_data_in_every_form(rng):
    import tensorflow as tf

    specs = [("x", (None, 8, 8, 1), np.dtype("float32"))]
    x = rng.random((20, 8, 8, 1)).astype("float32")
    y = np.arange(20)
    forms = {
        "array": x,
        "batched (x, y) dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(6),
        "unbatched dataset": tf.data.Dataset.from_tensor_slices(x),
        "TFLite-style generator function": lambda: ([x[i : i + 1]] for i in range(20)),
        "generator of single examples": (example for example in x),
        "list of batches": [x[:10], x[10:]],
    }
    for name, data in forms.items():
        [got] = collect(data, specs)
        np.testing.assert_array_equal(got, x, err_msg=name)
    [first] = collect(tf.data.Dataset.from_tensor_slices(x).batch(6), specs, limit=8)
    np.testing.assert_array_equal(first, x[:8])
    with pytest.raises(ValueError, match=r"expects examples of shape \(8, 8, 1\).*\(20, 8, 8\)"):
        collect(x[..., 0], specs, what="representative_data")
    with pytest.raises(ValueError, match="holds no example"):
        collect(lambda: iter(()), specs, what="representative_data")


def test_refusals_name_the_problem(slim_model, x, tmp_path):
    wrapped = keras_psp.wrap(small_cnn())
    cases = [
        (dict(model=wrapped), ValueError, r"3 PSP wrapper\(s\) \(conv0, conv1, head\).*keras_psp\.slim\(model\).*keras_psp\.strip\(model\)"),
        (dict(format="onnx"), ValueError, r"unknown format 'onnx'; choose one of \('saved_model', 'tflite'\)"),
        (dict(format="tflite", quantize="int4"), ValueError, "unknown quantize mode 'int4'"),
        (dict(quantize="dynamic"), ValueError, "quantize='dynamic' needs format='tflite'"),
        (dict(format="tflite", quantize="int8"), ValueError, "quantize='int8' needs representative_data"),
        (dict(format="tflite", jit_compile=True), ValueError, "jit_compile=True applies to format='saved_model' only"),
        (dict(allow_select_ops=True), ValueError, "allow_select_ops=True applies to format='tflite'"),
        (dict(format="tflite", int8_io=True), ValueError, "int8_io=True applies to quantize='int8' only"),
        (dict(path=tmp_path / "m.tflite"), ValueError, "ends with .tflite: pass format='tflite'"),
        (dict(format="tflite", quantized_tolerance=-1), ValueError, "quantized_tolerance must be a non-negative"),
        (dict(model="model.keras"), TypeError, "expects a keras.Model, got str"),
    ]
    for kwargs, error, message in cases:
        arguments = {"model": slim_model, "path": tmp_path / "out", **kwargs}
        with pytest.raises(error, match=message):
            export(**arguments)
    assert os.listdir(tmp_path) == []

    (tmp_path / "taken.tflite").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already exists. Pass overwrite=True"):
        export(slim_model, tmp_path / "taken.tflite", format="tflite")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write to .*a_file' is a file, not a directory"):
        export(slim_model, tmp_path / "a_file" / "m.tflite", format="tflite")


def test_subclassed_model_is_refused(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="no functional graph.*Sequential or functional"):
        export(net, tmp_path / "out")


def test_missing_parent_folders_are_created(slim_model, tmp_path):
    report = export(slim_model, tmp_path / "a" / "b" / "m.tflite", format="tflite")
    assert os.path.isfile(report.path) and _no_staging_left(tmp_path / "a" / "b")


def test_compare_outputs_by_hand():
    from keras_psp.verify import compare_outputs

    expected = [np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1.0, -2.0])]
    actual = [np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1.0, -2.0])]
    m = compare_outputs(expected, actual)
    assert m["max_diff"] == pytest.approx(0.4) and m["scale"] == 2.0
    assert m["agreement"] == 0.5  # row 2 flips; the rank-1 output is no classifier
    assert m["relative_error"] == pytest.approx(np.sqrt(0.34 / 6) / np.sqrt(6.5 / 6))
    assert compare_outputs(expected, [actual[0], np.array([1.0, np.nan])])["max_diff"] == np.inf
    with pytest.raises(ValueError, match=r"returns outputs of shapes \[\(2, 2\)\], but the reference"):
        compare_outputs(expected, actual[:1])


def test_public_functions_do_not_shadow_their_modules():
    """`keras_psp.export` and `keras_psp.verify` are the functions of the API
    and the modules that hold their companions (`VerificationError`, ...)."""
    import importlib
    import inspect

    module = importlib.import_module("keras_psp.export")
    assert keras_psp.export is module and keras_psp.export.VerificationError is VerificationError
    assert keras_psp.export.ExportReport is ExportReport
    assert list(inspect.signature(keras_psp.export).parameters)[:3] == ["model", "path", "format"]
    checks = importlib.import_module("keras_psp.verify")
    assert keras_psp.verify is checks and callable(checks.compare_outputs)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.ones((4, 3), "float32")
    assert keras_psp.verify(model, model, x) == 0.0  # calling the module runs verify
