"""Composite layers pruned whole: α on their sublayers' kernels, their own `call`.

Most composite layers (custom layers built from sublayers) need nothing:
`wrap` opens them into their sublayers (`keras_psp.inlining`). A composite
whose call cannot be traced into a graph (keras_hub's decoder blocks build
their causal mask from the sequence length) is pruned whole instead, by a
family of its own (`register_layer`) made of:

- a `SublayerScales` handler: α scales kernels of its sublayers (a
  `Plan` or `JointPlan` over them), and `forward` runs the composite's own
  `call` with the scaled kernels in place of those variables;
- a `Rule` whose `rebuild` makes the smaller composite from its config
  (`intermediate_dim`, `num_query_heads`, ...) plus sliced weights, and
  whose `shrunk` tells the MAC function the new sizes.
"""

from __future__ import annotations

import contextlib
import inspect

import keras
from keras.src.backend.common.stateless_scope import get_stateless_scope

from keras_psp.layers.base import LayerHandler, attribute


@contextlib.contextmanager
def substituted(layer, values: dict):
    """Inside, the variables of `layer` named in `values` (`{path: tensor}`)
    read as those tensors; updates of other variables made inside (a seed,
    moving statistics) are applied on exit, to the enclosing stateless scope
    if there is one (JAX training), else to the variables."""
    outer = get_stateless_scope()
    pairs = [(attribute(layer, path), value) for path, value in values.items()]
    with keras.StatelessScope(state_mapping=pairs, initialize_variables=False) as scope:
        if outer is not None:  # read the other variables as the enclosing scope does
            for key, value in outer.state_mapping.items():
                scope.state_mapping.setdefault(key, value)
        before = dict(scope.state_mapping)
        yield
    replaced = {id(variable) for variable, _ in pairs}
    for variable in layer.variables:
        key = id(variable)
        value = scope.state_mapping.get(key)
        if key in replaced or value is None or value is before.get(key):
            continue
        if outer is not None:
            outer.add_update((variable, value))
        else:
            variable.assign(value)


class SublayerScales(LayerHandler):
    """α on kernels of a composite's sublayers (dotted paths in `kernels`).

    Subclasses give `kernels`, `structures` and `plan`; `forward` runs the
    composite's own call on the scaled kernels, so its math (masks, caches,
    rotary embeddings) is its own.
    """

    call_arguments = True

    def build(self, layer, input_shape):
        layer.build(input_shape)

    def forward(self, layer, inputs, kernels, *args, training=None, **kwargs):
        if training is not None and "training" in inspect.signature(layer.call).parameters:
            kwargs["training"] = training
        with substituted(layer, kernels):
            return layer(inputs, *args, **kwargs)

    def finish(self, layer, outputs):
        return outputs  # the composite's call is complete
