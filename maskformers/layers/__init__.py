"""Reusable layers: position encoding, deformable attention, attention blocks, MLP, prediction heads, the
CLIP-style text encoder."""

from .attention import MultiHeadAttention
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer, grid_reference_points
from .mlp import MLP
from .ms_deform_attn import MSDeformAttn
from .position_encoding import SinePositionEmbedding, sine_position_embedding
from .prediction_heads import MaskClassificationHead, masked_attention_mask
from .text_encoder import TextEncoder, TextEncoderLayer
from .transformer_blocks import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock

__all__ = [
    "CrossAttentionBlock",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "FeedForwardBlock",
    "MLP",
    "MSDeformAttn",
    "MaskClassificationHead",
    "MultiHeadAttention",
    "SelfAttentionBlock",
    "SinePositionEmbedding",
    "TextEncoder",
    "TextEncoderLayer",
    "grid_reference_points",
    "masked_attention_mask",
    "sine_position_embedding",
]
