"""Initialisation distributions as in the original repositories (the models' own initialisation), and
fine-tuning with a new label set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskformers.models.mask2former import Mask2Former, Mask2FormerConfig, build_mask2former
from maskformers.training.finetune import replace_class_head

CFG = dict(
    backbone={"name": "swin", "embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7},
    num_classes=20, num_queries=100,
)


def _uniform(w: torch.Tensor, bound: float, what: str) -> None:
    """w ~ U(-bound, bound): inside the bound, reaching close to it, with the uniform's std."""
    w = w.detach().double().flatten()
    assert w.abs().max() <= bound * (1 + 1e-6), f"{what}: max {w.abs().max():.4g} > bound {bound:.4g}"
    assert w.abs().max() >= bound * 0.95, f"{what}: max {w.abs().max():.4g} far below bound {bound:.4g}"
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08), what


def _xavier(w: torch.Tensor, what: str, fan_in: int | None = None, fan_out: int | None = None) -> None:
    fan_out = fan_out if fan_out is not None else w.shape[0] * w[0][0].numel()
    fan_in = fan_in if fan_in is not None else w[0].numel()
    _uniform(w, math.sqrt(6 / (fan_in + fan_out)), what)


def _normal(w: torch.Tensor, std: float, what: str) -> None:
    w = w.detach().double().flatten()
    assert w.mean().item() == pytest.approx(0, abs=4 * std / math.sqrt(w.numel())), what
    assert w.std().item() == pytest.approx(std, rel=0.08), what


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mask2former(Mask2FormerConfig(**CFG))


def test_pixel_decoder_initialisation(model):
    pd = model.pixel_decoder
    for i, proj in enumerate(pd.input_projs):  # xavier_uniform(gain=1), zero bias
        _xavier(proj[0].weight, f"input_projs.{i}")
        assert not proj[0].bias.any()
        assert torch.equal(proj[1].weight, torch.ones(256)) and not proj[1].bias.any()  # GroupNorm default
    for name, conv in [("mask_features", pd.mask_features)] + [(f"lateral_convs.{i}", c[0]) for i, c in
                                                                enumerate(pd.lateral_convs)] + \
            [(f"output_convs.{i}", c[0]) for i, c in enumerate(pd.output_convs)]:  # c2_xavier_fill
        _uniform(conv.weight, math.sqrt(3 / conv.weight[0].numel()), name)
        assert conv.bias is None or not conv.bias.any()
    _normal(pd.level_embed, 1.0, "level_embed")
    for i, layer in enumerate(pd.encoder.layers):
        attn = layer.self_attn
        assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
        assert not attn.attention_weights.bias.any()
        grid = attn.sampling_offsets.bias.view(8, 3, 4, 2)  # head h, point k: (k+1) * direction_h on the unit square
        for h in range(8):
            theta = 2 * math.pi * h / 8
            d = torch.tensor([math.cos(theta), math.sin(theta)])
            d = d / d.abs().max()
            for k in range(4):
                torch.testing.assert_close(grid[h, :, k], (d * (k + 1)).expand(3, 2).float(), atol=1e-6, rtol=0)
        for proj in (attn.value_proj, attn.output_proj):
            _xavier(proj.weight, f"encoder {i} value/output proj")
            assert not proj.bias.any()
        _xavier(layer.linear1.weight, f"encoder {i} linear1")
        _xavier(layer.linear2.weight, f"encoder {i} linear2")
        _uniform(layer.linear1.bias, 1 / math.sqrt(256), "linear1 bias (PyTorch default)")


def test_transformer_decoder_initialisation(model):
    td = model.transformer_decoder
    for name, embedding in (("query_feat", model.query_feat), ("query_embed", model.query_embed),
                            ("level_embed", td.level_embed)):
        _normal(embedding.weight, 1.0, name)
    q_k_v = [torch.cat([layer.cross_attn.attn.q_proj.weight, layer.cross_attn.attn.k_proj.weight,
                        layer.cross_attn.attn.v_proj.weight]) for layer in td.layers]
    for i, layer in enumerate(td.layers):
        for block in (layer.cross_attn, layer.self_attn):
            packed = torch.cat([block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight])
            _xavier(packed, f"layer {i} in_proj (packed 3C x C)")
            _xavier(block.attn.out_proj.weight, f"layer {i} out_proj")
            for p in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj):
                assert not p.bias.any()
        _xavier(layer.ffn.linear1.weight, f"layer {i} ffn linear1")
        _xavier(layer.ffn.linear2.weight, f"layer {i} ffn linear2")
    assert len(q_k_v) == 9
    head = td.head
    _uniform(head.class_embed.weight, 1 / math.sqrt(256), "class_embed (PyTorch default)")
    for i, layer in enumerate(head.mask_embed.layers):
        _uniform(layer.weight, 1 / math.sqrt(256), f"mask_embed.{i} (PyTorch default)")


def test_decoder_input_projections_use_c2_xavier():
    torch.manual_seed(0)
    m = build_mask2former(Mask2FormerConfig(**dict(CFG, conv_dim=128)))
    for proj in m.transformer_decoder.input_projs:
        _uniform(proj.weight, math.sqrt(3 / 128), "decoder input_proj")
        assert not proj.bias.any()


def _hf_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from mask2former_helpers import make_hf_model, save_hf, tiny_hf_config

    return save_hf(make_hf_model(tiny_hf_config()), tmp_path / "hf")


@pytest.mark.parametrize("source", ["ours", "transformers"])
def test_finetune_replaces_only_the_class_head(tmp_path, source):
    if source == "ours":
        torch.manual_seed(0)
        labels = {i: f"c{i}" for i in range(20)}
        base = build_mask2former(Mask2FormerConfig(**dict(CFG, num_queries=10)), id2label=labels)
        base.save_pretrained(tmp_path / "ours")
        folder = tmp_path / "ours"
    else:
        folder = _hf_checkpoint(tmp_path)
    model = Mask2Former.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_labels = dict(model.id2label)
    new_labels = {0: "road", 1: old_labels.get(1, "x"), 2: "tree"}
    replace_class_head(model, new_labels, keep_matching=True)
    after = model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    assert changed == {"transformer_decoder.head.class_embed.weight", "transformer_decoder.head.class_embed.bias"}
    key = "transformer_decoder.head.class_embed.weight"
    w_old, w_new = before[key], after[key]
    assert w_new.shape[0] == 4 and torch.equal(w_new[1], w_old[1]) and torch.equal(w_new[-1], w_old[-1])
    assert model.num_classes == 3 and model.config.num_classes == 3 and model.id2label == new_labels
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert out.class_logits.shape[-1] == 4 and all(a["class_logits"].shape[-1] == 4 for a in out.aux_outputs)
    model.save_pretrained(tmp_path / "tuned")
    again = Mask2Former.from_pretrained(tmp_path / "tuned")
    assert again.id2label == new_labels
    torch.testing.assert_close(again(x).class_logits, model(x).class_logits)


def test_finetune_bad_label_sets():
    model = build_mask2former(Mask2FormerConfig(**dict(CFG, num_queries=4)))
    with pytest.raises(ValueError, match="contiguous ids"):
        replace_class_head(model, {1: "a", 2: "b"})
    with pytest.raises(ValueError, match="contiguous ids"):
        replace_class_head(model, {})
    assert isinstance(model.transformer_decoder.head.class_embed, nn.Linear)
