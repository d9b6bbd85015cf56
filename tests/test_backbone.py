"""Backbones: Swin parity with transformers' SwinBackbone (and timm), ResNet parity with timm and a
detectron2-style reference, and the hub / detectron2 / timm weight converters."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maskformers.models.backbone import (
    ResNetBackbone,
    SwinBackbone,
    build_backbone,
    resnet_backbone,
    shifted_window_mask,
    swin_backbone,
    swin_tiny,
    timm_backbone_state_dict,
)
from weights_convert import ConversionError, apply_rules
from weights_convert import d2_backbone, hf_swin
from weights_convert.hf_config import backbone_spec_from_hf_config

transformers = pytest.importorskip("transformers")
ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def max_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter and batch-norm statistic away from its init so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    stats = [(n, b) for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))]
    for name, tensor in [*module.named_parameters(), *stats]:
        noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        else:
            tensor.add_(0.1 * noise)


def hf_swin_backbone(*, embed_dim, depths, num_heads, window_size, seed=0):
    config = transformers.SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                                     window_size=window_size, out_features=ALL_STAGES, drop_path_rate=0.0)
    model = transformers.SwinBackbone(config).eval()
    perturb_(model, seed)
    return model


def ours_from_hf(hf_model, state_dict=None) -> SwinBackbone:
    model = backbone_from_hf_config(hf_model.config.to_dict()).eval()
    converted = apply_rules(state_dict if state_dict is not None else hf_model.state_dict(), hf_swin.rules())
    model.load_state_dict(converted, strict=True)
    return model


TINY_W7 = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
TINY_W12 = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=12)
ODD_DEPTHS = dict(embed_dim=24, depths=(1, 3, 2, 3), num_heads=(1, 2, 4, 8), window_size=7)


@pytest.mark.parametrize("dims", [TINY_W7, TINY_W12, ODD_DEPTHS], ids=["w7", "w12", "odd_depths"])
@pytest.mark.parametrize("shape", [(1, 389, 517), (2, 65, 97), (2, 64, 64)], ids=str)
def test_swin_matches_transformers_float64(dims, shape):
    """Odd sizes need padding at every stage; at 64x64 the 1/16 and 1/32 maps (4x4, 2x2) are smaller
    than the window, which must still be 7 or 12 with the shift kept."""
    hf = hf_swin_backbone(**dims).double()
    ours = ours_from_hf(hf).double()
    batch, height, width = shape
    x = torch.randn(batch, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).feature_maps
        out = ours(x)
    assert len(out) == 4 and ours.strides == (4, 8, 16, 32)
    assert ours.channels == tuple(dims["embed_dim"] * 2**i for i in range(4))
    for r, o, c in zip(ref, out, ours.channels):
        assert o.shape == r.shape and o.shape[1] == c
        assert max_rel(r, o) < 1e-12


def test_swin_tiny_dims_match_transformers_float64():
    dims = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    hf = hf_swin_backbone(**dims).double()
    ours = ours_from_hf(hf).double()
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in hf.named_parameters() if not n.startswith("swin.layernorm"))
    x = torch.randn(1, 3, 100, 132, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for r, o in zip(hf(x).feature_maps, ours(x)):
            assert max_rel(r, o) < 1e-12


@pytest.mark.parametrize("dims", [TINY_W7, TINY_W12], ids=["w7", "w12"])
def test_swin_float32_error_is_that_of_transformers(dims):
    hf = hf_swin_backbone(**dims)
    hf.set_attn_implementation("eager")
    ours = ours_from_hf(hf)
    x = torch.randn(2, 3, 131, 203, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref64 = [t.float() for t in ours_from_hf(hf).double()(x.double())]
        hf32, ours32 = hf(x).feature_maps, ours(x)
    for r, h, o in zip(ref64, hf32, ours32):
        assert (o - h).abs().max().item() < 3e-5  # features are LayerNorm outputs (|x| up to ~4)
        assert max_rel(r, o) <= 4 * max_rel(r, h) + 1e-7


def test_swin_unfused_attention_and_grad_checkpointing_agree():
    hf = hf_swin_backbone(**TINY_W7)
    ours = ours_from_hf(hf).double()
    unfused = swin_backbone(**TINY_W7, fused_attn=False).double().eval()
    unfused.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 77, 90, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(ours(x), unfused(x)):
            assert max_rel(a, b) < 1e-12
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.set_grad_checkpointing(ckpt)
        sum(f.square().mean() for f in ours(x)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert grads[0].abs().max() > 0 and max_rel(grads[0], grads[1]) < 1e-12


def test_swin_from_save_pretrained_folder(tmp_path):
    hf = hf_swin_backbone(**TINY_W12, seed=5)
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    # transformers 5 writes the 4.x names back (plus its unused final layernorm under swin.)
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in saved
    assert not any("q_proj" in k for k in saved)
    # 4.x hub files also carry the relative_position_index buffers
    index = torch.zeros(144, 144, dtype=torch.long)
    saved.update({f"encoder.layers.{s}.blocks.{b}.attention.self.relative_position_index": index
                  for s in range(4) for b in range(2)})
    ours = ours_from_hf(hf, saved).double()
    x = torch.randn(2, 3, 65, 97, dtype=torch.float64)
    with torch.no_grad():
        for r, o in zip(hf.double()(x).feature_maps, ours(x)):
            assert max_rel(r, o) < 1e-12


def test_hf_swin_rules_prefixes_and_strictness():
    hf = hf_swin_backbone(**TINY_W7)
    prefixed = {"model.pixel_level_module.encoder." + k: v for k, v in hf.state_dict().items()}
    out = apply_rules(prefixed, hf_swin.rules("model.pixel_level_module.encoder.", "backbone."))
    expected = {"backbone." + k for k in swin_backbone(**TINY_W7).state_dict()}
    assert set(out) == expected
    assert torch.equal(out["backbone.layers.1.downsample.reduction.weight"],
                       hf.state_dict()["swin.encoder.layers.0.downsample.reduction.weight"])
    qkv = out["backbone.layers.2.blocks.1.attn.qkv.weight"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        part = hf.state_dict()[f"swin.encoder.layers.2.blocks.1.attention.{name}.weight"]
        assert torch.equal(qkv[i * 64:(i + 1) * 64], part)  # stage 2 is 64 wide

    stray = dict(hf.state_dict(), **{"swin.embeddings.position_embeddings": torch.zeros(1, 4, 16)})
    with pytest.raises(ConversionError, match="position_embeddings"):
        apply_rules(stray, hf_swin.rules())
    missing_v = {k: v for k, v in hf.state_dict().items() if "layers.0.blocks.0.attention.v_proj" not in k}
    with pytest.raises(ConversionError, match="missing parts"):
        apply_rules(missing_v, hf_swin.rules())


def test_timm_swin_checkpoint_layout_loads_and_matches():
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, always_partition=True).eval()
    perturb_(reference, 7)
    ours = swin_tiny().eval()
    perturb_(ours.norms, 8)  # timm has no per-stage norms: they keep the model's own values
    norms = {k: v.clone() for k, v in ours.norms.state_dict().items()}
    ours.load_state_dict(timm_backbone_state_dict(reference.state_dict(), ours), strict=True)
    assert all(torch.equal(v, ours.norms.state_dict()[k]) for k, v in norms.items())
    reference.double(), ours.double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        out = ours(x)
        y = reference.patch_embed(x)
        for stage, norm, o in zip(reference.layers, ours.norms, out):
            y = stage(y)  # timm's own block forward is exact at sizes that are window multiples
            assert max_rel(norm(y).permute(0, 3, 1, 2), o) < 1e-12


def d2_swin_state_dict(hf_state: dict) -> dict:
    """The original D2SwinTransformer layout, written from a transformers one with the table of the
    transformers conversion script read backwards."""
    d2 = {}
    for key, value in hf_state.items():
        key = key.removeprefix("swin.")
        if key.startswith("layernorm."):
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
        if m:
            s, b, rest = m.groups()
            pre = f"backbone.layers.{s}.blocks.{b}."
            if rest.startswith("attention.q_proj."):
                leaf = rest.rsplit(".", 1)[1]
                d2[pre + "attn.qkv." + leaf] = torch.cat([
                    hf_state[f"swin.encoder.layers.{s}.blocks.{b}.attention.{n}_proj.{leaf}"] for n in "qkv"])
                continue
            if rest.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            for old, new in [("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             ("attention.o_proj", "attn.proj"), ("attention.relative_position_bias.", "attn.")]:
                rest = rest.replace(old, new)
            d2[pre + rest] = value
            if rest == "attn.relative_position_bias_table":
                n = ((value.shape[0] ** 0.5 + 1) / 2) ** 2
                d2[pre + "attn.relative_position_index"] = torch.zeros(int(n), int(n), dtype=torch.long)
            continue
        m = re.fullmatch(r"hidden_states_norms\.stage(\d)\.(\w+)", key)
        if m:
            d2[f"backbone.norm{int(m[1]) - 1}.{m[2]}"] = value
            continue
        key = key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = key.replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
        d2["backbone." + key] = value
    return d2


def test_d2_swin_converts_detects_and_matches():
    hf = hf_swin_backbone(**ODD_DEPTHS, seed=11)
    d2 = d2_swin_state_dict(hf.state_dict())
    assert "backbone.layers.0.downsample.reduction.weight" in d2 and "backbone.norm3.weight" in d2
    kind, kwargs = d2_backbone.detect_d2_backbone(d2)
    assert kind == "swin"
    assert kwargs == dict(embed_dim=24, depths=[1, 3, 2, 3], num_heads=[1, 2, 4, 8], window_size=7,
                          mlp_ratio=4.0, qkv_bias=True)
    ours = swin_backbone(**kwargs).eval()
    ours.load_state_dict(apply_rules(d2, d2_backbone.swin_rules()), strict=True)
    ours.double(), hf.double()
    x = torch.randn(2, 3, 129, 161, dtype=torch.float64)
    with torch.no_grad():
        for r, o in zip(hf(x).feature_maps, ours(x)):
            assert max_rel(r, o) < 1e-12

    with pytest.raises(ConversionError, match="absolute_pos_embed"):
        apply_rules(dict(d2, **{"backbone.absolute_pos_embed": torch.zeros(1)}), d2_backbone.swin_rules())
    with pytest.raises(ConversionError, match="ape"):
        d2_backbone.detect_d2_backbone(dict(d2, **{"backbone.absolute_pos_embed": torch.zeros(1)}))


def test_resnet_matches_timm_and_loads_its_checkpoint():
    reference = timm.create_model("resnet50", pretrained=False).eval()
    perturb_(reference, 3)
    ours = resnet_backbone(50).eval()
    ours.load_state_dict(timm_backbone_state_dict(reference.state_dict(), ours), strict=True)
    reference.double(), ours.double()
    x = torch.randn(2, 3, 67, 83, dtype=torch.float64)
    with torch.no_grad():
        ref = reference.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        out = ours(x)
    assert ours.channels == (256, 512, 1024, 2048) and ours.strides == (4, 8, 16, 32)
    for r, o, c in zip(ref, out, ours.channels):
        assert o.shape == r.shape and o.shape[1] == c
        assert max_rel(r, o) < 1e-12


def d2_resnet_state_dict(timm_state: dict) -> dict:
    """detectron2 names, as its convert-torchvision-to-d2 tool writes them, under ``backbone.``."""
    d2 = {}
    for key, value in timm_state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
        if m is None:
            key = "stem." + key.replace("bn1.", "conv1.norm.")
        else:
            rest = re.sub(r"bn(\d)\.", r"conv\1.norm.", m[3])
            rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
            key = f"res{int(m[1]) + 1}.{m[2]}.{rest}"
        d2["backbone." + key] = value
    return d2


def d2_resnet_reference(sd: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """detectron2 ResNet forward (basic stem, FrozenBN, STRIDE_IN_1X1=False) written from its description."""
    def conv_norm(x, name, stride=1, padding=0):
        x = F.conv2d(x, sd[f"backbone.{name}.weight"], stride=stride, padding=padding)
        scale = sd[f"backbone.{name}.norm.weight"] * (sd[f"backbone.{name}.norm.running_var"] + 1e-5).rsqrt()
        shift = sd[f"backbone.{name}.norm.bias"] - sd[f"backbone.{name}.norm.running_mean"] * scale
        return x * scale[:, None, None] + shift[:, None, None]

    x = F.max_pool2d(F.relu(conv_norm(x, "stem.conv1", stride=2, padding=3)), 3, stride=2, padding=1)
    outs = []
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 2 else 1
            name = f"res{stage}.{b}"
            y = F.relu(conv_norm(x, f"{name}.conv1"))
            y = F.relu(conv_norm(y, f"{name}.conv2", stride=stride, padding=1))
            y = conv_norm(y, f"{name}.conv3")
            short = conv_norm(x, f"{name}.shortcut", stride=stride) if b == 0 else x
            x = F.relu(y + short)
        outs.append(x)
    return outs


def test_d2_resnet_converts_detects_and_matches():
    source = resnet_backbone(50, frozen_bn=False)
    perturb_(source, 4)
    d2 = d2_resnet_state_dict(source.state_dict())
    assert "backbone.res2.0.shortcut.norm.running_mean" in d2 and "backbone.stem.conv1.norm.weight" in d2
    assert d2_backbone.detect_d2_backbone(d2) == ("resnet", {"depth": 50})
    ours = resnet_backbone(50).eval()
    with_counter = dict(d2, **{"backbone.res3.0.conv2.norm.num_batches_tracked": torch.tensor(7)})
    ours.load_state_dict(apply_rules(with_counter, d2_backbone.resnet_rules()), strict=True)
    d2 = {k: v.double() for k, v in d2.items()}
    x = torch.randn(1, 3, 70, 99, dtype=torch.float64)
    with torch.no_grad():
        for r, o in zip(d2_resnet_reference(d2, x), ours.double()(x)):
            assert o.shape == r.shape and max_rel(r, o) < 1e-12

    with torch.device("meta"):  # only the key names and shapes matter here
        deep = d2_resnet_state_dict(resnet_backbone(101).state_dict())
    assert d2_backbone.detect_d2_backbone(deep) == ("resnet", {"depth": 101})
    with pytest.raises(ConversionError, match="conv1.bias"):
        apply_rules(dict(d2, **{"backbone.res2.0.conv1.bias": torch.zeros(64)}), d2_backbone.resnet_rules())
    with pytest.raises(ConversionError, match="no Swin, ResNet, ConvNeXt or DiNAT"):
        d2_backbone.detect_d2_backbone({"backbone.stages.0.weight": torch.zeros(1)})


def test_shifted_window_mask_regions():
    mask = shifted_window_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49) and set(mask.unique().tolist()) == {-100.0, 0.0}
    rows, cols = torch.arange(49) // 7, torch.arange(49) % 7
    # windows in row-major order; in the rolled map the last 3 rows / columns wrapped around from the start
    for window, (by_row, by_col) in enumerate([(False, False), (False, True), (True, False), (True, True)]):
        region = (rows >= 4) * by_row * 2 + (cols >= 4) * by_col
        assert torch.equal(mask[window] == 0, region[:, None] == region[None, :])
    with pytest.raises(ValueError, match="multiples of window=7"):
        shifted_window_mask(15, 14, 7, 3)


def backbone_from_hf_config(config):
    return build_backbone(backbone_spec_from_hf_config(config))


def test_hf_config_builder():
    swin = backbone_from_hf_config(transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 3, 1], num_heads=[1, 2, 4, 8], window_size=12, out_features=ALL_STAGES
    ).to_dict())
    assert isinstance(swin, SwinBackbone) and swin.channels == (32, 64, 128, 256) and swin.window_size == 12
    assert len(swin.layers[2].blocks) == 3 and swin.layers[3].blocks[0].attn.num_heads == 8
    resnet = backbone_from_hf_config(transformers.ResNetConfig(out_features=ALL_STAGES).to_dict())
    assert isinstance(resnet, ResNetBackbone) and len(resnet.layer3) == 6

    base = transformers.SwinConfig(out_features=ALL_STAGES).to_dict()
    for change, match in [({"model_type": "vit"}, "model_type='vit'"),
                          ({"use_absolute_embeddings": True}, "use_absolute_embeddings"),
                          ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
                          ({"out_features": ["stage2", "stage3", "stage4"]}, "out_features")]:
        with pytest.raises(ConversionError, match=match):
            backbone_from_hf_config(dict(base, **change))
    with pytest.raises(ConversionError, match="depths"):
        backbone_from_hf_config(transformers.ResNetConfig(depths=[2, 2, 2, 2], out_features=ALL_STAGES).to_dict())
    with pytest.raises(ConversionError, match="expected a dict"):
        backbone_from_hf_config("swin")
    with pytest.raises(ConversionError, match=r"window_size='seven' must be a int"):
        backbone_from_hf_config(dict(base, window_size="seven"))


@pytest.mark.parametrize("make", [lambda: swin_backbone(**TINY_W7), lambda: resnet_backbone(50)],
                         ids=["swin", "resnet"])
def test_bad_inputs(make):
    model = make()
    with pytest.raises(ValueError, match=r"pixel_values \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
        model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_variants():
    with pytest.raises(ValueError, match="depth=34"):
        resnet_backbone(34)
    with pytest.raises(ValueError, match="num_heads"):
        swin_backbone(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12), window_size=7)
    with pytest.raises(ValueError, match="divisible"):
        swin_backbone(embed_dim=20, depths=(2,), num_heads=(3,), window_size=7)
