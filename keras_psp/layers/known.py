"""Layers keras_psp knows but does not cut through.

`Fixed` layers keep every channel in and out, which is exact, with no
warning (LayerNormalization normalizes over all its channels, so a cut
channel would change the others). `GroupNormalization` and `PReLU` are
known to cost no MACs (the FLOPs convention), but `slim` names them when it
keeps channels because of them.
"""

from __future__ import annotations

from keras import layers as L

from keras_psp.layers.base import Fixed
from keras_psp.layers.registry import register_layer

register_layer(L.LayerNormalization, L.Softmax, L.Normalization, L.Rescaling, L.InputLayer,
               L.Embedding, rule=Fixed())
register_layer(L.GroupNormalization, L.PReLU)
