"""The datasets-on-disk writers (maskformers.training.synthetic_files) and a tiny model config."""

from __future__ import annotations

from maskformers.training.synthetic_files import (  # noqa: F401  (re-exported for the tests)
    COCO_IDS,
    SEMANTIC_CLASSES,
    write_coco_instances,
    write_coco_panoptic,
    write_id2label,
    write_semantic_folder,
)

TINY = {
    "backbone": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "num_classes": 8, "num_queries": 6, "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "num_heads": 2,
    "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32,
}
