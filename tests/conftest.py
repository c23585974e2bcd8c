import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "tensorflow_only: needs the TensorFlow backend (tf.distribute, "
        "GradientTape, export); deselected in the JAX run",
    )


#: The JAX run (scripts/test.sh) is a subset: the layer math, saving and cloning,
#: surgery on small graphs, the callbacks' in-fit checks, ranking and JAX's own
#: multi-process training. Surgery itself is backend-independent numpy, covered in full
#: on TensorFlow; wrapping whole keras.applications models on JAX compiles a random
#: initializer per new layer shape (minutes). Per file: None (every test) or the
#: substrings of the test names to run.
JAX_SUBSET = {
    # the layer math on JAX; α shapes and `Plan.reduce` are numpy, backend-independent
    "test_structures.py": ("starts_equal", "effective_kernel", "cut_channel", "cut_filter",
                           "cut_layer", "dense_has_no_shape", "channels_first"),
    "test_wrapper.py": None,
    "test_saving.py": None,
    "test_penalties.py": None,
    "test_recalibration.py": None,
    "test_cloning.py": None,  # but not _CLONING_EXCLUDED
    "test_slim_random.py": ("random_graphs",),
    "test_slim.py": ("plain_chain", "flatten", "fold", "zero_constant", "residual_branch",
                     "zero_output", "only_path"),
    "test_callbacks.py": ("logs_in_history", "patience", "non_finite", "strength",
                          "reaches_the_target[0]", "cuts_down_to_the_schedule"),
    "test_ranking.py": ("lowest_relative", "optimizer_slots", "refuses"),
    "test_pruning.py": ("trained_model",),
    "test_distributed.py": None,
    "test_distributed_jax.py": None,
}
_CLONING_EXCLUDED = ("keras_applications", "nested_application", "convnext")


def _in_jax_subset(item) -> bool:
    if item.path.name == "test_cloning.py" and any(x in item.name for x in _CLONING_EXCLUDED):
        return False
    wanted = JAX_SUBSET.get(item.path.name, ())
    return wanted is None or any(part in item.name for part in wanted)


#: The longest tests (seconds on the 2-core CI machine, `--durations`), run first so that
#: the two xdist workers do not end with one of them alone on a long test.
SLOW_FIRST = {
    "test_distributed_jax.py::test_killed": 150, "test_distributed_jax.py::test_two": 125,
    "test_slim_random.py::test_random_graphs": 100, "test_distributed_tf.py::test_killed": 77,
    "test_distributed_tf.py::test_two": 65, "test_study.py::test_study_quick": 60,
    "test_main_job.py::test_main_job_trains": 60, "test_cli.py::test_workflow": 54,
    "test_distributed_tf.py::test_mirrored": 49, "test_paper_examples.py::test_imagenet": 40,
    "test_slim.py::test_keras_applications": 30, "test_paper_examples.py::test_cifar": 30,
    "test_pruning.py::test_prune_a_trained": 30, "test_packaging.py::test_console": 30,
    "test_callbacks.py::test_budget_reaches": 25,
}


def _expected_seconds(item) -> float:
    name = f"{item.path.name}::{item.name}"
    return max((s for key, s in SLOW_FIRST.items() if name.startswith(key)), default=0.0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_expected_seconds, reverse=True)  # stable: the rest keep their order
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason="needs the TensorFlow backend")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
    if os.environ.get("PSP_JAX_SUBSET") == "1":  # scripts/test.sh: the JAX run
        kept = [item for item in items if _in_jax_subset(item)]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def digits():
    from keras_psp.datasets import load_digits

    return load_digits()
