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
    install_requires=[
        "keras>=3.5,<4",
        "tensorflow>=2.16",
        "tensorflow-datasets",
        "tensorboard",
        "numpy",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "hypothesis",
            "scikit-learn",
            "jax[cpu]",
            "matplotlib",
            "ruff",
        ],
        "deploy": ["ai-edge-litert"],
        "plot": ["matplotlib"],
        "tfmot": ["tensorflow-model-optimization", "tf_keras"],
    },
    entry_points={"console_scripts": ["keras-psp=keras_psp.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
