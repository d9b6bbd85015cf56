"""DiNAT backbone: parity with transformers' ``DinatBackbone`` (float64, random perturbed weights), the
converters (transformers names and the original OneFormer names, strict key accounting), the builders and
the transformers-config parser.

transformers runs DiNAT only through NATTEN's legacy ``natten2dqkrpb`` / ``natten2dav``. NATTEN 0.17 has
no wheel for this torch (PyPI has its sdist only; building it for torch 2.14 needs C++20 in its CMake
file and patches for removed torch.cuda names), so CI cannot install it, and NATTEN 0.17.5 no longer
has those two names anyway. The test gives transformers the two functions from ``tests/natten_loops.py``:
an independent float64 loop implementation of NATTEN's semantics, not our op. (Checked once against a
patched CPU build of NATTEN 0.17.5: the loops match it exactly; see test_neighborhood_attention.py's
test_matches_natten_when_installed for a check that runs wherever NATTEN is importable.)

transformers 5.24's ``NeighborhoodAttention.forward`` cannot run with any NATTEN: it reshapes the 4-D
hidden states (B, H, W, C) with ``.view(B, H, W, heads, D).transpose(1, 2)``, a pattern from its 3-D
attention layers, which hands NATTEN (B, W, H, heads, D) instead of (B, heads, H, W, D) (v4 permuted
with (0, 3, 1, 2, 4)). The fixture replaces only that forward by v4's layout handling; embeddings, blocks,
padding, layer scale, downsamplers and output norms stay transformers' code.
``test_transformers_attention_layout_is_still_broken`` notices when transformers fixes it. Both helpers
live in ``tests/natten_loops.py`` for the OneFormer DiNAT parity tests too.
"""

from __future__ import annotations

import re

import pytest
import torch

from maskformers.models.backbone import build_backbone
from maskformers.models.dinat import (
    DINAT_L_DILATIONS,
    DiNATBackbone,
    dinat_backbone,
    dinat_base,
    dinat_large,
    dinat_mini,
    dinat_small,
    dinat_tiny,
)
from maskformers.ops import set_backend
from weights_convert import ConversionError, d2_dinat, hf_dinat
from weights_convert.hf_config import backbone_spec_from_hf_config as dinat_spec_from_hf_config

import natten_loops
from mask2former_helpers import perturb_

transformers = pytest.importorskip("transformers")
modeling_dinat = pytest.importorskip("transformers.models.dinat.modeling_dinat")


@pytest.fixture
def hf_natten(monkeypatch):
    """transformers without NATTEN: the loop functions of natten_loops.py (see the module docstring)."""
    monkeypatch.setattr(modeling_dinat, "requires_backends", lambda *args, **kwargs: None)
    monkeypatch.setattr(modeling_dinat, "natten2dqkrpb", natten_loops.natten2dqkrpb)
    monkeypatch.setattr(modeling_dinat, "natten2dav", natten_loops.natten2dav)


@pytest.fixture
def hf_dinat_runs(hf_natten, monkeypatch):
    """... and the attention layout of transformers v4 (see the module docstring)."""
    monkeypatch.setattr(modeling_dinat.NeighborhoodAttention, "forward", natten_loops.attention_forward_v4_layout)


def tiny_config(layer_scale: float = 0.0, **overrides):
    # 64x72 input: levels of 16x18, 8x9, 4x5, 2x3 pixels; kernel 3 with dilations that need padding at
    # levels 3 (dilation 2: window 6 > 4) and 4 (window 3 > 2)
    options = dict(
        embed_dim=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
        dilations=[[1, 4], [2, 1], [1, 2], [1]], mlp_ratio=2.0, drop_path_rate=0.0,
        layer_scale_init_value=layer_scale, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return transformers.DinatConfig(**(options | overrides))


def hf_model(config, seed=0):
    torch.manual_seed(seed)
    return perturb_(modeling_dinat.DinatBackbone(config), seed=seed, scale=0.05).double().eval()


def ours_from(hf, config) -> DiNATBackbone:
    ours = build_backbone(dinat_spec_from_hf_config(config.to_dict()))
    ours.load_state_dict(hf_dinat.convert(hf.state_dict()), strict=True)
    return ours.double().eval()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("layer_scale", [0.0, 0.5])
def test_matches_transformers_dinat_backbone_float64(hf_dinat_runs, backend, layer_scale):
    config = tiny_config(layer_scale)
    hf = hf_model(config, seed=int(layer_scale * 10))
    ours = set_backend(ours_from(hf, config), backend)
    pixels = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = hf(pixels).feature_maps
        got = ours(pixels)
    assert ours.channels == (16, 32, 64, 128) and ours.strides == (4, 8, 16, 32)
    assert [tuple(f.shape) for f in got] == [(2, 16, 16, 18), (2, 32, 8, 9), (2, 64, 4, 5), (2, 128, 2, 3)]
    for level, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=f"level {level + 1}")


