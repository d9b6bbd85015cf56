"""Initialisation as in the original Mask2Former repository, for training from scratch.

Parity tests load weights and cannot see initialisation; training can. ``build_mask2former`` already
initialises most modules like the original (Deformable-DETR offset grid and zero attention weights,
Xavier attention and decoder FFN, c2-Xavier FPN and mask-feature convolutions, N(0, 1) query and level
embeddings, trunc-normal Swin linears). Two differences remain in the model code, fixed here:

- the pixel decoder's input projections (1x1 conv before GroupNorm): the original uses
  ``xavier_uniform_(gain=1)`` and a zero bias (the model uses c2-Xavier = Kaiming-uniform a=1);
- the deformable encoder's FFN (``linear1``/``linear2``): the original's encoder runs
  ``xavier_uniform_`` over every matrix before resetting MSDeformAttn, so these get Xavier weights
  (biases keep PyTorch's default), where the model leaves PyTorch's Linear default.

The transformer decoder's input projections (present when ``in_channels != hidden_dim``) use c2-Xavier
in the original; they are covered too. :func:`initialize_like_original` returns the model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["initialize_like_original", "c2_xavier_fill"]


@torch.no_grad()
def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2/fvcore's ``c2_xavier_fill``: Kaiming-uniform with a=1 (Caffe2's Xavier), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@torch.no_grad()
def initialize_like_original(model: nn.Module) -> nn.Module:
    """Re-initialise the modules whose default init differs from the original Mask2Former (see above)."""
    pixel_decoder = getattr(model, "pixel_decoder", None)
    if pixel_decoder is not None:
        for proj in pixel_decoder.input_projs:
            conv = proj[0]
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        for layer in pixel_decoder.encoder.layers:
            nn.init.xavier_uniform_(layer.linear1.weight)
            nn.init.xavier_uniform_(layer.linear2.weight)
    decoder = getattr(model, "transformer_decoder", None)
    if decoder is not None:
        for proj in decoder.input_projs:
            if isinstance(proj, nn.Conv2d):
                c2_xavier_fill(proj)
    return model
