"""Loading and saving: transformers folders (4.x and 5.x layouts, safetensors/.bin/shards), hub ids,
our own layout, detectron2 checkpoints, and every way a checkpoint can be broken."""

from __future__ import annotations

import copy
import json
import re
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from maskformers.ops import set_backend
from safetensors.torch import load_file, save_file

from mask2former_helpers import (
    F64,
    assert_predictions_close,
    hf_predictions,
    hf_to_d2_state_dict,
    make_hf_model,
    our_predictions,
    tiny_hf_config,
)
from maskformers.convert import convert
from maskformers.hub import CheckpointError, from_pretrained


def load_mask2former(path, **kwargs):
    return from_pretrained(path, model_type="mask2former", **kwargs)
from maskformers.models.mask2former import Mask2Former, Mask2FormerConfig
from weights_convert import ConversionError
from weights_convert import d2_mask2former
from weights_convert.hf_mask2former import convert_state_dict

X = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(tiny_hf_config(num_labels=3))


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {"0": "cat", "1": "dog", "2": "sky"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 384, "width": 384}}))
    return folder


@pytest.fixture(scope="module")
def reference_outputs(hf_model):
    return hf_predictions(copy.deepcopy(hf_model).double(), X.double())


def copy_folder(src, dst, *, skip=()):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def assert_matches(model, reference):
    assert_predictions_close(reference, our_predictions(model.double(), X.double()), **F64)


# ------------------------------------------------------------------------------------------------
# what loads
# ------------------------------------------------------------------------------------------------


def test_transformers_folder_safetensors(hf_folder, reference_outputs):
    model = Mask2Former.from_pretrained(hf_folder, op_backend="reference")
    assert not model.training
    assert model.id2label == {0: "cat", 1: "dog", 2: "sky"}
    assert model.preprocessor_config == {"size": {"height": 384, "width": 384}}
    assert model.config.decoder_layers == 4 and model.config.num_classes == 3
    assert_matches(model, reference_outputs)


def test_transformers_folder_bin_only(hf_folder, tmp_path, reference_outputs):
    folder = copy_folder(hf_folder, tmp_path / "bin", skip={"model.safetensors"})
    torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")
    assert_matches(load_mask2former(folder, op_backend="reference"), reference_outputs)


def test_safetensors_preferred_over_bin(hf_folder, tmp_path, reference_outputs):
    folder = copy_folder(hf_folder, tmp_path / "both")
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")  # would fail if it were read
    assert_matches(load_mask2former(folder, op_backend="reference"), reference_outputs)


def test_sharded_safetensors(hf_model, tmp_path, reference_outputs):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_matches(load_mask2former(tmp_path / "sharded", op_backend="reference"), reference_outputs)


def test_transformers_4x_file_layout(hf_folder, tmp_path, reference_outputs):
    """4.x files have persistent relative_position_index buffers and no unused final Swin layernorm."""
    folder = copy_folder(hf_folder, tmp_path / "v4", skip={"model.safetensors"})
    state = {k: v for k, v in load_file(hf_folder / "model.safetensors").items() if "swin.layernorm" not in k}
    for k in [k for k in state if k.endswith("relative_position_bias_table")]:
        state[k.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.int64)
    save_file(state, folder / "model.safetensors")
    assert_matches(load_mask2former(folder, op_backend="reference"), reference_outputs)


def test_transformers_5_in_memory_names_convert_like_the_file(hf_model, hf_folder):
    from_file = convert_state_dict(load_file(hf_folder / "model.safetensors"))
    from_memory = convert_state_dict(hf_model.state_dict())
    assert from_file.keys() == from_memory.keys()
    assert all(torch.equal(from_file[k], from_memory[k]) for k in from_file)


def test_hub_id_goes_through_snapshot_download(hf_folder, tmp_path, monkeypatch, reference_outputs):
    """A repo with only pytorch_model.bin: the safetensors snapshot has no weights, the second one does."""
    import fnmatch

    import huggingface_hub

    repo = copy_folder(hf_folder, tmp_path / "remote", skip={"model.safetensors"})
    torch.save(load_file(hf_folder / "model.safetensors"), repo / "pytorch_model.bin")
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, revision, cache_dir, local_files_only):
        calls.append((repo_id, tuple(allow_patterns), revision))
        local = tmp_path / "cache" / str(len(calls))
        local.mkdir(parents=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, local / f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Mask2Former.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic", revision="main",
                                        op_backend="reference")
    assert [c[0] for c in calls] == ["facebook/mask2former-swin-tiny-coco-panoptic"] * 2
    assert any("*.safetensors" in c[1] for c in calls) and calls[0][2] == "main"
    assert_matches(model, reference_outputs)


