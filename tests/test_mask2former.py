"""Mask2Former modules against transformers' submodules fed the same features, and the model's API."""

from __future__ import annotations

import pytest
import torch

from maskformers.ops import set_backend

from mask2former_helpers import F64, assert_float32_noise, perturb_, tiny_hf_config
from maskformers.layers import prediction_heads
from maskformers.models.mask2former import (
    Mask2FormerConfig,
    Mask2FormerOutput,
    build_mask2former,
    mask2former_config,
)
from maskformers.models.pixel_decoder import MSDeformAttnPixelDecoder
from maskformers.models.transformer_decoder import MultiScaleMaskedTransformerDecoder
from weights_convert.hf_mask2former import pixel_decoder_rules, query_rules, transformer_decoder_rules
from weights_convert.rules import apply_rules

hfm = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

CHANNELS, STRIDES = [16, 32, 64, 128], [4, 8, 16, 32]


def features(batch=2, height=97, width=129, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, -(-height // s), -(-width // s), generator=g, dtype=dtype)
        for c, s in zip(CHANNELS, STRIDES)
    ]


def pixel_decoder_pair(cfg=None, seed=0):
    cfg = cfg or tiny_hf_config()
    hf = hfm.Mask2FormerPixelDecoder(cfg, feature_channels=CHANNELS)
    with torch.no_grad():  # built outside a PreTrainedModel, its level_embed is uninitialised memory
        hf.level_embed.normal_(generator=torch.Generator().manual_seed(seed))
    hf = perturb_(hf, seed=seed, scale=0.1).eval()
    ours = MSDeformAttnPixelDecoder(
        in_channels=CHANNELS, in_strides=STRIDES, conv_dim=cfg.feature_size, mask_dim=cfg.mask_feature_size,
        num_heads=cfg.num_attention_heads, num_layers=cfg.encoder_layers, ffn_dim=cfg.encoder_feedforward_dim,
    )
    ours = set_backend(ours, "reference").eval()
    ours.load_state_dict(apply_rules(hf.state_dict(), pixel_decoder_rules("", "")))
    return hf, ours


def transformer_decoder_pair(cfg=None, seed=1):
    cfg = cfg or tiny_hf_config()
    hf = perturb_(hfm.Mask2FormerTransformerModule(in_features=cfg.feature_size, config=cfg), seed=seed, scale=0.1)
    cls = perturb_(torch.nn.Linear(cfg.hidden_dim, cfg.num_labels + 1), seed=seed + 1)
    state = {**hf.state_dict(), **{f"class_predictor.{k}": v for k, v in cls.state_dict().items()}}
    ours = MultiScaleMaskedTransformerDecoder(
        in_channels=cfg.feature_size, hidden_dim=cfg.hidden_dim, num_classes=cfg.num_labels,
        num_heads=cfg.num_attention_heads, num_layers=cfg.decoder_layers - 1,
        ffn_dim=cfg.dim_feedforward, mask_dim=cfg.mask_feature_size, pre_norm=cfg.pre_norm,
        enforce_input_projection=cfg.enforce_input_projection,
    ).eval()
    ours.queries = torch.nn.Embedding(cfg.num_queries, cfg.hidden_dim)  # content, as Mask2Former owns them
    ours.queries_pos = torch.nn.Embedding(cfg.num_queries, cfg.hidden_dim)
    rules = transformer_decoder_rules("", "") + query_rules("", "")
    converted = apply_rules(state, rules)
    ours.queries.weight.data.copy_(converted.pop("query_feat.weight"))
    ours.queries_pos.weight.data.copy_(converted.pop("query_embed.weight"))
    ours.load_state_dict(converted, strict=False)
    assert set(ours.state_dict()) - set(converted) == {"queries.weight", "queries_pos.weight"}
    return hf.eval(), cls, ours


def our_decoder_predictions(ours, multi_scale, mask_features):
    """The decoder driven with Mask2Former's learned queries (content expanded over the batch, shared position)."""
    queries = ours.queries.weight[None].expand(mask_features.shape[0], -1, -1)
    return ours(multi_scale, mask_features, queries, ours.queries_pos.weight[None]).predictions


def decoder_inputs(dtype=torch.float64, seed=0, positive_masks=False):
    """Three maps (1/32, 1/16, 1/8 of a 97x129 image) and 1/4 mask features, hidden_dim=64 channels."""
    g = torch.Generator().manual_seed(seed)
    ms = [torch.randn(2, 64, h, w, generator=g, dtype=dtype) for h, w in ((4, 5), (7, 9), (13, 17))]
    mf = torch.randn(2, 64, 25, 33, generator=g, dtype=dtype)
    return ms, (mf.abs() + 0.1 if positive_masks else mf)


def hf_decoder_predictions(hf, cls, multi_scale, mask_features):
    out = hf(list(multi_scale), mask_features, output_hidden_states=True)
    return [(cls(h.transpose(0, 1)), m) for h, m in zip(out.intermediate_hidden_states, out.masks_queries_logits)]


# ------------------------------------------------------------------------------------------------
# module-level parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(97, 129), (64, 64)])
def test_pixel_decoder_matches_transformers_float64(size):
    hf, ours = pixel_decoder_pair()
    hf.double(), ours.double()
    feats = features(height=size[0], width=size[1])
    with torch.no_grad():
        expected = hf(feats)
        got = ours(feats)
    torch.testing.assert_close(got.mask_features, expected.mask_features, **F64)
    assert len(got.multi_scale_features) == 3
    for g, e in zip(got.multi_scale_features, expected.multi_scale_features):
        torch.testing.assert_close(g, e, **F64)
    assert got.mask_features.shape[-2:] == feats[0].shape[-2:]


def test_pixel_decoder_matches_transformers_float32():
    hf, ours = pixel_decoder_pair()
    feats = features(dtype=torch.float32)
    with torch.no_grad():
        expected, got = hf(feats), ours(feats)
    torch.testing.assert_close(got.mask_features, expected.mask_features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_decoder_matches_transformers_float64(pre_norm):
    hf, cls, ours = transformer_decoder_pair(tiny_hf_config(pre_norm=pre_norm))
    hf.double(), cls.double(), ours.double()
    ms, mask_features = decoder_inputs()
    with torch.no_grad():
        expected = hf_decoder_predictions(hf, cls, ms, mask_features)
        got = our_decoder_predictions(ours, ms, mask_features)
    assert len(got) == len(expected) == 5
    for (gc, gm), (ec, em) in zip(got, expected):
        torch.testing.assert_close(gc, ec, **F64)
        torch.testing.assert_close(gm, em, **F64)
    assert 0.05 < torch.stack([(m < 0).double().mean() for _, m in got]).mean() < 0.95  # masks do mask


def test_transformer_decoder_with_input_projection_float32():
    cfg = tiny_hf_config(enforce_input_projection=True)
    hf, cls, ours = transformer_decoder_pair(cfg)
    assert isinstance(ours.input_projs[0], torch.nn.Conv2d)
    ms, mask_features = decoder_inputs(torch.float32)
    with torch.no_grad():
        expected = hf_decoder_predictions(hf, cls, ms, mask_features)
        got = our_decoder_predictions(ours, ms, mask_features)
    assert_float32_noise(expected, got)


def test_transformer_decoder_all_masked_rows_match_transformers(monkeypatch):
    """Positive mask features and a very negative mask-embedding bias make every mask empty, so every
    row of every attention mask goes through the reset; both libraries must still agree (and stay finite)."""
    hf, cls, ours = transformer_decoder_pair()
    hf.double(), cls.double(), ours.double()
    with torch.no_grad():
        hf.decoder.mask_predictor.mask_embedder.get_submodule("2.0").bias.fill_(-50.0)
        ours.head.mask_embed.layers[2].bias.fill_(-50.0)
    resets = []
    real = prediction_heads.masked_attention_mask

    def counting(mask_logits, size):
        m = real(mask_logits, size)
        resets.append(m.all(-1).float().mean().item())
        return m

    monkeypatch.setattr("maskformers.models.transformer_decoder.masked_attention_mask", counting)
    ms, mask_features = decoder_inputs(positive_masks=True)
    with torch.no_grad():
        expected = hf_decoder_predictions(hf, cls, ms, mask_features)
        got = our_decoder_predictions(ours, ms, mask_features)
    assert resets and resets[0] == 1.0  # at least the first layer saw only empty masks
    for (gc, gm), (ec, em) in zip(got, expected):
        assert torch.isfinite(gc).all()
        torch.testing.assert_close(gc, ec, **F64)
        torch.testing.assert_close(gm, em, **F64)


# ------------------------------------------------------------------------------------------------
# any backbone: channels and strides as plain arguments
# ------------------------------------------------------------------------------------------------


class ToyBackbone(torch.nn.Module):
    """Three maps at strides 8, 16, 32 (no stride-4 map), like a truncated ResNet."""

    channels, strides = (24, 40, 56), (8, 16, 32)

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(3, c, s, stride=s) for c, s in zip(self.channels, self.strides)
        )

    def forward(self, x):
        return [conv(x) for conv in self.convs]


def test_pixel_decoder_without_fpn_levels_on_a_custom_backbone():
    cfg = Mask2FormerConfig(num_classes=3, num_queries=5, hidden_dim=32, conv_dim=32, mask_dim=16, num_heads=2,
                            encoder_layers=1, encoder_ffn_dim=16, decoder_layers=3, decoder_ffn_dim=16, common_stride=8)
    model = set_backend(build_mask2former(cfg, backbone=ToyBackbone()), "reference").eval()
    assert len(model.pixel_decoder.lateral_convs) == 0 and model.pixel_decoder.mask_stride == 8
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.class_logits.shape == (2, 5, 4)
    assert out.mask_logits.shape == (2, 5, 8, 12)
    assert len(out.aux_outputs) == 3


def test_pixel_decoder_two_fpn_levels():
    dec = MSDeformAttnPixelDecoder(in_channels=(8, 16, 32, 64, 128), in_strides=(2, 4, 8, 16, 32), conv_dim=32,
                                   mask_dim=8, num_heads=2, num_layers=1, ffn_dim=16, common_stride=2)
    set_backend(dec, "reference")
    assert dec.fpn_indices == [0, 1] and dec.mask_stride == 2
    feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip((8, 16, 32, 64, 128), (2, 4, 8, 16, 32))]
    out = dec(feats)
    assert out.mask_features.shape == (1, 8, 32, 32)
    assert [tuple(f.shape[-2:]) for f in out.multi_scale_features] == [(2, 2), (4, 4), (8, 8)]


