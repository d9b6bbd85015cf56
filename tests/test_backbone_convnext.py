"""The ConvNeXt backbone: against a float64 reference of the original OneFormer ``D2ConvNeXt`` forward
(written here from its source, reading the original's parameter names), against timm's own ConvNeXt,
any input size, stochastic depth, layer scale, the detectron2 key rules and detection, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oneformer_d2_helpers import ours_to_original
from maskformers.models.backbone import build_backbone, timm_backbone_state_dict
from maskformers.models.convnext import ConvNeXtBackbone, convnext_backbone
from weights_convert import ConversionError, apply_rules
from weights_convert.d2_backbone import convnext_rules, detect_d2_backbone

SPEC = {"name": "convnext", "depths": [1, 2, 2, 1], "dims": [16, 24, 32, 40]}


def random_backbone(spec=SPEC, seed=0):
    torch.manual_seed(seed)
    model = build_backbone(spec).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # noise on every parameter: norms, biases and gammas are not at their init values
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def original_names(model):
    """The backbone's weights under the original D2ConvNeXt names."""
    state = ours_to_original({f"backbone.{k}": v for k, v in model.state_dict().items()})
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def _channels_first_norm(x, weight, bias, eps=1e-6):
    """The original's LayerNorm(data_format="channels_first"), written out: statistics over C of (B, C, H, W)."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * ((x - mean) / torch.sqrt(var + eps)) + bias[:, None, None]


def _pad(x, multiple):
    return F.pad(x, (0, (-x.shape[-1]) % multiple, 0, (-x.shape[-2]) % multiple))


def reference_d2_convnext(sd, x, depths):
    """D2ConvNeXt.forward (out_indices 0..3), plus the documented zero padding before each stride conv
    (a no-op on multiples of 32, the only sizes the original model is given)."""
    p, outs = "backbone.", []
    for i, depth in enumerate(depths):
        ds = f"{p}downsample_layers.{i}."
        if i == 0:  # stem: 4x4 stride-4 conv, then LayerNorm
            x = F.conv2d(_pad(x, 4), sd[ds + "0.weight"], sd[ds + "0.bias"], stride=4)
            x = _channels_first_norm(x, sd[ds + "1.weight"], sd[ds + "1.bias"])
        else:  # LayerNorm, then 2x2 stride-2 conv
            x = _channels_first_norm(x, sd[ds + "0.weight"], sd[ds + "0.bias"])
            x = F.conv2d(_pad(x, 2), sd[ds + "1.weight"], sd[ds + "1.bias"], stride=2)
        for j in range(depth):
            b = f"{p}stages.{i}.{j}."
            y = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)  # (B, H, W, C)
            y = F.layer_norm(y, (y.shape[-1],), sd[b + "norm.weight"], sd[b + "norm.bias"], eps=1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"])),
                         sd[b + "pwconv2.weight"], sd[b + "pwconv2.bias"])
            x = x + (sd[b + "gamma"] * y).permute(0, 3, 1, 2)
        outs.append(_channels_first_norm(x, sd[f"{p}norm{i}.weight"], sd[f"{p}norm{i}.bias"]))
    return outs


@pytest.mark.parametrize("size", [(64, 96), (32, 32), (70, 45), (33, 31), (5, 3), (1, 1)])
def test_matches_the_original_forward(size):
    model = random_backbone()
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
        expected = reference_d2_convnext(original_names(model), x, SPEC["depths"])
    assert [tuple(f.shape[-2:]) for f in got] == [(-(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        assert e.abs().max() > 0.5  # normalised outputs, not zeros


def test_same_computation_as_timm_convnext():
    """Weights of timm's own ConvNeXt load strictly (timm_backbone_state_dict keeps our output norms); the
    stage outputs before those norms are timm's ``forward_intermediates``."""
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(2)
    net = ConvNeXt(depths=(1, 2, 2, 1), dims=(16, 24, 32, 40), num_classes=5).double().eval()
    ours = random_backbone(seed=2)
    ours.load_state_dict(timm_backbone_state_dict(net.state_dict(), ours), strict=True)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x)
        stages = net.forward_intermediates(x, intermediates_only=True)
    for g, s, norm in zip(got, stages, ours.norms, strict=True):
        torch.testing.assert_close(g, norm(s), rtol=1e-12, atol=1e-12)


