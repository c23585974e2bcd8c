"""keras_psp: Parameterized Structured Pruning for Keras 3."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "keras_psp" / "_version.py").read_text()
).group(1)

setup(
    name="keras-psp",
    version=VERSION,
    description="Parameterized Structured Pruning (PSP) for Keras 3: train, slim and export smaller networks.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_psp", "keras_psp.*"]),
    python_requires=">=3.10",
    # Every module-level import of the package (tests/test_packaging.py checks it).
    install_requires=[
        "keras>=3.5,<4",
        "tensorflow>=2.16",
        "numpy",
        "scipy",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "pytest-xdist",
            "hypothesis",
            "scikit-learn",
            "jax[cpu]",
            "matplotlib",
            "ruff",
            "tensorflow-datasets",
            "keras-hub>=0.32",
            # The paper examples write TensorBoard logs (TF 2.21 no longer pulls it in).
            "tensorboard",
        ],
        "deploy": ["ai-edge-litert"],
        "plot": ["matplotlib"],
        # The paper examples' data pipelines (CIFAR, ImageNet) and the digits loader.
        "examples": ["tensorflow-datasets", "scikit-learn", "tensorboard"],
        # keras_psp.distributed on the JAX backend.
        "jax": ["jax"],
        "tfmot": ["tensorflow-model-optimization", "tf_keras"],
    },
    entry_points={"console_scripts": ["keras-psp=keras_psp.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
