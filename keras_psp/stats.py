"""How clearly α splits into kept and cut structures.

PSP's claim is that weight decay on α separates structures into two groups:
important ones with large α and unimportant ones near zero. The statistic
here measures that split on the same scale the pruning rule uses:

- each α is taken relative to its layer's reference (the largest |α| of the
  layer; 1 for a layer-wise α), exactly like `keep_mask`, so the statistic is
  unchanged by a uniform rescaling of a layer's α (which a BatchNormalization
  after the layer cancels: README, "How pruning decides");
- on a log10 scale (floored at `FLOOR`, so "effectively zero" is one place),
  the threshold splits the values into a kept and a cut group, and Otsu's
  separability η = between-group variance / total variance (Otsu 1979) says
  how much of the spread is the distance between the groups rather than the
  spread within them: 1 for two point masses, lower for groups with tails
  that meet at the threshold;
- any threshold split of a single Gaussian has η <= 2/π (the maximum, at its
  mean), so `separation = (η - 2/π) / (1 - 2/π)`, clipped to [0, 1]: 0 for a
  unimodal (log-normal) α however it is cut, and when nothing (or
  everything) is cut; about 0.3 for a flat spread of log|α|; near 1 when the
  cut α sit decades below a compact kept group.

The gap between the groups alone (smallest kept minus largest cut) was the
first choice and proved fragile: during training a few structures are always
on their way down through the threshold, and they decide it.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

#: Relative |α| below this counts as this (log10 scale floor: 1e-8).
FLOOR = 1e-8

#: Otsu's η of a Gaussian split at its mean: the most any split of one Gaussian gives.
GAUSSIAN_ETA = 2.0 / np.pi


def relative_alpha(alpha, structure: str) -> np.ndarray:
    """|α| relative to the pruning rule's reference, flattened."""
    magnitude = np.abs(np.ravel(keras.ops.convert_to_numpy(alpha)).astype("float64"))
    if structure == "layer":
        return magnitude
    top = magnitude.max() if magnitude.size else 0.0
    return magnitude / top if top > 0 else np.zeros_like(magnitude)


def separation(relative: np.ndarray, threshold: float) -> float:
    """Otsu's separability of the kept/cut split on log10 |α|, Gaussian-baselined.

    Args:
        relative: |α| relative to the layer's reference (`relative_alpha`);
            values from several layers may be pooled.
        threshold: The relative pruning threshold (`PSP.threshold`).

    Returns:
        A float in [0, 1]; 0 when one group is empty.

    Example:

    ```python
    separation(np.array([1.0, 0.8, 0.9, 1e-6, 1e-7]), 1e-2)   # ≈ 0.97
    separation(np.array([1.0, 0.5, 0.02, 0.008]), 1e-2)       # 0.0
    ```
    """
    values = np.log10(np.maximum(np.asarray(relative, "float64"), FLOOR))
    if threshold > FLOOR:
        kept = values >= np.log10(threshold)
    else:  # only exact zeros are cut (FlopsBudget's threshold 0): they sit at the floor
        kept = values > np.log10(FLOOR)
    if kept.all() or not kept.any():
        return 0.0
    total = np.sum((values - values.mean()) ** 2)
    if total <= 0:
        return 0.0
    within = sum(np.sum((group - group.mean()) ** 2) for group in (values[kept], values[~kept]))
    eta = 1.0 - within / total
    return float(np.clip((eta - GAUSSIAN_ETA) / (1.0 - GAUSSIAN_ETA), 0.0, 1.0))


@dataclasses.dataclass
class LayerStats:
    """α statistics of one PSP layer.

    Attributes:
        name: The layer's name.
        structure: Its structure.
        total: Number of structures.
        cut: Structures the pruning rule cuts now.
        separation: `separation` of its α (0 for a single layer-wise α).
        finite: Whether every α is finite.
        relative: |α| relative to the reference (for pooling and plots).
    """

    name: str
    structure: str
    total: int
    cut: int
    separation: float
    finite: bool
    relative: np.ndarray


def layer_stats(layer) -> LayerStats:
    """`LayerStats` of a `keras_psp.PSP` layer."""
    alpha = np.ravel(keras.ops.convert_to_numpy(layer.alpha))
    finite = bool(np.all(np.isfinite(alpha)))
    relative = relative_alpha(alpha, layer.structure) if finite else np.zeros(alpha.size)
    kept = np.ravel(layer.mask()) if finite else np.ones(alpha.size, bool)
    return LayerStats(
        name=layer.name,
        structure=layer.structure,
        total=int(alpha.size),
        cut=int(alpha.size - kept.sum()),
        separation=separation(relative, layer.threshold) if finite else 0.0,
        finite=finite,
        relative=relative,
    )


def model_stats(layers) -> tuple[list[LayerStats], float]:
    """Per-layer stats and the pooled separation over all finite layers."""
    stats = [layer_stats(layer) for layer in layers]
    pooled = [s.relative for s in stats if s.finite]
    thresholds = {layer.threshold for layer in layers}
    if not pooled or len(thresholds) != 1:  # mixed thresholds: mean of layers
        finite = [s.separation for s in stats if s.finite]
        return stats, float(np.mean(finite)) if finite else 0.0
    return stats, separation(np.concatenate(pooled), thresholds.pop())
