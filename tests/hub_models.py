"""Tiny keras-hub backbones for tests, built offline from their classes.

Every factory builds a backbone with random weights (never `from_preset`:
nothing is downloaded) and returns `(model, example_inputs)`, the inputs a
numpy array or a dict of arrays of batch 2. Written against keras-hub 0.32;
the comments note the constructor constraints found there.
"""

import keras
import keras_hub
import numpy as np

BATCH = 2


def _seed(seed):
    if seed is not None:
        keras.utils.set_random_seed(seed)


def _images(hw, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(BATCH, hw, hw, channels)).astype(
        "float32"
    )


def _token_inputs(vocab, seq_len, seed=0, segments=False):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, vocab, size=(BATCH, seq_len)).astype("int32")
    padding_mask = np.ones((BATCH, seq_len), dtype="int32")
    padding_mask[1, seq_len - 3 :] = 0  # second sample is padded
    token_ids[1, seq_len - 3 :] = 0
    out = {"token_ids": token_ids, "padding_mask": padding_mask}
    if segments:
        seg = np.zeros((BATCH, seq_len), dtype="int32")
        seg[:, seq_len // 2 :] = 1
        out["segment_ids"] = seg
    return out


# --------------------------------------------------------------------------
# CNNs
# --------------------------------------------------------------------------
def resnet_basic(seed=0):
    """ResNetV1-like, basic blocks. Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],  # basic_block stack0 shortcut is identity: stem must emit 64
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],  # keras_hub requires [0] == 64
        stackwise_num_blocks=[2, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def resnet_bottleneck(seed=0):
    """ResNetV1-like, bottleneck blocks. Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[8],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],  # keras_hub requires [0] == 64
        stackwise_num_blocks=[2, 1],
        stackwise_num_strides=[1, 2],
        block_type="bottleneck_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def resnet_v2(seed=0):
    """ResNetV2-like (pre-activation), basic blocks. Input (2, 32, 32, 3)."""
    _seed(seed)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],  # basic_block stack0 shortcut is identity: stem must emit 64
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],  # keras_hub requires [0] == 64
        stackwise_num_blocks=[2, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=True,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def resnet_v2_bottleneck(seed=0):
    """ResNetV2-like (pre-activation), bottleneck blocks. Input (2,32,32,3)."""
    _seed(seed)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[8],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],  # keras_hub requires [0] == 64
        stackwise_num_blocks=[2, 1],
        stackwise_num_strides=[1, 2],
        block_type="bottleneck_block",
        use_pre_activation=True,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def resnet_vd(seed=0):
    """ResNet-vd ("bottleneck_block_vd": avg-pool shortcut), 3 stem convs.
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[8, 8, 16],
        input_conv_kernel_sizes=[3, 3, 3],
        stackwise_num_filters=[64, 32],  # keras_hub requires [0] == 64
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="bottleneck_block_vd",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def mobilenet(seed=0):
    """MobileNetV3-like (DepthwiseConvBlock, InvertedResidualBlock with SE,
    ConvBnActBlock). Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32, 48]],
        stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[8, 8], [16, 16]],
        stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        input_activation="hard_swish",
        output_activation="hard_swish",
        input_num_filters=8,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def efficientnet(seed=0, num_features=1280):
    """EfficientNetV2-like: 1 FusedMBConvBlock stack + 2 MBConvBlock stacks
    (one with squeeze-excite). Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0, 1.0],
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 1],
        stackwise_block_types=["fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0, 0, 0],
        stackwise_nores_option=[False, False, False],
        # NOTE: EfficientNetBackbone.get_config() omits num_features, so any
        # value other than the default 1280 breaks Backbone.from_config
        # (top_conv is rebuilt with 1280 filters).
        num_features=num_features,
        dropout=0.0,
        input_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def efficientnet_v1(seed=0, num_features=1280):
    """EfficientNet(V1)-like: block type "v1" (built inline from stock
    layers, with SE). Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        # NOTE: EfficientNetBackbone.get_config() omits num_features, so any
        # value other than the default 1280 breaks Backbone.from_config
        # (top_conv is rebuilt with 1280 filters).
        num_features=num_features,
        dropout=0.0,
        input_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def densenet(seed=0):
    """DenseNet, 3 stacks. Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.DenseNetBackbone(
        stackwise_num_repeats=[2, 2, 2],
        growth_rate=8,
        compression_ratio=0.5,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def vgg(seed=0):
    """VGG, 3 stacks. Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.VGGBackbone(
        stackwise_num_repeats=[1, 2, 2],
        stackwise_num_filters=[8, 16, 16],
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def xception(seed=0):
    """Xception (SeparableConv2D, residual 1x1 stride-2 convs).
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.XceptionBackbone(
        # entry block, 1 pooled residual block (channels must change so the
        # stride-2 1x1 residual conv is inserted), 1 middle-flow identity
        # residual block (no pooling, same channels), exit block.
        stackwise_conv_filters=[[8, 16], [32, 32], [32, 32], [48, 64]],
        stackwise_pooling=[True, True, False, False],
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def cspnet(seed=0):
    """CSPNet (CSPDarkNet-like: stage_type "csp", dark blocks).
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1, 2],
        stackwise_strides=[1, 2, 2],
        stackwise_num_filters=[8, 16, 32],
        stage_type="csp",
        block_type="dark_block",
        # per-stage ratios as in CSPDarkNet-53 (lists are padded with their
        # last value); other combinations fail to build (Add shape mismatch)
        expand_ratio=[2.0, 1.0, 1.0],
        bottle_ratio=[0.5, 1.0, 1.0],
        block_ratio=[1.0, 0.5, 0.5],
        down_growth=True,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


