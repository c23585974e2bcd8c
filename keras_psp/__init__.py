"""keras_psp: Parameterized Structured Pruning for Keras 3."""

from keras_psp import distributed, export, latency, layers, timing, verify
from keras_psp._version import __version__
from keras_psp.budget import FlopsBudget, LatencyBudget
from keras_psp.callbacks import SeparationMonitor
from keras_psp.cloning import strip, wrap
from keras_psp.flops import count_flops, count_params
from keras_psp.layers import STRUCTURES, register_layer
from keras_psp.pruning import prune
from keras_psp.ranking import prune_to
from keras_psp.recalibration import recalibrate
from keras_psp.report import plot_alphas, summary
from keras_psp.surgery.slim import slim
from keras_psp.wrapper import PSP, keep_mask

__all__ = ["FlopsBudget", "LatencyBudget", "PSP", "STRUCTURES", "SeparationMonitor", "__version__", "count_flops", "count_params", "distributed", "export", "keep_mask", "latency", "layers", "plot_alphas", "prune", "prune_to", "recalibrate", "register_layer", "slim", "strip", "summary", "timing", "verify", "wrap"]
