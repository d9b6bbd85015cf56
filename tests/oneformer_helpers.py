"""Shared test data for OneFormer's tokenizer and processor: the real CLIP vocabulary (from open_clip's
packaged BPE file) and the class metadata of ADE20K, COCO panoptic and Cityscapes (tests/data/oneformer)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DATA = Path(__file__).parent / "data" / "oneformer"
DATASETS = ("ade20k", "coco", "cityscapes")


def class_info(dataset: str) -> dict[str, dict]:
    """label id (str) -> {"name", "isthing"}, as in shi-labs/oneformer_demo's ``{dataset}_panoptic.json``."""
    return json.loads((DATA / f"{dataset}_panoptic.json").read_text(encoding="utf-8"))


def write_clip_vocab(folder: Path) -> Path:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (the files of the OneFormer hub checkpoints) from the
    BPE merge list that open_clip ships, laid out as transformers' CLIP conversion does: 256 byte symbols,
    the same with ``</w>``, one token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode  # the reference table, not ours

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_bpe_file() -> Path:
    """open_clip's packaged CLIP merge list (``bpe_simple_vocab_16e6.txt.gz``), found without importing open_clip
    (its import takes seconds); skips the test when open_clip is not installed."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("open_clip (its packaged CLIP merge list) is not installed")
    return path


def clip_tokenizer_folder(folder: Path) -> Path:
    """A folder with the real CLIP ``vocab.json`` + ``merges.txt``, written by our tokenizer from open_clip's merge
    list (tests/test_processing_clip_tokenizer.py checks those files against :func:`write_clip_vocab`)."""
    from maskformers.processing.clip_tokenizer import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name, content in CLIPTokenizer.from_bpe_file(clip_bpe_file()).files().items():
        (folder / name).write_bytes(content)
    return folder


def write_tiny_oneformer_checkpoint(folder: Path, *, seed: int = 5) -> Path:
    """A small OneFormer in the hub's layout (transformers ``save_pretrained`` of a perturbed random-init model,
    CLIP's ``vocab.json`` + ``merges.txt``, a ``preprocessor_config.json`` with a 64-128 px resize): what a
    ``shi-labs/oneformer_*`` download holds, for offline tests of code that loads one."""
    import torch
    from mask2former_helpers import perturb_, swin_config
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    config = OneFormerConfig(
        backbone_config=swin_config(), hidden_dim=64, conv_dim=64, mask_dim=64, num_attention_heads=4,
        encoder_feedforward_dim=32, dim_feedforward=48, num_queries=10, num_labels=4, decoder_layers=3,
        encoder_layers=1, id2label={0: "cat", 1: "dog", 2: "sky", 3: "road"})
    torch.manual_seed(seed)
    perturb_(OneFormerForUniversalSegmentation(config), seed=seed, scale=0.5).eval().save_pretrained(folder)
    write_clip_vocab(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 64, "longest_edge": 128}, "num_text": 6,
        "image_processor_type": "OneFormerImageProcessor", "processor_class": "OneFormerProcessor"}))
    return folder