def test_pixel_decoder_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="strictly increasing"):
        MSDeformAttnPixelDecoder(in_channels=(8, 16), in_strides=(8, 4), conv_dim=32, num_levels=2)
    with pytest.raises(ValueError, match="one entry per feature"):
        MSDeformAttnPixelDecoder(in_channels=(8, 16), in_strides=(4, 8, 16), conv_dim=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        MSDeformAttnPixelDecoder(in_channels=CHANNELS, in_strides=STRIDES, conv_dim=48)
    _, ours = pixel_decoder_pair()
    feats = features(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expected 4 features"):
        ours(feats[1:])
    feats[2] = feats[2][:, :5]
    with pytest.raises(ValueError, match=r"expected features\[2\] \(B, 64, H, W\) at stride 16, got \(2, 5, 7, 9\)"):
        ours(feats)


def test_transformer_decoder_bad_inputs():
    _, _, ours = transformer_decoder_pair()
    ms, mf = [torch.randn(2, 64, 4, 4)] * 3, torch.randn(2, 64, 16, 16)
    q, pos = torch.randn(2, 10, 64), torch.randn(1, 10, 64)
    with pytest.raises(ValueError, match="expected 3 multi-scale features"):
        ours(ms[:2], mf, q, pos)
    with pytest.raises(ValueError, match=r"multi_scale_features\[1\] \(B=2"):
        ours([ms[0], torch.randn(1, 64, 4, 4), ms[2]], mf, q, pos)
    with pytest.raises(ValueError, match=r"expected queries \(B=2, Q, 64\), got \(1, 10, 64\)"):
        ours(ms, mf, q[:1], pos)
    with pytest.raises(ValueError, match=r"expected query_pos \(B=2 or 1, Q=10, 64\), got \(1, 9, 64\)"):
        ours(ms, mf, q, pos[:, :9])
    out = ours(ms, mf, q, pos)  # any number of queries from the caller
    assert out.hidden_states.shape == (2, 10, 64) and len(out.predictions) == len(ours.layers) + 1


# ------------------------------------------------------------------------------------------------
# model API and builders
# ------------------------------------------------------------------------------------------------


def tiny_model():
    cfg = Mask2FormerConfig(
        backbone={"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 7},
        num_classes=4, num_queries=6, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, encoder_layers=1,
        encoder_ffn_dim=16, decoder_layers=3, decoder_ffn_dim=24,
    )
    return set_backend(build_mask2former(cfg, id2label={0: "a", 1: "b", 2: "c", 3: "d"}), "reference").eval()


def test_forward_output_fields_and_shapes():
    model = tiny_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 70, 90), pixel_mask=torch.ones(2, 70, 90, dtype=torch.long))
    assert isinstance(out, Mask2FormerOutput)
    names = [f.name for f in __import__("dataclasses").fields(out)]
    assert names == ["class_logits", "mask_logits", "aux_outputs", "hidden_states"]
    assert out.class_logits.shape == (2, 6, 5)
    assert out.hidden_states.shape == (2, 6, 32)
    # the heads applied to the returned hidden states give the final prediction
    torch.testing.assert_close(model.transformer_decoder.head.class_embed(
        model.transformer_decoder.head.norm(out.hidden_states)), out.class_logits, rtol=0, atol=0)
    assert out.mask_logits.shape == (2, 6, 18, 23)  # ceil(70/4), ceil(90/4)
    assert len(out.aux_outputs) == 3
    for aux in out.aux_outputs:
        assert set(aux) == {"class_logits", "mask_logits"}
        assert aux["mask_logits"].shape == out.mask_logits.shape
    assert model.num_classes == 4 and model.id2label[3] == "d"


def test_forward_backward_reaches_every_parameter():
    # perturbed: at initialisation the sampling offsets and attention weights ignore their queries, so
    # the pixel decoder's level embedding (added to the queries only) has no gradient yet
    model = perturb_(tiny_model(), scale=0.02).train()
    out = model(torch.randn(1, 3, 64, 64))
    loss = out.class_logits.square().mean() + out.mask_logits.square().mean()
    loss = loss + sum(a["mask_logits"].square().mean() + a["class_logits"].square().mean() for a in out.aux_outputs)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_forward_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"expected pixel_mask \(B, H, W\) = \(1, 64, 64\), got \(1, 64, 32\)"):
        model(torch.randn(1, 3, 64, 64), pixel_mask=torch.ones(1, 64, 32))