def test_drop_path_layer_scale_and_training_mode():
    model = build_backbone({**SPEC, "drop_path_rate": 0.3})
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]  # 0: Identity
    assert rates == pytest.approx(torch.linspace(0, 0.3, 6).tolist())  # the original's torch.linspace
    assert all(b.gamma is not None and torch.all(b.gamma == 1.0) for s in model.stages for b in s.blocks)
    assert all(b.gamma is None for s in build_backbone({**SPEC, "layer_scale_init_value": None}).stages
               for b in s.blocks)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x)[-1], model(x)[-1])  # stochastic depth acts in training
    model.eval()
    assert torch.equal(model(x)[-1], model(x)[-1])


def test_grad_checkpointing_gives_the_same_gradients():
    model = random_backbone().float()
    x = torch.randn(1, 3, 40, 56)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        sum(f.square().mean() for f in model(x)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_d2_rules_and_detection():
    model = random_backbone()
    original = original_names(model)
    assert "backbone.downsample_layers.0.1.weight" in original and "backbone.stages.1.1.pwconv2.bias" in original
    kind, kwargs = detect_d2_backbone(original)
    assert kind == "convnext"
    assert kwargs == {"depths": [1, 2, 2, 1], "dims": [16, 24, 32, 40], "kernel_size": 7,
                      "layer_scale_init_value": 1.0, "in_chans": 3}
    renamed = apply_rules(original, convnext_rules("backbone.", ""))
    assert renamed.keys() == model.state_dict().keys()
    assert all(torch.equal(renamed[k], v) for k, v in model.state_dict().items())
    no_gamma = {k: v for k, v in original.items() if not k.endswith("gamma")}
    assert detect_d2_backbone(no_gamma)[1]["layer_scale_init_value"] is None


def test_published_convnext_large_is_detected_as_oneformer_config_builds_it():
    """oneformer_config("convnext-large") and the detection of its original-format weights agree (shapes
    only: built on the meta device)."""
    from maskformers.models.oneformer import oneformer_config

    spec = oneformer_config("convnext-large", "ade20k").backbone
    with torch.device("meta"):
        model = build_backbone(spec)
    kind, kwargs = detect_d2_backbone(original_names(model))
    assert {"name": kind, **kwargs} == spec
    assert kwargs["depths"] == [3, 3, 27, 3] and kwargs["dims"] == [192, 384, 768, 1536]


def test_unsupported_and_broken_layouts_say_why():
    original = original_names(random_backbone())
    bad_stem = {**original, "backbone.downsample_layers.0.0.weight": torch.zeros(16, 3, 2, 2)}
    with pytest.raises(ConversionError, match=r"unsupported ConvNeXt stem \(16, 3, 2, 2\)"):
        detect_d2_backbone(bad_stem)
    no_norm = {k: v for k, v in original.items() if not k.startswith("backbone.norm2.")}
    with pytest.raises(ConversionError, match=r"output norms or blocks missing \(\['backbone\.norm2\.weight'\]"):
        detect_d2_backbone(no_norm)
    gap = {k: v for k, v in original.items() if not k.startswith("backbone.stages.1.0.")}
    with pytest.raises(ConversionError, match=r"stage 1 blocks are not numbered 0..n-1: \[1\]"):
        detect_d2_backbone(gap)
    dinat = {f"backbone.{k}": torch.zeros(1) for k in ("patch_embed.proj.0.weight", "levels.0.blocks.0.attn.rpb")}
    with pytest.raises(ConversionError, match="a DiNAT with kernel 1 and depths \\[1\\]: its dilations cannot be read"):
        detect_d2_backbone(dinat)  # recognised as DiNAT, but no published schedule fits
    with pytest.raises(ConversionError, match=r"no Swin, ResNet, ConvNeXt or DiNAT backbone under '.*': found \['x'\]"):
        detect_d2_backbone({"backbone.x.weight": torch.zeros(1)})


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"equally long positive depths and dims, got depths=\(1, 1\), dims=\(8,\)"):
        ConvNeXtBackbone(depths=[1, 1], dims=[8])
    with pytest.raises(ValueError, match="odd kernel_size >= 1.*got 4"):
        ConvNeXtBackbone(depths=[1], dims=[8], kernel_size=4)
    with pytest.raises(ValueError, match=r"0 <= drop_path_rate < 1, got 1\.5"):
        ConvNeXtBackbone(depths=[1], dims=[8], drop_path_rate=1.5)
    with pytest.raises(ValueError, match="unknown ConvNeXt size 'huge'"):
        convnext_backbone("huge")
    with pytest.raises(ValueError, match="give either size='large' or depths and dims"):
        convnext_backbone("large", depths=[1])
    model = ConvNeXtBackbone(depths=[1], dims=[8])
    assert (model.channels, model.strides) == ((8,), (4,))
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        model(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point pixel_values, got torch.uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"non-empty pixel_values, got \(1, 3, 0, 8\)"):
        model(torch.zeros(1, 3, 0, 8))
