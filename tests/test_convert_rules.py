import pytest
import torch

from weights_convert import ConversionError, Rule, apply_rules


def test_rename_split_merge_and_drop():
    sd = {
        "a.layers.0.downsample.w": torch.ones(2),
        "blk.query.weight": torch.full((2, 3), 1.0),
        "blk.key.weight": torch.full((2, 3), 2.0),
        "blk.value.weight": torch.full((2, 3), 3.0),
        "mha.in_proj_weight": torch.arange(6.0).view(6, 1),
        "buf.relative_position_index": torch.zeros(1),
    }
    rules = [
        Rule(r"a\.layers\.(\d+)\.downsample\.(\w+)", lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
        Rule(r"(\w+)\.query\.(\w+)", r"\1.qkv.\2", part=(0, 3)),
        Rule(r"(\w+)\.key\.(\w+)", r"\1.qkv.\2", part=(1, 3)),
        Rule(r"(\w+)\.value\.(\w+)", r"\1.qkv.\2", part=(2, 3)),
        Rule(r"mha\.in_proj_weight", None, split=("q.weight", "k.weight", "v.weight")),
        Rule(r".*relative_position_index", None),
    ]
    out = apply_rules(sd, rules)
    assert sorted(out) == ["blk.qkv.weight", "k.weight", "layers.1.downsample.w", "q.weight", "v.weight"]
    assert torch.equal(out["blk.qkv.weight"][:, 0], torch.tensor([1.0, 1, 2, 2, 3, 3]))
    assert torch.equal(out["k.weight"].flatten(), torch.tensor([2.0, 3.0]))


def test_every_problem_is_reported():
    sd = {"x.query.w": torch.ones(1), "stray": torch.ones(1), "dup1": torch.ones(1), "dup2": torch.ones(1),
          "odd": torch.ones(3)}
    rules = [
        Rule(r"(\w+)\.query\.(\w+)", r"\1.qkv.\2", part=(0, 3)),
        Rule(r"dup\d", "same"),
        Rule(r"odd", None, split=("a", "b")),
    ]
    with pytest.raises(ConversionError) as info:
        apply_rules(sd, rules, source="ckpt.bin")
    msg = str(info.value)
    assert "ckpt.bin" in msg and "['stray']" in msg and "same" in msg
    assert "x.qkv.w has parts [0] of 3" in msg and "odd (3,) into 2" in msg
