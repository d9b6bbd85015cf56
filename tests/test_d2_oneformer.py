"""Original SHI-Labs/OneFormer ``.pth`` checkpoints: round trips (ours, random -> the original's names ->
``.pth`` -> ``convert`` -> load -> the same outputs) for Swin and ConvNeXt, training (text encoder) and
inference files; the architecture read back from the weights; the text encoder against a float64
reference of the original's CLIP blocks; Mask2Former/OneFormer detection; and broken files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from oneformer_d2_helpers import (
    CONVNEXT, SWIN, ours_to_original, random_oneformer, task_ids, text_ids, tiny_config,
)
from maskformers.convert import convert
from maskformers.hub import CheckpointError, from_pretrained
from maskformers.models.config import OneFormerConfig
from maskformers.models.oneformer import OneFormer
from weights_convert import ConversionError, d2_oneformer

PR_CT = "sem_seg_head.predictor.class_"
X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def save_pth(state, path, **extra):
    torch.save({"model": state, "iteration": 7, **extra}, path)
    return path


def outputs(model, text=None):
    with torch.no_grad():
        out = model(X, task_ids(), text_inputs=text)
    tensors = [out.class_logits, out.mask_logits, out.task_token, out.contrastive_queries, out.hidden_states]
    tensors += [t for aux in out.aux_outputs for t in aux.values()]
    return tensors + ([out.text_queries] if text is not None else [])


@pytest.fixture(scope="module", params=["swin", "convnext"])
def backbone(request):
    return {"swin": SWIN, "convnext": CONVNEXT}[request.param]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_round_trip(backbone, training, tmp_path):
    config = tiny_config(backbone, with_text_mapper=training)
    model = random_oneformer(config, seed=1)
    original = ours_to_original(model.state_dict())
    assert ("text_encoder.token_embedding.weight" in original) == training
    src = save_pth(original, tmp_path / "model_final.pth")

    raw = d2_oneformer.load_checkpoint(src)
    assert d2_oneformer.original_model_type(raw) == "oneformer"
    assert OneFormerConfig(**d2_oneformer.infer_architecture(raw)) == config  # the whole architecture, read back
    loaded = from_pretrained(convert(src, tmp_path / "ours"), op_backend="reference")
    assert isinstance(loaded, OneFormer) and loaded.config == config
    text = text_ids(2, config.num_queries - config.text_n_ctx, config.text_vocab_size) if training else None
    for a, b in zip(outputs(model, text), outputs(loaded, text), strict=True):
        assert torch.equal(a, b)


def test_cli_converts_a_oneformer_file(tmp_path, capsys):
    from maskformers.cli import main

    model = random_oneformer(tiny_config(SWIN, with_text_mapper=False, num_heads=4))
    src = save_pth(ours_to_original(model.state_dict()), tmp_path / "oneformer.pth")
    assert main(["convert", str(src), str(tmp_path / "out"), "--config", '{"num_heads": 4}']) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = from_pretrained(tmp_path / "out", op_backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), outputs(loaded), strict=True))
    (tmp_path / "cfg.json").write_text('{"num_heads": 4, "use_task_norm": "yes"}')
    assert main(["convert", str(src), str(tmp_path / "bad"), "--config", str(tmp_path / "cfg.json")]) == 1
    assert main(["convert", str(src), str(tmp_path / "bad"), "--config", "{num_heads: 4}"]) == 2
    err = capsys.readouterr().err
    assert "--config '{num_heads: 4}' is not valid JSON" in err and "use_task_norm" in err


def test_config_overrides_what_the_weights_do_not_show(tmp_path):
    """4 heads instead of the published 8 and no task norm: neither shows in the weights (8 heads x 2 points
    have the same shapes as 4 x 4), so the file converts without them but computes something else; the
    override (which recomputes the points) gives the model back."""
    config = tiny_config(SWIN, with_text_mapper=False, num_heads=4, use_task_norm=False)
    model = random_oneformer(config, seed=2)
    src = save_pth(ours_to_original(model.state_dict()), tmp_path / "heads4.pth")
    assumed = from_pretrained(convert(src, tmp_path / "assumed"), op_backend="reference")
    assert (assumed.config.num_heads, assumed.config.encoder_points, assumed.use_task_norm) == (8, 2, True)
    assert not torch.allclose(outputs(model)[0], outputs(assumed)[0])
    loaded = from_pretrained(convert(src, tmp_path / "a", config={"num_heads": 4, "use_task_norm": False}),
                             op_backend="reference")
    assert loaded.config == config
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), outputs(loaded)))
    assert from_pretrained(convert(src, tmp_path / "b", config=config)).config == config
    expected = r"heads4\.pth: this file holds a oneformer checkpoint: config must be a OneFormerConfig .*, got int"
    with pytest.raises(CheckpointError, match=expected):
        convert(src, tmp_path / "c", config=42)
    with pytest.raises(CheckpointError, match=r"heads4\.pth: unknown OneFormerConfig field\(s\) \['num_head'\]"):
        convert(src, tmp_path / "d", config={"num_head": 4})


# ------------------------------------------------------------------------------------------------
# the text encoder against the original's CLIP blocks (float64)
# ------------------------------------------------------------------------------------------------


class _ResidualAttentionBlock(nn.Module):
    """The original's CLIP block: x + attn(ln_1(x)) with an additive causal mask, x + mlp(ln_2(x)),
    (L, N, C) layout, quick-GELU."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = self.mlp["c_fc"](self.ln_2(x))
        return x + self.mlp["c_proj"](h * torch.sigmoid(1.702 * h))


