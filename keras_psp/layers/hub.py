"""keras_hub's own layers that keras_psp knows (loaded when a model holds one).

keras_hub builds its backbones from stock Keras layers, composite blocks
(opened by `keras_psp.inlining`) and a few layers of its own with weights:
position embeddings, which keep every channel and cost no MACs (its
`ReversibleEmbedding` is Keras's: `keras_psp.layers.known`), and
normalizations over the channels
(`RMSNormalization`, `LlamaLayerNorm`), which keep every channel as
`LayerNormalization` does. Gemma's decoder block, which cannot be opened, has
a family of its own (`keras_psp.layers.hub_gemma`). The patch embeddings of ViT and DeiT keep their
channels; their convolution is counted inside them.
"""

from __future__ import annotations

import importlib

from keras_psp.layers.base import Fixed
from keras_psp.layers.registry import register_layer

#: `(module, class)` of keras_hub layers that keep every channel.
_FIXED = (
    ("keras_hub.src.layers.modeling.position_embedding", "PositionEmbedding"),
    ("keras_hub.src.layers.modeling.rotary_embedding", "RotaryEmbedding"),
    ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization"),
    ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm"),
    ("keras_hub.src.models.vit.vit_layers", "ViTPatchingAndEmbedding"),
    ("keras_hub.src.models.deit.deit_layers", "DeiTEmbeddings"),
)


def _classes(names):
    for module, name in names:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:  # another keras_hub version
            continue
        if found is not None:
            yield found


register_layer(*_classes(_FIXED), rule=Fixed())
try:  # decoder blocks that stay whole: pruned by their own family
    from keras_psp.layers import hub_gemma

    hub_gemma.register()
except ImportError:  # another keras_hub version
    pass
