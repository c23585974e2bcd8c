"""How clearly α splits into kept and cut structures.

PSP's claim is that weight decay on α separates structures into two groups:
important ones with large α and unimportant ones near zero. The statistic
here measures that split on the same scale the pruning rule uses:

- each α is taken relative to its layer's reference (the largest |α| of the
  layer; 1 for a layer-wise α), exactly like `keep_mask`, so the statistic is
  unchanged by a uniform rescaling of a layer's α (which a BatchNormalization
  after the layer cancels, DESIGN.md §3);
- on a log10 scale (floored at `FLOOR`), the *gap* between the two groups
  that the threshold defines (smallest kept minus largest cut value) is
  divided by the *spread* of all values (largest minus smallest);
- `separation = gap / spread`, in [0, 1]: 0 when nothing is cut (or the
  groups touch at the threshold), near 1 when the cut structures sit many
  decades below every kept one. A unimodal set of α that straddles the
  threshold scores near 0; a clearly bimodal one scores high.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

#: Relative |α| below this counts as this (log10 scale floor: 1e-8).
FLOOR = 1e-8


def relative_alpha(alpha, structure: str) -> np.ndarray:
    """|α| relative to the pruning rule's reference, flattened."""
    magnitude = np.abs(np.ravel(keras.ops.convert_to_numpy(alpha)).astype("float64"))
    if structure == "layer":
        return magnitude
    top = magnitude.max() if magnitude.size else 0.0
    return magnitude / top if top > 0 else np.zeros_like(magnitude)


def separation(relative: np.ndarray, threshold: float) -> float:
    """Gap between cut and kept groups over the spread, on log10 |α|.

    Args:
        relative: |α| relative to the layer's reference (`relative_alpha`);
            values from several layers may be pooled.
        threshold: The relative pruning threshold (`PSP.threshold`).

    Returns:
        A float in [0, 1]; 0 when one group is empty.

    Example:

    ```python
    separation(np.array([1.0, 0.8, 0.9, 1e-6, 1e-7]), 1e-2)   # ≈ 0.84
    separation(np.array([1.0, 0.5, 0.02, 0.008]), 1e-2)       # ≈ 0.19
    ```
    """
    values = np.log10(np.maximum(np.asarray(relative, "float64"), FLOOR))
    kept = values >= np.log10(threshold)
    cut_values = values[~kept]
    if not kept.any() or not cut_values.size:
        return 0.0
    spread = values.max() - values.min()
    if spread <= 0:
        return 0.0
    gap = values[kept].min() - cut_values.max()
    return float(np.clip(gap / spread, 0.0, 1.0))


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