def test_transformers_attention_layout_is_still_broken(hf_natten):
    # When this fails, transformers has fixed NeighborhoodAttention.forward: drop attention_forward_v4_layout.
    config = tiny_config()
    hf = hf_model(config)
    pixels = torch.randn(1, 3, 64, 72, dtype=torch.float64)
    with pytest.raises((IndexError, RuntimeError)):
        hf(pixels)


def test_hub_files_convert_like_the_in_memory_state_dict(hf_dinat_runs, tmp_path):
    from safetensors.torch import load_file

    config = tiny_config(0.25)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    from_file = hf_dinat.convert(load_file(tmp_path / "model.safetensors"))
    in_memory = hf_dinat.convert(hf.state_dict())
    assert from_file.keys() == in_memory.keys()
    for key in in_memory:
        assert torch.equal(from_file[key], in_memory[key]), key


def test_hf_converter_accounts_for_every_key(hf_dinat_runs):
    config = tiny_config(0.25)
    state = hf_model(config).state_dict()
    ours = ours_from(hf_model(config), config)
    converted = hf_dinat.convert(state)
    assert converted.keys() == ours.state_dict().keys()
    # q, k, v rows in order; layer scale split into gamma1 / gamma2
    qkv = converted["levels.1.blocks.0.attn.qkv.weight"]
    prefix = "encoder.levels.1.layers.0."
    for i, name in enumerate(("query", "key", "value")):
        assert torch.equal(qkv[i * 32:(i + 1) * 32], state[prefix + f"attention.self.{name}.weight"])
    assert torch.equal(converted["levels.1.blocks.0.gamma2"], state[prefix + "layer_scale_parameters"][1])
    with pytest.raises(ConversionError, match=r"1 key\(s\) match no rule: \['encoder.levels.0.extra'\]"):
        hf_dinat.convert({**state, "encoder.levels.0.extra": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if not k.endswith("attention.self.key.bias")}
    with pytest.raises(ConversionError, match="merged keys missing parts"):
        hf_dinat.convert(missing)
    # under a prefix, as inside a OneFormer checkpoint
    prefixed = hf_dinat.convert({"model.pixel_level_module.encoder." + k: v for k, v in state.items()},
                                "model.pixel_level_module.encoder.", "backbone.")
    assert set(prefixed) == {"backbone." + k for k in converted}


def original_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OneFormer D2DiNAT checkpoint layout of the same weights (written out from the original
    module tree: patch_embed, levels.{i}.blocks.{j}.{norm1, attn.qkv, attn.rpb, attn.proj, norm2, mlp.fc1,
    mlp.fc2, gamma1, gamma2}, levels.{i}.downsample, norm{i}), all under ``backbone.``."""
    out, qkv = {}, {}
    simple = {"layernorm_before": "norm1", "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1",
              "output.dense": "mlp.fc2", "attention.output.dense": "attn.proj", "attention.self.rpb": "attn.rpb"}
    for key, value in hf_state.items():
        if m := re.fullmatch(r"embeddings\.patch_embeddings\.projection\.(.*)", key):
            out[f"backbone.patch_embed.proj.{m[1]}"] = value
        elif m := re.fullmatch(r"embeddings\.norm\.(.*)", key):
            out[f"backbone.patch_embed.norm.{m[1]}"] = value
        elif m := re.fullmatch(r"hidden_states_norms\.stage(\d)\.(.*)", key):
            out[f"backbone.norm{int(m[1]) - 1}.{m[2]}"] = value
        elif m := re.fullmatch(r"encoder\.levels\.(\d)\.downsample\.(.*)", key):
            out[f"backbone.levels.{m[1]}.downsample.{m[2]}"] = value
        elif m := re.fullmatch(r"encoder\.levels\.(\d)\.layers\.(\d)\.(.*)", key):
            block, rest = f"backbone.levels.{m[1]}.blocks.{m[2]}.", m[3]
            if rest == "layer_scale_parameters":
                out[block + "gamma1"], out[block + "gamma2"] = value[0].clone(), value[1].clone()
            elif q := re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", rest):
                qkv.setdefault(block + f"attn.qkv.{q[2]}", {})[q[1]] = value
            else:
                name, param = rest.rsplit(".", 1) if rest != "attention.self.rpb" else (rest, None)
                out[block + simple[name] + (f".{param}" if param else "")] = value
        else:
            raise AssertionError(f"unexpected transformers key {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def test_original_oneformer_names_convert_to_the_same_weights(hf_dinat_runs):
    config = tiny_config(0.25)
    state = hf_model(config).state_dict()
    from_hf = hf_dinat.convert(state)
    from_d2 = d2_dinat.convert(original_names(state))
    assert from_d2.keys() == from_hf.keys()
    for key in from_hf:
        assert torch.equal(from_d2[key], from_hf[key]), key
    with pytest.raises(ConversionError, match="match no rule"):
        extra = "backbone.levels.0.blocks.0.attn.relative_position_index"
        d2_dinat.convert({**original_names(state), extra: torch.zeros(1)})


# ----------------------------------------------------------------------------------------------
# builders, spec, forward properties
# ----------------------------------------------------------------------------------------------


def parameter_count(embed, depths, heads, kernel, mlp_ratio, layer_scale):
    """Parameters of a DiNAT backbone counted from its description (tokenizer convs 3->C/2->C + norm; per
    block norm1, qkv, bias table, proj, norm2, MLP, layer scale; downsampler conv + norm; output norms)."""
    half = embed // 2
    total = (3 * half * 9 + half) + (half * embed * 9 + embed) + 2 * embed
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        hidden = int(c * mlp_ratio)
        block = 2 * c + (3 * c * c + 3 * c) + h * (2 * kernel - 1) ** 2 + (c * c + c) + 2 * c
        block += (c * hidden + hidden) + (hidden * c + c) + (2 * c if layer_scale else 0)
        total += depth * block + 2 * c
        if i + 1 < len(depths):
            total += c * 2 * c * 9 + 2 * 2 * c
    return total


def test_builders_have_the_published_shapes():
    for build, embed, depths, heads, kernel, ratio in [
        (dinat_mini, 64, (3, 4, 6, 5), (2, 4, 8, 16), 7, 3.0), (dinat_tiny, 64, (3, 4, 18, 5), (2, 4, 8, 16), 7, 3.0),
        (dinat_small, 96, (3, 4, 18, 5), (3, 6, 12, 24), 7, 2.0),
        (dinat_base, 128, (3, 4, 18, 5), (4, 8, 16, 32), 7, 2.0),
        (dinat_large, 192, (3, 4, 18, 5), (6, 12, 24, 48), 11, 2.0),
    ]:
        model = build()
        assert model.channels == tuple(embed * 2**i for i in range(4)) and model.strides == (4, 8, 16, 32)
        assert [len(level.blocks) for level in model.levels] == list(depths)
        attn = [[b.attn for b in level.blocks] for level in model.levels]
        assert [a[0].num_heads for a in attn] == list(heads) and all(a.head_dim == 32 for lv in attn for a in lv)
        assert {a.kernel_size for lv in attn for a in lv} == {kernel}
        assert model.levels[0].blocks[0].mlp.fc1.out_features == int(embed * ratio)
        assert model.levels[0].blocks[0].layer_scale == (build is dinat_base)
        assert sum(p.numel() for p in model.parameters()) == parameter_count(
            embed, depths, heads, kernel, ratio, layer_scale=build is dinat_base)
    large = dinat_large()
    schedule = [[b.attn.dilation for b in level.blocks] for level in large.levels]
    assert schedule == [list(d) for d in DINAT_L_DILATIONS["640"]]
    assert sum(p.numel() for p in large.parameters()) == 199_609_938  # ~200M as published; 223M with OneFormer
    city = dinat_large(schedule="cityscapes")
    assert city.levels[2].blocks[5].attn.dilation == 4 and city.levels[0].blocks[0].attn.kernel_size == 7
    with pytest.raises(ValueError, match="unknown DiNAT-L schedule"):
        dinat_large(schedule="512")


def test_spec_from_transformers_config_and_refusals():
    spec = dinat_spec_from_hf_config(tiny_config(0.5).to_dict())
    assert spec == {
        "name": "dinat", "embed_dim": 16, "depths": [2, 2, 2, 1], "num_heads": [1, 2, 2, 4], "kernel_size": 3,
        "dilations": [[1, 4], [2, 1], [1, 2], [1]], "mlp_ratio": 2.0, "qkv_bias": True, "drop_rate": 0.0,
        "drop_path_rate": 0.0, "layer_scale": 0.5, "in_chans": 3,
    }
    assert dinat_spec_from_hf_config(tiny_config().to_dict())["layer_scale"] is None
    with pytest.raises(ConversionError, match="attention_probs_dropout_prob=0.1"):
        dinat_spec_from_hf_config(tiny_config(attention_probs_dropout_prob=0.1).to_dict())
    with pytest.raises(ConversionError, match="out_features"):
        dinat_spec_from_hf_config(tiny_config(out_features=["stage2", "stage3", "stage4"]).to_dict())
    with pytest.raises(ConversionError, match="dilations"):
        dinat_spec_from_hf_config(dict(tiny_config().to_dict(), dilations=[[1], [1], [1], [1]]))


def test_bad_construction_and_inputs_are_named():
    with pytest.raises(ValueError, match="one dilation per block"):
        dinat_backbone(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], kernel_size=3, dilations=[[1]] * 3)
    with pytest.raises(ValueError, match="odd kernel_size"):
        dinat_backbone(embed_dim=16, depths=[1], num_heads=[1], kernel_size=4, dilations=[[1]])
    model = dinat_backbone(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3, dilations=[[2], [1]])
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 3, H, W\), got \(1, 4, 8, 8\)"):
        model(torch.zeros(1, 4, 8, 8))


def test_any_input_size_and_backends_agree():
    torch.manual_seed(0)
    model = dinat_backbone(embed_dim=16, depths=[1, 2], num_heads=[1, 2], kernel_size=5, dilations=[[3], [1, 2]],
                           mlp_ratio=2.0).eval()
    for size in [(1, 1), (13, 37), (33, 20)]:
        pixels = torch.randn(1, 3, *size)
        with torch.no_grad():
            native = set_backend(model, "native")(pixels)
            reference = set_backend(model, "reference")(pixels)
        assert [tuple(f.shape[-2:]) for f in native] == [(-(-size[0] // 4), -(-size[1] // 4)),
                                                         (-(-size[0] // 8), -(-size[1] // 8))]
        for a, b in zip(native, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_step_and_gradient_checkpointing():
    torch.manual_seed(0)
    model = dinat_backbone(embed_dim=16, depths=[2, 1], num_heads=[2, 2], kernel_size=3, dilations=[[1, 2], [1]],
                           drop_path_rate=0.1)
    pixels = torch.randn(2, 3, 32, 28)
    torch.manual_seed(1)
    loss = sum(f.square().mean() for f in model(pixels))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    loss_ckpt = sum(f.square().mean() for f in model(pixels))
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss)
    for g, h in zip(grads_ckpt, grads):
        torch.testing.assert_close(g, h)
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter, the bias tables included, is trained


def test_bfloat16_autocast_forward():
    torch.manual_seed(0)
    model = dinat_backbone(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3, dilations=[[2], [1]]).eval()
    pixels = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        full = model(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(pixels)
    for a, b in zip(mixed, full):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.1)


# ----------------------------------------------------------------------------- OneFormer with a DiNAT backbone
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_oneformer_with_dinat_matches_transformers_float64(hf_dinat_runs, tmp_path, backend):
    """transformers' OneFormerForUniversalSegmentation with a DiNAT backbone_config (the shi-labs DiNAT
    checkpoints' layout), every parameter perturbed, save_pretrained, our from_pretrained: every prediction,
    the task token and the contrastive queries agree in float64 for each task."""
    import maskformers
    from maskformers.models.oneformer import OneFormer
    from test_oneformer_parity import hf_outputs, our_outputs, task_inputs

    from mask2former_helpers import F64, assert_predictions_close

    config = transformers.OneFormerConfig(
        backbone_config=tiny_config(), hidden_dim=32, conv_dim=32, mask_dim=32, num_attention_heads=2,
        encoder_feedforward_dim=32, dim_feedforward=48, num_queries=8, num_labels=4, decoder_layers=3,
        encoder_layers=1, query_dec_layers=1,
    )
    torch.manual_seed(7)
    hf = perturb_(transformers.OneFormerForUniversalSegmentation(config), seed=7).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    ours = maskformers.from_pretrained(tmp_path / "ckpt", op_backend=backend)
    assert isinstance(ours, OneFormer) and isinstance(ours.backbone, DiNATBackbone)
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hf.double(), ours.double()
    for task in ("semantic", "panoptic"):
        t = task_inputs(task)
        expected, ref = hf_outputs(hf, x, t)
        got, out = our_outputs(ours, x, t)
        assert_predictions_close(expected, got, **F64)
        torch.testing.assert_close(out.contrastive_queries, ref.transformer_decoder_contrastive_queries, **F64)
