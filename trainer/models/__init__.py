"""Backbones, heads, text tower and the saved embedding model."""
from .backbones import Backbone, build_backbone, list_backbones, register_backbone
from .embedding import EmbeddingModel, ModelConfig, load_model, save_model
from .heads import (DINOHead, MaskedContextBlock, RowPredictor, WeightNormLinear, conv_bn_relu, conv_mlp,
                    linear_bn_relu, linear_layernorm_tanh, mlp_head, projection_mlp, relu_mlp)
from .text import TextConfig, bpe_vocab_path, build_tokenizer

__all__ = [
    "Backbone", "register_backbone", "EmbeddingModel", "ModelConfig", "TextConfig", "build_backbone", "build_tokenizer",
    "bpe_vocab_path", "list_backbones", "load_model", "save_model",
    # heads
    "DINOHead", "MaskedContextBlock", "RowPredictor", "WeightNormLinear", "conv_bn_relu", "conv_mlp", "linear_bn_relu",
    "linear_layernorm_tanh", "mlp_head", "projection_mlp", "relu_mlp",
]