def test_hub_id_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot download 'facebook/mask2former-swin-tiny-coco-panoptic'"):
        load_mask2former("facebook/mask2former-swin-tiny-coco-panoptic", cache_dir=tmp_path, local_files_only=True)


def test_save_pretrained_round_trip(hf_folder, tmp_path):
    model = load_mask2former(hf_folder, op_backend="reference")
    model.save_pretrained(tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "maskformers_config.json").read_text())
    assert meta["model_type"] == "mask2former" and meta["id2label"] == {"0": "cat", "1": "dog", "2": "sky"}
    assert Mask2FormerConfig.from_dict(meta["config"]) == model.config
    again = Mask2Former.from_pretrained(tmp_path / "ours", op_backend="reference")
    assert again.id2label == model.id2label and again.preprocessor_config == model.preprocessor_config
    a, b = our_predictions(model, X), our_predictions(again, X)
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_convert_transformers_folder(hf_folder, tmp_path, reference_outputs):
    out = convert(hf_folder, tmp_path / "converted")
    assert (out / "model.safetensors").is_file() and (out / "maskformers_config.json").is_file()
    assert_matches(load_mask2former(out, op_backend="reference"), reference_outputs)


# ------------------------------------------------------------------------------------------------
# detectron2 checkpoints of the original repository
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d2_model():
    return make_hf_model(tiny_hf_config(heads=8, num_labels=5), seed=3)  # 8 heads: inferable from weights


@pytest.fixture(scope="module")
def d2_state(d2_model, tmp_path_factory):
    """d2_model's weights in the original repository's names (from the 4.x names save_pretrained writes)."""
    folder = tmp_path_factory.mktemp("d2src")
    d2_model.save_pretrained(folder)
    return hf_to_d2_state_dict(load_file(folder / "model.safetensors"))


