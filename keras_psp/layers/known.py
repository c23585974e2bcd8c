"""Layers keras_psp knows but does not cut through.

`Fixed` layers keep every channel in and out, which is exact, with no
warning (LayerNormalization normalizes over all its channels, so a cut
channel would change the others). `GroupNormalization` and `PReLU` are
known to cost no MACs (the FLOPs convention), but `slim` names them when it
keeps channels because of them.
"""

from __future__ import annotations

import math

from keras import layers as L

from keras_psp.layers.base import Fixed
from keras_psp.layers.registry import register_layer

register_layer(L.LayerNormalization, L.Softmax, L.Normalization, L.Rescaling, L.InputLayer,
               L.Embedding, rule=Fixed())
register_layer(L.GroupNormalization, L.PReLU)


def reversible_embedding_macs(layer, input_shape, output_shape) -> int:
    """0 for the lookup; positions × hidden × vocabulary for `reverse=True`
    (the tied output projection of a language model)."""
    if len(input_shape) == len(output_shape) and output_shape[-1] == layer.input_dim:
        positions = math.prod(int(d) for d in input_shape[1:-1])
        return positions * int(input_shape[-1]) * int(layer.input_dim)
    return 0


if hasattr(L, "ReversibleEmbedding"):  # Keras 3.13 and later
    register_layer(L.ReversibleEmbedding, rule=Fixed(), macs=reversible_embedding_macs)
