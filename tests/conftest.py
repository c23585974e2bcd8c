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
                     "zero_output", "only_path", "names_and_paths"),
    "test_callbacks.py": ("logs_in_history", "patience", "non_finite", "strength",
                          "reaches_the_target[0]", "cuts_down_to_the_schedule"),
    "test_ranking.py": ("lowest_relative", "optimizer_slots", "refuses"),
    "test_pruning.py": ("trained_model",),
    "test_distributed.py": None,
    "test_distributed_jax.py": None,
    "test_groups.py": ("keep_mask", "training_moves_group_alpha", "tying"),
    "test_layer_registry.py": ("readme_guide",),
    "test_attention.py": None,  # head α on JAX (TF-only tests skip)
    "test_flops.py": ("attention_and_composite",),  # a composite traced on JAX  # a user's layer, its math in keras.ops
    "test_inlining.py": ("of_your_own", "structure_per_layer_class", "matmuls"),  # traced on JAX
    "test_decoder_blocks.py": ("train_and_round_trip",),  # α inside a block's call, JAX training
    "test_einsum_dense.py": ("gated_mlp",),
}
_CLONING_EXCLUDED = ("keras_applications", "nested_application", "convnext")


def _in_jax_subset(item) -> bool:
    if item.path.name == "test_cloning.py" and any(x in item.name for x in _CLONING_EXCLUDED):
        return False
    wanted = JAX_SUBSET.get(item.path.name, ())
    return wanted is None or any(part in item.name for part in wanted)


def pytest_collection_modifyitems(config, items):
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
    from helpers import load_digits

    return load_digits()