def cspnet_cs3(seed=0):
    """CSPNet, stage_type "cs3" with bottleneck blocks (CSPResNet/CS3-like).
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=2,
        stackwise_depth=[1, 2],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[16, 32],
        stage_type="cs3",
        block_type="bottleneck_block",
        expand_ratio=[2.0],
        bottle_ratio=[0.5],
        block_ratio=[1.0],
        down_growth=True,
        image_shape=(32, 32, 3),
    )
    return model, _images(32, seed=seed)


# --------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------
def vit(seed=0, num_heads=2, hidden_dim=16, mlp_dim=32):
    """ViT (ViTPatchingAndEmbedding + ViTEncoder; fixed image size).
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
    )
    return model, _images(32, seed=seed)


def vit_wide(seed=0):
    """ViT with a real ViT's proportions: MLP 4× the hidden width, 4 heads,
    so that the patch embedding is a small share of the FLOPs."""
    return vit(seed, num_heads=4, hidden_dim=32, mlp_dim=128)


def deit(seed=0, num_heads=2, hidden_dim=16, intermediate_dim=32):
    """DeiT (DeiTEmbeddings + DeiTEncoder; fixed image size).
    Input (2, 32, 32, 3) float32."""
    _seed(seed)
    model = keras_hub.models.DeiTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
    )
    return model, _images(32, seed=seed)


def deit_wide(seed=0):
    """DeiT with a real DeiT's proportions (MLP 4× the hidden width, 4 heads)."""
    return deit(seed, num_heads=4, hidden_dim=32, intermediate_dim=128)


BERT_SEQ_LEN = 16


def bert(seed=0):
    """BERT. Inputs dict token_ids/segment_ids/padding_mask, int32 (2, 16);
    the sequence dim is variable (None) up to max_sequence_length=16."""
    _seed(seed)
    model = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    return model, _token_inputs(100, BERT_SEQ_LEN, seed=seed, segments=True)


def gemma(seed=0, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
          intermediate_dim=32):
    """Gemma decoder (tied ReversibleEmbedding; backbone uses it only
    forward). Inputs token_ids/padding_mask int32 (2, 8), sequence dim
    variable."""
    _seed(seed)
    model = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        head_dim=8,
    )
    return model, _token_inputs(64, 8, seed=seed)


def gemma_gqa(seed=0):
    """Gemma decoder with grouped-query attention (4 query heads on 2
    key/value heads) and an MLP 4× the hidden width (two gates of 128)."""
    return gemma(seed, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
                 intermediate_dim=256)


def llama(seed=0, tie_word_embeddings=False):
    """Llama decoder. Inputs token_ids/padding_mask int32 (2, 8), sequence
    dim variable."""
    _seed(seed)
    model = keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        tie_word_embeddings=tie_word_embeddings,
    )
    return model, _token_inputs(64, 8, seed=seed)


def gemma_causal_lm(seed=0):
    """GemmaCausalLM (no preprocessor) wrapping the tiny Gemma backbone.
    Its functional graph calls the backbone once and the tied
    ReversibleEmbedding a second time (reverse=True) to produce logits
    (2, 8, 64)."""
    backbone, inputs = gemma(seed)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return model, inputs


def llama_causal_lm(seed=0):
    """LlamaCausalLM (no preprocessor), untied embeddings by default; the
    ReversibleEmbedding is still called twice (forward + reverse)."""
    backbone, inputs = llama(seed)
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    return model, inputs


FACTORIES = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "resnet_v2": resnet_v2,
    "resnet_v2_bottleneck": resnet_v2_bottleneck,
    "resnet_vd": resnet_vd,
    "mobilenet": mobilenet,
    "efficientnet": efficientnet,
    "efficientnet_v1": efficientnet_v1,
    "densenet": densenet,
    "vgg": vgg,
    "xception": xception,
    "cspnet": cspnet,
    "cspnet_cs3": cspnet_cs3,
    "vit": vit,
    "vit_wide": vit_wide,
    "deit": deit,
    "deit_wide": deit_wide,
    "bert": bert,
    "gemma": gemma,
    "gemma_gqa": gemma_gqa,
    "llama": llama,
    "gemma_causal_lm": gemma_causal_lm,
    "llama_causal_lm": llama_causal_lm,
}