def write_pkl(state, path, protocol=2):
    arrays = {k: v.numpy() for k, v in state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test", "matching_heuristics": True}, f, protocol=protocol)
    return path


@pytest.mark.parametrize("kind", ["pkl", "pkl5", "pth"])
def test_detectron2_checkpoint(d2_model, d2_state, tmp_path, kind):
    state = d2_state
    if kind == "pth":
        src = tmp_path / "model_final.pth"
        torch.save({"model": state, "iteration": 5}, src)
    else:
        src = write_pkl(state, tmp_path / "model_final.pkl", protocol=5 if kind == "pkl5" else 2)
    arch = d2_mask2former.infer_architecture(d2_mask2former.load_checkpoint(src))
    assert (arch["num_classes"], arch["num_queries"], arch["decoder_layers"], arch["encoder_points"]) == (5, 10, 4, 4)
    assert arch["backbone"]["depths"] == [1, 1, 2, 1]
    model = load_mask2former(convert(src, tmp_path / "ours"), op_backend="reference")
    expected = hf_predictions(copy.deepcopy(d2_model).double(), X.double())
    assert_predictions_close(expected, our_predictions(model.double(), X.double()), **F64)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": Evil()}, protocol=2))
    with pytest.raises(d2_mask2former.UnsafePickleError, match=r"refusing to load (posix|os)\.system"):
        d2_mask2former.load_checkpoint(src)
    with pytest.raises(CheckpointError, match="refusing to load"):
        convert(src, tmp_path / "out")
    assert not marker.exists()


def test_d2_converter_reports_unused_keys(d2_state):
    state = dict(d2_state)
    state["sem_seg_head.predictor.static_query.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"match no rule: \['sem_seg_head\.predictor\.static_query\.weight'\]"):
        d2_mask2former.convert_state_dict(state)


# ------------------------------------------------------------------------------------------------
# broken checkpoints
# ------------------------------------------------------------------------------------------------


def edited_hf_folder(hf_folder, tmp_path, edit):
    folder = copy_folder(hf_folder, tmp_path / "edited", skip={"model.safetensors"})
    state = load_file(hf_folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder


def test_missing_key(hf_folder, tmp_path):
    folder = edited_hf_folder(hf_folder, tmp_path, lambda s: s.pop("class_predictor.bias"))
    expected = r"1 missing key\(s\): \['transformer_decoder\.head\.class_embed\.bias'\]"
    with pytest.raises(CheckpointError, match=expected):
        load_mask2former(folder)


def test_unexpected_key(hf_folder, tmp_path):
    folder = edited_hf_folder(hf_folder, tmp_path, lambda s: s.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"match no rule: \['model\.extra\.weight'\]"):
        load_mask2former(folder)


def test_wrong_shape(hf_folder, tmp_path):
    folder = edited_hf_folder(hf_folder, tmp_path, lambda s: s.update({"class_predictor.weight": torch.zeros(7, 64)}))
    expected = r"transformer_decoder\.head\.class_embed\.weight: checkpoint \(7, 64\) vs model \(4, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_mask2former(folder)


def test_every_problem_in_one_error(hf_folder, tmp_path):
    model = load_mask2former(hf_folder, op_backend="reference")
    model.save_pretrained(tmp_path / "ours")
    state = load_file(tmp_path / "ours" / "model.safetensors")
    del state["pixel_decoder.level_embed"]
    state["pixel_decoder.bogus"] = torch.zeros(1)
    state["query_feat.weight"] = torch.zeros(11, 64)
    save_file(state, tmp_path / "ours" / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_mask2former(tmp_path / "ours")
    msg = str(info.value)
    assert "missing key(s): ['pixel_decoder.level_embed']" in msg
    assert "unexpected key(s): ['pixel_decoder.bogus']" in msg
    assert "query_feat.weight: checkpoint (11, 64) vs model (10, 64)" in msg
    assert str(tmp_path / "ours" / "model.safetensors") in msg


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights(hf_folder, tmp_path, name):
    folder = copy_folder(hf_folder, tmp_path / "trunc", skip={"model.safetensors"})
    if name == "model.safetensors":
        data = (hf_folder / "model.safetensors").read_bytes()
    else:
        torch.save(load_file(hf_folder / "model.safetensors"), folder / name)
        data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{name}"):
        load_mask2former(folder)


def test_bin_that_needs_code_execution_is_refused(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "evil", skip={"model.safetensors"})
    torch.save({"w": torch.zeros(1), "obj": Mask2FormerConfig()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused for safety.*Mask2FormerConfig") as info:
        load_mask2former(folder)
    assert "weights_only=False" not in str(info.value) and "safe_globals" not in str(info.value)
    assert "truncated" not in str(info.value)


def test_folder_without_weights_or_config(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "noweights", skip={"model.safetensors"})
    with pytest.raises(CheckpointError, match=r"no weights in .*noweights: expected one of \['model\.safetensors'"):
        load_mask2former(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_mask2former(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"no such folder: .*does/not/exist \(.* exists, .*does/not does not\)"):
        load_mask2former(tmp_path / "does" / "not" / "exist")


def test_mistyped_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`runs/bset` beside an existing `runs/` is a mistyped folder, not a hub id: "no such folder" with what
    `runs/` holds, and no download is tried."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local path went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "best").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^no such folder: runs/bset \(runs holds the folders: best\); not "
                                              r"looked up on the hub because the local folder runs/ exists$"):
        load_mask2former("runs/bset")
    with pytest.raises(CheckpointError, match=r"^no such folder: runs/best/x/y \(runs/best exists, runs/best/x does "
                                              r"not\)$"):
        load_mask2former("./runs/best/x/y")


def test_wrong_model_type(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "other")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "maskformer"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json has model_type='maskformer'; supported: mask2former, oneformer"):
        load_mask2former(folder)


_BB, _PD, _PR = r"backbone\.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
_LAY = r"transformer_decoder\.layers\.(\d+)\."
_OURS_TO_D2 = [  # our names -> the original's (ResNet backbone), to write a detectron2 R-50 checkpoint
    (_BB + r"conv1\.weight", "backbone.stem.conv1.weight"),
    (_BB + r"bn1\.(\w+)", r"backbone.stem.conv1.norm.\1"),
    (_BB + r"layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (_BB + r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (_BB + r"layer(\d)\.0\.downsample\.0\.weight", lambda m: f"backbone.res{int(m[1]) + 1}.0.shortcut.weight"),
    (_BB + r"layer(\d)\.0\.downsample\.1\.(\w+)", lambda m: f"backbone.res{int(m[1]) + 1}.0.shortcut.norm.{m[2]}"),
    (r"pixel_decoder\.input_projs\.(.*)", _PD + r"input_proj.\1"),
    (r"pixel_decoder\.level_embed", _PD + "transformer.level_embed"),
    (r"pixel_decoder\.encoder\.(.*)", _PD + r"transformer.encoder.\1"),
    (r"pixel_decoder\.mask_features\.(.*)", _PD + r"mask_features.\1"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.0\.weight", lambda m: f"{_PD}adapter_{int(m[1]) + 1}.weight"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.1\.(\w+)", lambda m: f"{_PD}adapter_{int(m[1]) + 1}.norm.{m[2]}"),
    (r"pixel_decoder\.output_convs\.(\d)\.0\.weight", lambda m: f"{_PD}layer_{int(m[1]) + 1}.weight"),
    (r"pixel_decoder\.output_convs\.(\d)\.1\.(\w+)", lambda m: f"{_PD}layer_{int(m[1]) + 1}.norm.{m[2]}"),
    (r"(query_feat|query_embed)\.weight", _PR + r"\1.weight"),
    (r"transformer_decoder\.level_embed\.weight", _PR + r"level_embed.weight"),
    (_LAY + r"self_attn\.attn\.out_proj\.(\w+)", _PR + r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (_LAY + r"self_attn\.norm\.(\w+)", _PR + r"transformer_self_attention_layers.\1.norm.\2"),
    (_LAY + r"cross_attn\.attn\.out_proj\.(\w+)",
     _PR + r"transformer_cross_attention_layers.\1.multihead_attn.out_proj.\2"),
    (_LAY + r"cross_attn\.norm\.(\w+)", _PR + r"transformer_cross_attention_layers.\1.norm.\2"),
    (_LAY + r"ffn\.(\w+)\.(\w+)", _PR + r"transformer_ffn_layers.\1.\2.\3"),
    (r"transformer_decoder\.head\.norm\.(\w+)", _PR + r"decoder_norm.\1"),
    (r"transformer_decoder\.head\.class_embed\.(\w+)", _PR + r"class_embed.\1"),
    (r"transformer_decoder\.head\.mask_embed\.layers\.(.*)", _PR + r"mask_embed.layers.\1"),
]


def ours_to_d2(state):
    import re

    out, packed = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer_decoder\.layers\.(\d+)\.(self|cross)_attn\.attn\.([qkv])_proj\.(\w+)", key)
        if m:
            attn = "self_attention_layers.{}.self_attn", "cross_attention_layers.{}.multihead_attn"
            kind = attn[0] if m[2] == "self" else attn[1]
            name = f"{_PR}transformer_{kind.format(m[1])}.in_proj_{m[4]}"
            packed.setdefault(name, {})["qkv".index(m[3])] = value
            continue
        for pattern, target in _OURS_TO_D2:
            m = re.fullmatch(pattern, key)
            if m:
                out[target(m) if callable(target) else m.expand(target)] = value
                break
        else:
            raise KeyError(f"test mapping misses {key}")
    out.update({k: torch.cat([v[i] for i in range(3)]) for k, v in packed.items()})
    out["criterion.empty_weight"] = torch.ones(4)
    return out


def test_detectron2_resnet50_checkpoint(tmp_path):
    """An R-50 checkpoint: ResNet keys, 2048-channel inputs of the pixel decoder, architecture inferred."""
    from maskformers.models.mask2former import build_mask2former

    cfg = Mask2FormerConfig(backbone={"name": "resnet", "depth": 50}, num_classes=3, num_queries=6, hidden_dim=64,
                            conv_dim=64, mask_dim=32, num_heads=8, encoder_layers=2, encoder_ffn_dim=48,
                            decoder_layers=3, decoder_ffn_dim=40)
    model = set_backend(build_mask2former(cfg), "reference").eval()
    src = write_pkl(ours_to_d2(model.state_dict()), tmp_path / "r50.pkl")
    arch = d2_mask2former.infer_architecture(d2_mask2former.load_checkpoint(src))
    assert Mask2FormerConfig(**arch) == cfg
    loaded = load_mask2former(convert(src, tmp_path / "ours"), op_backend="reference")
    x = torch.randn(1, 3, 64, 64)
    a, b = our_predictions(model, x), our_predictions(loaded, x)
    assert all(torch.equal(p, q) for pa, pb in zip(a, b) for p, q in zip(pa, pb))


def test_converted_folder_rebuilds_the_same_architecture(hf_model, hf_folder, tmp_path):
    # one parser reads transformers' backbone_config, so a converted copy carries every backbone
    # setting of the original (drop path included), not only those that change eval outputs
    from_hf = load_mask2former(hf_folder)
    from_ours = load_mask2former(convert(hf_folder, tmp_path / "ours"))
    assert from_ours.config == from_hf.config
    assert from_hf.config.backbone["drop_path_rate"] == hf_model.config.backbone_config.drop_path_rate
    rates = [m.drop_prob for m in from_ours.backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(hf_model.config.backbone_config.drop_path_rate)


# ------------------------------------------------------------------------------------------------
# dispatch, format versions, convert safety, config errors
# ------------------------------------------------------------------------------------------------


def test_package_from_pretrained_dispatches_on_model_type(hf_folder, reference_outputs):
    import maskformers

    model = maskformers.from_pretrained(hf_folder, op_backend="reference")
    assert type(model) is Mask2Former
    assert_matches(model, reference_outputs)
    with pytest.raises(ValueError, match="model_type must be None or one of"):
        maskformers.from_pretrained(hf_folder, model_type="maskformer")
    with pytest.raises(ValueError, match="op_backend must be None, 'native' or 'reference', got 'gpu'"):
        maskformers.from_pretrained(hf_folder, op_backend="gpu")


def test_format_version_1_folders_still_load(hf_folder, tmp_path, reference_outputs):
    model = load_mask2former(hf_folder)
    model.save_pretrained(tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / "maskformers_config.json").read_text())
    assert meta["format_version"] == 2
    meta["format_version"] = 1
    (tmp_path / "v1" / "maskformers_config.json").write_text(json.dumps(meta))
    state = load_file(tmp_path / "v1" / "model.safetensors")
    for name in ("query_feat", "query_embed"):  # where version 1 kept them
        state[f"transformer_decoder.{name}.weight"] = state.pop(f"{name}.weight")
    save_file(state, tmp_path / "v1" / "model.safetensors")
    assert_matches(load_mask2former(tmp_path / "v1", op_backend="reference"), reference_outputs)
    meta["format_version"] = 7
    (tmp_path / "v1" / "maskformers_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version=7"):
        load_mask2former(tmp_path / "v1")


def test_convert_never_writes_over_its_source(hf_folder, tmp_path):
    src = copy_folder(hf_folder, tmp_path / "src")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    for dst in (src, src / ".", src / "inside"):
        with pytest.raises(ValueError, match="is the source .* or inside it"):
            convert(src, dst)
        with pytest.raises(ValueError, match="is the source .* or inside it"):
            convert(src, dst, force=True)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass force=True"):
        convert(src, full)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        convert(src, tmp_path / "file")
    out = convert(src, full, force=True)
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".full.")]  # no temporary folder left


def test_config_missing_architecture_keys_says_which(hf_folder, tmp_path):
    folder = copy_folder(hf_folder, tmp_path / "diff")
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("hidden_dim", "feature_size", "mask_feature_size", "encoder_layers", "decoder_layers"):
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_mask2former(folder)
    msg = str(info.value)
    assert "leaves out ['decoder_layers', 'encoder_layers', 'feature_size', 'hidden_dim', 'mask_feature_size']" in msg
    assert len(msg) < 4000 and "more" in msg  # a summary, not hundreds of keys


def test_config_value_of_the_wrong_type_names_key_and_file(hf_folder, tmp_path):
    for key, value in (("hidden_dim", "sixty-four"), ("num_queries", -5), ("pre_norm", "yes")):
        folder = copy_folder(hf_folder, tmp_path / key)
        cfg = json.loads((folder / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=rf"{key}.*{value}|{re.escape(str(folder))}") as info:
            load_mask2former(folder)
        assert key in str(info.value) and repr(value) in str(info.value)
        assert "config.json" in str(info.value) or "Mask2FormerConfig" in str(info.value)
