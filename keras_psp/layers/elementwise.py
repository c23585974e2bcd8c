"""Layers that map channel `c` to channel `c`: activations, normalization over
channels, dropout, pooling, cropping, upsampling, zero padding."""

from __future__ import annotations

from keras import layers as L

from keras_psp.layers.base import Passthrough, Rule
from keras_psp.layers.registry import register_layer


class BatchNormRule(Passthrough):
    """Batch normalization over the last axis (other axes keep every channel)."""

    def applies(self, layer, in_shapes, out_shapes):
        return layer.axis in (-1, len(in_shapes[0]) - 1)


class ActivationRule(Passthrough):
    """`Activation` of an element-wise function (not softmax, which mixes channels)."""

    def applies(self, layer, in_shapes, out_shapes):
        return getattr(layer.activation, "__name__", "") not in ("softmax", "log_softmax")


class Padding(Passthrough):
    """Zero padding: a constant channel gets a zero border, so is not constant."""

    def constant(self, op, const_in, shapes):
        return Rule.constant(self, op, const_in, shapes)


PASSTHROUGH = (
    L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
    L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.Identity,
)

register_layer(*PASSTHROUGH, rule=Passthrough())
register_layer(L.BatchNormalization, rule=BatchNormRule())
register_layer(L.Activation, rule=ActivationRule())
register_layer(L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, rule=Padding())