@pytest.mark.parametrize("backbone,dataset,queries,window,classes", [
    ("swin-tiny", "coco-panoptic", 100, 7, 133),
    ("swin-small", "coco-instance", 100, 7, 80),
    ("swin-base", "ade-semantic", 100, 12, 150),
    ("swin-large", "coco-panoptic", 200, 12, 133),
    ("swin-large", "ade-semantic", 100, 12, 150),
    ("swin-large", "cityscapes-instance", 200, 12, 8),
    ("swin-tiny", "cityscapes-semantic", 100, 7, 19),
])
def test_published_variant_configs(backbone, dataset, queries, window, classes):
    cfg = mask2former_config(backbone, dataset)
    assert (cfg.num_queries, cfg.backbone["window_size"], cfg.num_classes) == (queries, window, classes)
    assert cfg.decoder_layers == 9 and cfg.encoder_layers == 6 and cfg.hidden_dim == 256
    assert Mask2FormerConfig.from_dict(cfg.to_dict()) == cfg


def test_swin_tiny_builder_parameter_count():
    model = set_backend(build_mask2former(mask2former_config("swin-tiny", "coco-panoptic")), "reference")
    n = sum(p.numel() for p in model.parameters())
    assert 47_000_000 < n < 48_000_000  # the published Swin-T Mask2Former has 47.4M parameters


