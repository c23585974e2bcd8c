"""The `keras-psp` command line: summary, slim, export, bench; bad input."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_psp
from helpers import small_cnn
from keras_psp.cli import main

pytestmark = pytest.mark.tensorflow_only

#: TensorFlow's native start-up logging (before absl is initialized), which
#: no Python code can silence: "WARNING: All log messages before absl::...",
#: "I0000 00:00:... cudart_stub.cc:31] ...", LiteRT's "INFO: Created ... delegate".
TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]|INFO: |"
    r"fully_quantize: )"
)


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not TF_NOISE.match(line)]


def _run(*args, script=False):
    """Runs the command line in a fresh process (`keras-psp` or `python -m keras_psp.cli`)."""
    command = ["keras-psp"] if script else [sys.executable, "-m", "keras_psp.cli"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    return subprocess.run(
        command + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """wrapped.keras (3 of conv1's 8 input channels cut), plain.keras, x.npy and bad files."""
    folder = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    wrapped = keras_psp.wrap(small_cnn())
    wrapped.get_layer("conv1").alpha.assign(np.array([1, 0, 1, 0, 1, 1, 0, 1], "float32"))
    wrapped.save(folder / "wrapped.keras")
    small_cnn().save(folder / "plain.keras")
    np.save(folder / "x.npy", np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32"))
    (folder / "corrupt.keras").write_bytes(b"PK\x03\x04 this is not really a zip")
    (folder / "notes.txt").write_text("not a model")
    (folder / "empty_dir").mkdir()
    return folder


def test_workflow_summary_slim_export_bench_in_subprocesses(files, tmp_path, capsys):
    """summary and slim through the installed `keras-psp` script (its exit codes and
    output as a user sees them); export and bench on their results in this process
    (each start of a new process imports TensorFlow again, ~10 s here)."""
    summary = _run("summary", files / "wrapped.keras", script=True)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert 'PSP summary: "cnn"' in summary.stdout and "conv1" in summary.stdout
    assert "5/8" in summary.stdout  # conv1 keeps 5 of its 8 input channels

    slim_path = tmp_path / "slim.keras"
    slim = _run("slim", files / "wrapped.keras", "-o", slim_path, script=True)
    assert slim.returncode == 0, slim.stderr[-2000:]
    assert re.search(r"parameters +1,490 → +1,019 +\(0\.684\)", slim.stdout), slim.stdout
    assert re.search(r"FLOPs \(MACs\) +78,496 → +49,120 +\(0\.626\)", slim.stdout), slim.stdout
    assert "verified on 32 random inputs" in slim.stdout
    small = keras.saving.load_model(slim_path)
    assert small.count_params() == 1019 and not keras_psp.cloning.psp_layers(small)

    tflite = tmp_path / "model.tflite"
    capsys.readouterr()
    assert main(["export", str(slim_path), "-o", str(tflite), "--quantize", "int8",
                 "--calibration", str(files / "x.npy")]) == 0
    exported = capsys.readouterr().out
    assert "LiteRT int8 (float32 inputs/outputs)" in exported
    assert "verified on 64 examples (representative_data)" in exported
    assert "top-1 agreement" in exported and tflite.is_file()

    assert main(["bench", str(slim_path), str(tflite), "--rounds", "3", "--warmup", "1"]) == 0
    bench = capsys.readouterr()
    lines = bench.out.splitlines()
    assert "batch 1, 3 interleaved rounds (A B A B …)" in lines[0]
    assert re.search(r"A +\S*slim\.keras +Keras \+ XLA +median \d+\.\d{3} ms", bench.out)
    assert re.search(r"B +\S*model\.tflite +LiteRT +median \d+\.\d{3} ms", bench.out)
    medians = [float(m) for m in re.findall(r"median (\d+\.\d+) ms", bench.out)]
    ratio = float(re.search(r"ratio B/A \(median latency\): (\d+\.\d+)", bench.out).group(1))
    assert ratio == pytest.approx(medians[1] / medians[0], abs=2e-3 + 0.01 * ratio)


def test_bad_input_in_a_subprocess_is_one_line_and_status_2(files):
    result = _run("summary", files / "corrupt.keras", script=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert _stderr_lines(result.stderr) == [
        f"keras-psp: error: {files / 'corrupt.keras'} is not a valid .keras archive "
        "(not a zip file: truncated or corrupt?)."
    ]
    assert result.stdout == ""


def _fails(argv, capsys, status=2):
    """Runs `main(argv)` in-process; returns its single stderr line."""
    assert main([str(a) for a in argv]) == status
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-psp: error: "), captured.err
    return lines[0]


def test_bad_input_gives_one_line_and_status_2(files, tmp_path, capsys):
    f = files
    cases = [
        (["summary", f / "missing.keras"], "missing.keras: no such file."),
        (["summary", f / "notes.txt"], "is not a .keras file: save the model with model.save"),
        (["summary", f / "corrupt.keras"], "is not a valid .keras archive"),
        (["summary", f / "empty_dir"], "is a directory; this command needs a .keras model file"),
        (["slim", f / "plain.keras", "-o", tmp_path / "s.keras"],
         "has no PSP layers, so slim would remove nothing: wrap the model with keras_psp.wrap"),
        (["slim", f / "wrapped.keras", "-o", f / "plain.keras"],
         "plain.keras already exists: pass --overwrite to replace it."),
        (["slim", f / "wrapped.keras", "-o", tmp_path / "s.h5"], "end the name with .keras"),
        (["export", f / "wrapped.keras", "-o", tmp_path / "m.tflite"],
         "still contains PSP wrappers: run `keras-psp slim"),
        (["export", f / "plain.keras", "-o", tmp_path / "m.tflite", "--quantize", "int8"],
         "quantize='int8' needs representative_data"),
        (["export", f / "plain.keras", "-o", tmp_path / "sm", "--quantize", "float16"],
         "quantize='float16' needs format='tflite'"),
        (["export", f / "plain.keras", "-o", tmp_path / "m.tflite", "--quantize", "int8",
          "--calibration", f / "missing.npy"], "--calibration .*missing.npy: no such file."),
        (["export", f / "plain.keras", "-o", tmp_path / "m.tflite", "--quantize", "int8",
          "--calibration", f / "notes.txt"], "is not a .npy file: save the array with numpy.save"),
        (["export", f / "plain.keras", "-o", f / "x.npy"],
         "already exists. Pass overwrite=True"),
        (["bench", f / "missing.tflite"], "missing.tflite: no such file."),
        (["bench", f / "empty_dir"], "is a directory without saved_model.pb"),
        (["bench", f / "notes.txt"], "expected a .keras file, a SavedModel directory or a .tflite"),
        (["bench", f / "plain.keras", "--rounds", "0"], "--rounds and --batch-size must be positive"),
    ]
    for argv, message in cases:
        line = _fails(argv, capsys)
        assert re.search(message, line), (argv, line)
    assert not (tmp_path / "s.keras").exists() and not (tmp_path / "m.tflite").exists()


def test_bench_refuses_models_with_different_inputs(files, tmp_path, capsys):
    other = small_cnn(input_shape=(6, 6, 1))
    other.save(tmp_path / "other.keras")
    line = _fails(["bench", files / "plain.keras", tmp_path / "other.keras", "-r", "1"], capsys)
    assert "the models take different inputs" in line and "(None, 6, 6, 1) vs (1, 8, 8, 1)" in line


def test_export_saved_model_and_bench_it_in_process(files, tmp_path, capsys):
    assert main(["export", str(files / "plain.keras"), "-o", str(tmp_path / "sm"), "--jit-compile"]) == 0
    out = capsys.readouterr().out
    assert "SavedModel + XLA" in out and "verified on 16 examples (random inputs)" in out
    assert main(["bench", str(tmp_path / "sm"), "-b", "4", "-r", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch 4, 2 interleaved rounds," in out and "SavedModel + XLA" in out
    assert "ratio" not in out  # one model: no ratio


def test_a_file_failing_verification_exits_1_and_is_not_written(files, tmp_path, capsys, monkeypatch):
    from keras_psp.formats import FORMATS, Format

    real = FORMATS["tflite"]

    def faulty(model, path, options, workdir):  # writes a model with other weights
        wrong = keras.models.clone_model(model)
        wrong.set_weights([w + 0.5 for w in model.get_weights()])
        real.write(wrong, path, options, workdir)

    monkeypatch.setitem(FORMATS, "tflite", Format(faulty, real.runner, real.quantize, real.options))
    line = _fails(["export", files / "plain.keras", "-o", tmp_path / "m.tflite"], capsys, status=1)
    assert "differs from model" in line and "Nothing was written" in line
    assert not (tmp_path / "m.tflite").exists()


def test_every_command_has_help(capsys):
    for command, words in {
        None: ["summary", "slim", "export", "bench", "--version"],
        "summary": ["keras_psp.summary"],
        "slim": ["--multiple-of", "--no-gather", "-o OUTPUT"],
        "export": ["--format", "--quantize", "--calibration", "--jit-compile", "--int8-io"],
        "bench": ["--batch-size", "--rounds", "A B A B", "jit_compile=True"],
    }.items():
        with pytest.raises(SystemExit) as exit_info:
            main(([command] if command else []) + ["--help"])
        assert exit_info.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in out, (command, word)


def test_usage_errors_exit_2(capsys):
    for argv in (["bench"], ["bench", "a", "b", "c"], ["export", "m.keras"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: keras-psp" in capsys.readouterr().out
