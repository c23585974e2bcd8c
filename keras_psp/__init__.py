"""keras_psp: Parameterized Structured Pruning for Keras 3."""

from keras_psp._version import __version__
from keras_psp.cloning import strip, wrap
from keras_psp.flops import count_flops, count_params
from keras_psp.structures import STRUCTURES
from keras_psp.surgery.slim import slim
from keras_psp.verify import verify
from keras_psp.wrapper import PSP, keep_mask

__all__ = ["PSP", "STRUCTURES", "__version__", "count_flops", "count_params", "keep_mask", "slim", "strip", "verify", "wrap"]