def test_config_and_builder_errors():
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        mask2former_config("swin-tiny", "coco")
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        mask2former_config("vit", "coco-panoptic")
    with pytest.raises(ValueError, match=r"unknown Mask2FormerConfig field\(s\) \['dropout'\]"):
        Mask2FormerConfig.from_dict({"dropout": 0.1})
    with pytest.raises(TypeError, match=r"must report \.channels"):
        build_mask2former(Mask2FormerConfig(), backbone=torch.nn.Identity())


# ------------------------------------------------------------------------------------------------
# export, meta device
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_torch_export_matches_eager(backend):
    """Level shapes come from the input's shape (Python ints), never from tensor data, so export traces."""
    model = set_backend(tiny_model(), backend)
    x = torch.randn(1, 3, 64, 96)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected, got = model(x), program.module()(x)
    torch.testing.assert_close(got.class_logits, expected.class_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mask_logits, expected.mask_logits, rtol=1e-6, atol=1e-6)
    assert len(got.aux_outputs) == len(expected.aux_outputs)


def test_build_and_forward_on_meta_device():
    with torch.device("meta"):
        model = tiny_model()
    assert all(p.device.type == "meta" for p in model.parameters())
    out = model(torch.empty(2, 3, 70, 90, device="meta"))
    assert out.mask_logits.device.type == "meta" and out.mask_logits.shape == (2, 6, 18, 23)
    from maskformers.models import materialize

    real_model = tiny_model()
    materialize(model, "cpu")  # deferred initialisation: real storage and recomputed buffers, then weights
    model.load_state_dict(real_model.state_dict())
    for name, buffer in real_model.named_buffers():  # the non-persistent ones too (Swin's position index)
        assert torch.equal(buffer, model.get_buffer(name)), name
    with torch.no_grad():
        real = model(torch.randn(1, 3, 70, 90))
    assert real.mask_logits.shape == (1, 6, 18, 23) and torch.isfinite(real.mask_logits).all()


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    """ONNX through torch.onnx.export(dynamo=True): the reference op (grid_sample is an ONNX operator) and
    timm's unfused window attention (the exporter mis-decomposes the strides of the fused one)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = set_backend(tiny_model(), "reference")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.randn(1, 3, 64, 96)
    torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    class_logits, mask_logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:2]
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(class_logits), expected.class_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(mask_logits), expected.mask_logits, rtol=1e-5, atol=1e-5)
