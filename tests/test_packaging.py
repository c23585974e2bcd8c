"""The console entry point, the examples' data and the plain-Keras output."""

import importlib.util
import os
import pathlib
import subprocess

import keras
import numpy as np
import pytest

import keras_psp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_console_entry_point_version():
    version = subprocess.run(["keras-psp", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0
    assert version.stdout.strip() == f"keras-psp {keras_psp.__version__}"
    # --help itself runs in-process in tests/test_cli.py (each process start imports TF)


def _local_data():
    spec = importlib.util.spec_from_file_location("_local_data", ROOT / "examples" / "_local_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh "
                    "installs it where apt-get can run)")
def test_fashion_mnist_is_read_in_place_from_debians_files(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (x, y), (xt, yt) = _local_data().load_fashion_mnist()
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == np.float32 and 0.0 == x.min() and x.max() == 1.0
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    assert list(tmp_path.iterdir()) == []  # nothing copied into the user's ~/.keras


def test_fashion_mnist_missing_gives_an_instruction(tmp_path, monkeypatch):
    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        _local_data().load_fashion_mnist(source=str(tmp_path / "absent"))


def test_stripped_model_loads_without_keras_psp(tmp_path):
    from helpers import assert_loads_without_keras_psp, small_cnn

    wrapped = keras_psp.wrap(small_cnn())
    wrapped.get_layer("conv1").alpha.assign(np.linspace(0, 1, 8).astype("float32"))
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    expected = keras.ops.convert_to_numpy(wrapped(x))
    assert_loads_without_keras_psp(keras_psp.strip(wrapped), x, expected, tmp_path)


def test_verify_reports_the_largest_output_difference(rng):
    from helpers import small_cnn

    model = small_cnn()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    x = rng.random((5, 8, 8, 1)).astype("float32")
    assert keras_psp.verify(model, twin, x) == 0.0
    head = twin.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.arange(len(bias), dtype="float32")])  # moves the softmax
    expected = np.abs(model.predict(x, verbose=0) - twin.predict(x, verbose=0)).max()
    assert keras_psp.verify(model, twin, x) == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3

    other = small_cnn(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        keras_psp.verify(model, other, x)


def _imports(path):
    """(module-level, function-level) top-level module names imported by a file."""
    import ast

    tree = ast.parse(path.read_text())
    top, lazy = set(), set()

    def names(node):
        if isinstance(node, ast.Import):
            return {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return {node.module.split(".")[0]}
        return set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            (lazy if in_function else top).update(names(child))
            visit(child, function)

    visit(tree, False)
    return top, lazy - top


def _requirements():
    """(install_requires, every extra) of the installed keras-psp, as distribution names."""
    import importlib.metadata
    import re

    base, extras = set(), set()
    for line in importlib.metadata.requires("keras-psp") or []:
        name = re.split(r"[\s\[<>=!;~]", line, maxsplit=1)[0].lower().replace("_", "-")
        (extras if "extra ==" in line else base).add(name)
    return base, extras


def test_every_import_of_the_package_is_a_declared_dependency():
    """A plain `pip install keras-psp` must be able to import every module: each
    module-level import is in install_requires; imports inside functions (optional
    features) are in install_requires or an extra."""
    import importlib.metadata
    import pathlib
    import sys

    provides = importlib.metadata.packages_distributions()
    base, extras = _requirements()
    stdlib = set(sys.stdlib_module_names) | {"__future__", "keras_psp"}
    package = pathlib.Path(keras_psp.__file__).parent
    undeclared = []
    for path in sorted(package.rglob("*.py")):
        top, lazy = _imports(path)
        for module, allowed in [(m, base) for m in top] + [(m, base | extras) for m in lazy]:
            if module in stdlib:
                continue
            dists = {d.lower().replace("_", "-") for d in provides.get(module, [module])}
            if not dists & allowed:
                undeclared.append(f"{path.relative_to(package)}: {module} ({sorted(dists)})")
    assert not undeclared, undeclared
    assert {"keras", "numpy", "scipy", "tensorflow"} <= base
    assert "tensorflow-datasets" not in base and "tensorboard" not in base  # examples only


def test_the_package_has_no_import_cycles():
    """Every `from keras_psp... import` (at module level or inside a function)
    forms an acyclic graph of modules: no lazy import hides a cycle."""
    import ast

    package = ROOT / "keras_psp"
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_psp"):
                targets.add(node.module)
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if target == name or target.startswith(name + "."):
                continue  # a package importing its own submodules
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [target])}")
            if target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    assert len(graph) > 30
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
