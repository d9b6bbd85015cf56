"""End-to-end parity with transformers: random transformers models, ``save_pretrained``, our
``Mask2Former.from_pretrained``, same input; every prediction (final and auxiliary) compared."""

from __future__ import annotations

import pytest
import torch

from mask2former_helpers import (
    F64,
    assert_float32_noise,
    assert_masks_nontrivial,
    assert_predictions_close,
    hf_predictions,
    make_hf_model,
    no_native_toolchain,
    our_predictions,
    save_hf,
    swin_tiny_coco_panoptic_hf_config,
    tiny_hf_config,
)
from maskformers.models.mask2former import Mask2Former


def load_pair(tmp_path, config, seed=0, backend="reference"):
    hf = make_hf_model(config, seed=seed)
    ours = Mask2Former.from_pretrained(save_hf(hf, tmp_path / "ckpt"), op_backend=backend)
    return hf, ours


def check(hf, ours, x, *, float32=True):
    expected = hf_predictions(hf.double(), x.double())
    got = our_predictions(ours.double(), x.double())
    assert_masks_nontrivial(expected)
    assert_predictions_close(expected, got, **F64)
    if float32:
        expected = hf_predictions(hf.float(), x.float())
        got = our_predictions(ours.float(), x.float())
        assert_float32_noise(expected, got)


@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_tiny_config(tmp_path, size):
    hf, ours = load_pair(tmp_path, tiny_hf_config())
    check(hf, ours, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)))


def test_tiny_config_window12_odd_size(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_hf_config(window_size=12), seed=1)
    check(hf, ours, torch.randn(1, 3, 389, 517, generator=torch.Generator().manual_seed(1)))


def test_tiny_config_pre_norm_and_input_projection(tmp_path):
    cfg = tiny_hf_config(pre_norm=True, feature_size=32, hidden=64)  # conv_dim != hidden_dim: projections
    hf, ours = load_pair(tmp_path, cfg, seed=2)
    assert isinstance(ours.transformer_decoder.input_projs[0], torch.nn.Conv2d)
    check(hf, ours, torch.randn(2, 3, 80, 72, generator=torch.Generator().manual_seed(2)))


@pytest.fixture(scope="module")
def swin_tiny_checkpoint(tmp_path_factory):
    hf = make_hf_model(swin_tiny_coco_panoptic_hf_config())
    return hf, save_hf(hf, tmp_path_factory.mktemp("swin_tiny"))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_swin_tiny_coco_panoptic(swin_tiny_checkpoint, backend):
    """The full published architecture (Swin-T, 133 classes, 100 queries, 6 + 9 layers), batch 2, at a
    small size that is not a multiple of 32 (windows and patch merging pad)."""
    if backend == "native" and no_native_toolchain():
        pytest.skip(no_native_toolchain())
    hf, folder = swin_tiny_checkpoint
    ours = Mask2Former.from_pretrained(folder, op_backend=backend)
    assert ours.num_classes == 133 and ours.num_queries == 100
    check(hf, ours, torch.randn(2, 3, 100, 140, generator=torch.Generator().manual_seed(3)))


def test_native_backend(tmp_path):
    if no_native_toolchain():
        pytest.skip(no_native_toolchain())
    hf, ours = load_pair(tmp_path, tiny_hf_config(), backend="native")
    check(hf, ours, torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(5)))