def reference_text_queries(original, ids, *, layers, width, n_ctx):
    """text_encoder -> text_projector (ReLU MLP) -> append prompt_ctx, from the original's state dict."""
    blocks = nn.ModuleList(_ResidualAttentionBlock(width, max(1, width // 64)) for _ in range(layers)).double()
    blocks.load_state_dict({k[len("text_encoder.transformer.resblocks."):]: v for k, v in original.items()
                            if k.startswith("text_encoder.transformer.resblocks.")})
    B, T, L = ids.shape
    flat = ids.reshape(B * T, L)
    x = original["text_encoder.token_embedding.weight"][flat] + original["text_encoder.positional_embedding"]
    mask = torch.full((L, L), float("-inf"), dtype=torch.float64).triu_(1)
    x = x.permute(1, 0, 2)  # (L, N, C)
    for block in blocks:
        x = block(x, mask)
    x = nn.functional.layer_norm(x.permute(1, 0, 2), (width,), original["text_encoder.ln_final.weight"],
                                 original["text_encoder.ln_final.bias"])
    x = x[torch.arange(B * T), flat.argmax(-1)]
    n = len([k for k in original if k.startswith("text_projector.layers.") and k.endswith(".weight")])
    for i in range(n):
        w, b = original[f"text_projector.layers.{i}.weight"], original[f"text_projector.layers.{i}.bias"]
        x = nn.functional.linear(x, w, b)
        x = x.relu() if i < n - 1 else x
    ctx = original["prompt_ctx.weight"][None].expand(B, n_ctx, -1)
    return torch.cat([x.view(B, T, -1), ctx], dim=1)


def test_text_mapper_matches_the_original_computation(tmp_path):
    config = tiny_config(SWIN, with_text_mapper=True, text_width=128, text_heads=2, hidden_dim=128, num_heads=8)
    original = ours_to_original(random_oneformer(config, seed=3).state_dict())
    loaded = from_pretrained(convert(save_pth(original, tmp_path / "t.pth"), tmp_path / "ours")).double()
    original = {k: v.double() for k, v in original.items()}
    assert loaded.text_mapper.text_encoder.layers[0].attn.num_heads == 2  # width 128 // 64
    ids = text_ids(2, config.num_queries - config.text_n_ctx, config.text_vocab_size, seed=3)
    with torch.no_grad():
        expected = reference_text_queries(original, ids, layers=2, width=128, n_ctx=config.text_n_ctx)
        got = loaded.text_mapper(ids)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.abs().max() > 0.1


class _DetrDecoderLayer(nn.Module):
    """The original class_transformer's decoder layer (forward_post): self-attention on tgt + query_pos ->
    norm1; cross-attention (query tgt + query_pos, key memory + pos, value memory) -> norm2; ReLU FFN -> norm3."""

    def __init__(self, width, heads, ffn):
        super().__init__()
        self.self_attn, self.multihead_attn = nn.MultiheadAttention(width, heads), nn.MultiheadAttention(width, heads)
        self.linear1, self.linear2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, tgt, memory, pos, query_pos):
        tgt = self.norm1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory)[0])
        return self.norm3(tgt + self.linear2(self.linear1(tgt).relu()))


def test_query_transformer_matches_the_original_class_transformer(tmp_path):
    """Our converted query transformer against the original's computation on the original's names
    (float64): memory = sine embedding of the 1/4 map, key position = class_input_proj(mask features),
    queries start from the normalised task token, query_embed[:-1] as their positions."""
    from maskformers.layers.position_encoding import SinePositionEmbedding

    config = tiny_config(SWIN, with_text_mapper=False)
    original = ours_to_original(random_oneformer(config, seed=4).state_dict())
    loaded = from_pretrained(convert(save_pth(original, tmp_path / "q.pth"), tmp_path / "ours")).double()
    sd = {k: v.double() for k, v in original.items()}
    layers = nn.ModuleList(_DetrDecoderLayer(64, 8, 48) for _ in range(2)).double()
    prefix = PR_CT + "transformer.decoder.layers."
    layers.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    mask_features = torch.randn(2, 64, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    task = torch.randn(2, 1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    pe = SinePositionEmbedding(num_pos_feats=32, normalize=True)(9, 11, dtype=torch.float64, device="cpu")
    memory = pe.reshape(99, 1, 64).expand(99, 2, 64)  # (HW, B, C)
    pos = nn.functional.conv2d(mask_features, sd[PR_CT + "input_proj.weight"], sd[PR_CT + "input_proj.bias"])
    pos = pos.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    query_pos = sd["sem_seg_head.predictor.query_embed.weight"][:-1, None].expand(-1, 2, -1)  # (Q-1, B, C)
    tgt = task.transpose(0, 1).repeat(query_pos.shape[0], 1, 1)
    with torch.no_grad():
        for layer in layers:
            tgt = layer(tgt, memory, pos, query_pos)
        expected = nn.functional.layer_norm(tgt, (64,), sd[PR_CT + "transformer.decoder.norm.weight"],
                                            sd[PR_CT + "transformer.decoder.norm.bias"]).transpose(0, 1)
        got = loaded.query_transformer(mask_features, loaded.query_embed.weight[:-1], task)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# which model, and broken files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_state():
    return ours_to_original(random_oneformer(tiny_config(SWIN, with_text_mapper=True)).state_dict())


def test_detects_the_model_from_the_keys(original_state):
    assert d2_oneformer.original_model_type(original_state) == "oneformer"
    m2f = {k: v for k, v in original_state.items() if not k.startswith(("task_mlp.", "text_", "prompt_ctx", PR_CT))}
    m2f["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(10, 64)
    assert d2_oneformer.original_model_type(m2f) == "mask2former"
    with pytest.raises(ConversionError, match=r"x\.pth is both a Mask2Former checkpoint .* and a OneFormer"):
        d2_oneformer.original_model_type({**original_state, **m2f}, source="x.pth")
    with pytest.raises(ConversionError, match=r"neither a Mask2Former .* nor a OneFormer .*names: \['head'\]"):
        d2_oneformer.original_model_type({"head.weight": torch.zeros(1)})


def test_unknown_keys_are_listed(original_state, tmp_path):
    state = {**original_state, "sem_seg_head.predictor.static_query.weight": torch.zeros(3), "extra": torch.zeros(1)}
    src = save_pth(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"2 key\(s\) match no rule: \['extra', '.*predictor\.static_query"):
        convert(src, tmp_path / "out")


@pytest.mark.parametrize("drop, ours", [
    ("sem_seg_head.predictor.class_input_proj.bias", "query_transformer.input_proj.bias"),
    ("text_encoder.transformer.resblocks.1.ln_2.weight", "text_mapper.text_encoder.layers.1.norm2.weight"),
])
def test_missing_keys_are_named(original_state, tmp_path, drop, ours):
    state = {k: v for k, v in original_state.items() if k != drop}
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): \['{ours}'\]"):
        convert(save_pth(state, tmp_path / "missing.pth"), tmp_path / "out")


def test_incomplete_text_mapper(original_state):
    state = {k: v for k, v in original_state.items() if not k.startswith("text_projector.")}
    with pytest.raises(ConversionError, match=r"incomplete text mapper: .* no \['text_projector\.\*'\]"):
        d2_oneformer.infer_architecture(state)


def test_unsupported_variants_say_why(original_state):
    state = {**original_state, PR_CT + "transformer.encoder.layers.0.linear1.weight": torch.zeros(4, 4)}
    with pytest.raises(ConversionError, match=r"query transformer has encoder layers \(MODEL\.ONE_FORMER\.ENC_LAYERS"):
        d2_oneformer.infer_architecture(state)
    legacy = {k.replace("pixel_decoder.", ""): v for k, v in original_state.items()}
    with pytest.raises(ConversionError, match=r"version-1 \(MaskFormer-era\) head layout"):
        d2_oneformer.convert_state_dict(legacy)


def test_pth_that_needs_code_execution_is_refused(original_state, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = save_pth(dict(original_state), tmp_path / "evil.pth", trainer=Evil())
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused for safety.*(posix|os)\.system") as info:
        convert(src, tmp_path / "out")
    assert "weights_only=False" not in str(info.value)
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"model": {}, "x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load (posix|os)\.system"):
        convert(src, tmp_path / "out2")
    assert not marker.exists()


def test_dinat_oneformer_file_round_trip(tmp_path):
    """An original OneFormer DiNAT file (D2DiNAT names): the backbone is recognised, the published dilations
    for its kernel are filled in (they do not show in the weights), every weight lands where it was."""
    from oneformer_d2_helpers import DINAT

    config = tiny_config(DINAT, with_text_mapper=False)
    model = random_oneformer(config, seed=3)
    src = save_pth(ours_to_original(model.state_dict()), tmp_path / "dinat.pth")
    raw = d2_oneformer.load_checkpoint(src)
    assert "backbone.levels.0.blocks.0.attn.rpb" in raw and "backbone.norm0.weight" in raw
    inferred = OneFormerConfig(**d2_oneformer.infer_architecture(raw))
    assert inferred == config
    loaded = from_pretrained(convert(src, tmp_path / "ours"))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    kernel5 = {k: torch.zeros(v.shape[0], 9, 9) if k.endswith("attn.rpb") else v for k, v in raw.items()}
    with pytest.raises(ConversionError, match="kernel 5 .* dilations cannot be read from the weights"):
        d2_oneformer.infer_architecture(kernel5)  # no published schedule has kernel 5
    mixed = dict(raw, **{"backbone.levels.0.blocks.0.attn.rpb": torch.zeros(1, 9, 9)})
    with pytest.raises(ConversionError, match="disagree on the kernel size"):
        d2_oneformer.infer_architecture(mixed)
