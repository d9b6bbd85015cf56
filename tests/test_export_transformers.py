"""Export to transformers (Mask2Former; OneFormer in test_export_transformers_oneformer.py): the inverse rule
engine, our models -> ``save_pretrained(format="transformers")`` -> transformers' ``from_pretrained`` (no
missing or unexpected keys) -> the same logits in float64 on every prediction, transformers -> ours ->
transformers giving back the same file bit for bit, the preprocessor config, a model fine-tuned with our
trainer, refusals, and the ``maskformers export`` command."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import warnings

import numpy as np
import pytest
import torch
from mask2former_helpers import (
    F64,
    assert_masks_nontrivial,
    assert_predictions_close,
    hf_predictions,
    make_hf_model,
    max_differences,
    our_predictions,
    perturb_,
    tiny_hf_config,
)
from safetensors.torch import load_file
from tolerances import assert_float32_rounding

import maskformers
from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former
from weights_convert import ConversionError, Rule, apply_rules
from weights_convert.hf_config_writer import SPEC_DEFAULTS
from weights_convert.inverse import expand_pattern, invert_rules

transformers = pytest.importorskip("transformers")

SWIN = {"name": "swin", "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 7}
TINY = dict(backbone=SWIN, num_classes=4, num_queries=10, hidden_dim=64, conv_dim=64, mask_dim=64, num_heads=4,
            encoder_layers=2, encoder_ffn_dim=32, decoder_layers=4, decoder_ffn_dim=48)
LABELS = {0: "cat", 1: "dog", 2: "sky", 3: "road"}


# ----------------------------------------------------------------------------- shared helpers
def perturb_buffers_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on the batch-norm buffers too (a frozen batch norm has no parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if b.is_floating_point() and (name.endswith(("running_mean", "running_var")) or ".bn" in name
                                          or "downsample.1." in name):
                noise = torch.rand(b.shape, generator=g, dtype=b.dtype)
                b.mul_(0.8 + 0.4 * noise) if name.endswith("running_var") else b.add_(0.05 * (noise - 0.5))
    return module


def load_hf(cls, folder):
    """transformers' from_pretrained of an exported folder, asserting that every key fit."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def assert_same_files(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def reset_unused_(hf_model) -> None:
    """transformers state our models do not hold, at its initial value (the export writes that): the loss
    state, and transformers 5's SwinBackbone final LayerNorm, which its forward never uses."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name == "criterion.logit_scale":
                p.fill_(float(np.log(1 / 0.07)))
            elif re.fullmatch(r"model\.pixel_level_module\.encoder\.swin\.layernorm\.(weight|bias)", name):
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def export(model, folder, **options):
    """``save_pretrained(format="transformers")``, asserting that it warns of nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(folder, format="transformers", **options)
    return folder


# ----------------------------------------------------------------------------- the inverse engine
def test_expansion_puts_the_canonical_spelling_first():
    assert expand_pattern(r"a\.(?:swin\.)?(?:x|y)\.s([1-9]\d*)\.([01])", range(3)) == [
        "a.x.s1.0", "a.x.s1.1", "a.x.s2.0", "a.x.s2.1", "a.y.s1.0", "a.y.s1.1", "a.y.s2.0", "a.y.s2.1",
        "a.swin.x.s1.0", "a.swin.x.s1.1", "a.swin.x.s2.0", "a.swin.x.s2.1", "a.swin.y.s1.0", "a.swin.y.s1.1",
        "a.swin.y.s2.0", "a.swin.y.s2.1"]
    for bad in (r"a.b", r"a\wb", r"(?P<x>a)", r"[a-z]", r"a{2}", r"(a"):
        with pytest.raises(ConversionError, match="cannot invert rule pattern"):
            expand_pattern(bad, range(3))


RULES = [
    Rule(r"enc\.(\d+)\.(?:old|new)\.(weight|bias)", lambda m: f"layers.{int(m[1]) + 1}.w.{m[2]}"),
    Rule(r"enc\.(\d+)\.packed", None, split=(r"layers.\1.q", r"layers.\1.k")),
    Rule(r"enc\.(\d+)\.a", r"layers.\1.ab", part=(0, 2)),
    Rule(r"enc\.(\d+)\.b", r"layers.\1.ab", part=(1, 2)),
    Rule(r"enc\.(\d+)\.index", None),
]


def test_inverse_runs_the_table_backwards_exactly():
    source = {"enc.0.old.weight": torch.randn(2, 3), "enc.1.old.bias": torch.randn(2),
              "enc.0.packed": torch.randn(4, 3), "enc.3.a": torch.randn(2, 3), "enc.3.b": torch.randn(2, 3)}
    ours = apply_rules({**source, "enc.0.index": torch.zeros(1)}, RULES)
    back = invert_rules(ours, RULES)
    assert_same_files(back, source)  # "old" (the first alternative) is written; the dropped key is not


def test_inverse_accounts_for_every_key():
    ours = apply_rules({"enc.0.packed": torch.randn(4, 3), "enc.3.a": torch.randn(2, 3), "enc.3.b": torch.randn(2, 3)},
                       RULES)
    with pytest.raises(ConversionError, match=r"1 key\(s\) no rule produces: \['extra'\]"):
        invert_rules({**ours, "extra": torch.zeros(1)}, RULES)
    with pytest.raises(ConversionError, match=r"enc.0.packed needs 2 parts, has \[0\]"):
        invert_rules({k: v for k, v in ours.items() if k != "layers.0.k"}, RULES)
    with pytest.raises(ConversionError, match="cannot be split evenly"):
        invert_rules({**ours, "layers.3.ab": torch.randn(3, 3)}, RULES)


def test_spec_defaults_are_the_builders_defaults():
    from maskformers.models.backbone import ResNetBackbone, SwinBackbone, resnet_backbone
    from maskformers.models.convnext import ConvNeXtBackbone, convnext_backbone
    from maskformers.models.dinat import DiNATBackbone

    def defaults(*functions):
        out = {}
        for f in functions:
            out.update({k: p.default for k, p in inspect.signature(f).parameters.items()
                        if p.default is not inspect.Parameter.empty})
        return out

    builders = {"swin": (SwinBackbone,), "resnet": (ResNetBackbone, resnet_backbone),
                "convnext": (ConvNeXtBackbone, convnext_backbone), "dinat": (DiNATBackbone,)}
    for name, functions in builders.items():
        found = defaults(*functions)
        assert SPEC_DEFAULTS[name] == {k: found[k] for k in SPEC_DEFAULTS[name]}, name
        assert set(found) <= set(SPEC_DEFAULTS[name]), (name, set(found) - set(SPEC_DEFAULTS[name]))


# ----------------------------------------------------------------------------- ours -> transformers, same logits
def ours_tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb_(build_mask2former(Mask2FormerConfig(**{**TINY, **overrides}), id2label=LABELS), seed=seed).eval()


def check_logits(ours, hf, x):
    expected = hf_predictions(hf.double(), x.double())
    got = our_predictions(ours.double(), x.double())
    assert len(got) == len(expected) == ours.config.decoder_layers + 1
    assert_predictions_close(expected, got, **F64)
    assert_masks_nontrivial(got)  # masked attention at work
    return max_differences(expected, got)


@pytest.mark.parametrize("case", ["swin", "swin-window12-prenorm-projection"])
def test_mask2former_swin_export_gives_transformers_the_same_logits(tmp_path, case):
    options = {} if case == "swin" else dict(backbone={**SWIN, "window_size": 12}, pre_norm=True, hidden_dim=32,
                                              num_heads=2, enforce_input_projection=True, decoder_layers=2)
    ours = ours_tiny(seed=1, **options)
    hf = load_hf(transformers.Mask2FormerForUniversalSegmentation, export(ours, tmp_path / "hf"))
    assert hf.config.id2label == LABELS and hf.config.backbone_config.window_size == ours.config.backbone["window_size"]
    check_logits(ours, hf, torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    """A perturbed transformers Mask2Former with a ResNet-50 backbone_config (transformers warns that it only
    knows Swin for Mask2Former, and runs it) saved by transformers; the loss state left at its initial value."""
    config = tiny_hf_config(num_labels=3)
    config.backbone_config = transformers.ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(2)
    hf = perturb_buffers_(perturb_(transformers.Mask2FormerForUniversalSegmentation(config), seed=2), seed=2).eval()
    folder = tmp_path_factory.mktemp("hf-resnet")
    hf.save_pretrained(folder)
    return hf, folder


def test_mask2former_resnet_export_gives_transformers_the_same_logits(resnet_pair, tmp_path):
    ours = maskformers.from_pretrained(resnet_pair[1])
    perturb_buffers_(perturb_(ours, seed=3), seed=3)  # our own weights now, frozen batch norms included
    with pytest.warns(UserWarning, match="batch norms are frozen here"):
        ours.save_pretrained(tmp_path / "hf", format="transformers")
    hf = load_hf(transformers.Mask2FormerForUniversalSegmentation, tmp_path / "hf")
    assert hf.config.backbone_config.model_type == "resnet"
    check_logits(ours, hf, torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3)))


# ----------------------------------------------------------------------------- transformers -> ours -> transformers
def test_swin_round_trip_gives_back_the_same_file(tmp_path):
    hf = make_hf_model(tiny_hf_config(), seed=4)
    reset_unused_(hf)
    hf.save_pretrained(tmp_path / "src")
    ours = maskformers.from_pretrained(tmp_path / "src")
    export(ours, tmp_path / "back")
    assert_same_files(load_file(tmp_path / "back" / "model.safetensors"),
                      load_file(tmp_path / "src" / "model.safetensors"))
    again = maskformers.from_pretrained(tmp_path / "back")  # ... and ours -> transformers -> ours
    assert again.config == ours.config and again.id2label == ours.id2label
    assert_same_files(again.state_dict(), ours.state_dict())


def test_resnet_round_trip_gives_back_the_same_file(resnet_pair, tmp_path):
    ours = maskformers.from_pretrained(resnet_pair[1])
    with pytest.warns(UserWarning, match="frozen"):
        ours.save_pretrained(tmp_path / "back", format="transformers")
    assert_same_files(load_file(tmp_path / "back" / "model.safetensors"),
                      load_file(resnet_pair[1] / "model.safetensors"))


def test_exported_config_reads_back_as_the_same_architecture(tmp_path):
    ours = ours_tiny(encoder_dropout=0.0, common_stride=8, decoder_layers=0)
    export(ours, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["decoder_layers"] == 1 and config["common_stride"] == 8 and config["feature_size"] == 64
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(hf_config).__name__ == "Mask2FormerConfig" and hf_config.backbone_config.depths == [1, 1, 2, 1]
    read = maskformers.from_pretrained(tmp_path / "hf").config
    assert dataclasses.replace(read, backbone=ours.config.backbone) == ours.config
    spec = {**SPEC_DEFAULTS["swin"], **ours.config.backbone}  # the builder's defaults, now written out
    assert all(spec[k] == v for k, v in read.backbone.items()), (read.backbone, spec)


# ----------------------------------------------------------------------------- the preprocessor config
HUB_LIKE = {"do_resize": True, "size": {"height": 384, "width": 384}, "size_divisor": 32, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "ignore_index": 255, "do_reduce_labels": False,
            "image_processor_type": "Mask2FormerImageProcessor", "_max_size": 1333}


@pytest.mark.parametrize("settings", [None, HUB_LIKE, {"size": {"shortest_edge": 48, "longest_edge": 80},
                                                       "resample": 3, "size_divisor": 0}],
                         ids=["defaults", "hub-like", "small-bicubic"])
def test_auto_image_processor_gives_the_same_pixels(tmp_path, settings):
    from maskformers.processing import ImageProcessor

    ours = ours_tiny()
    ours.preprocessor_config = settings
    export(ours, tmp_path / "hf")
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(reference).__name__.startswith("Mask2FormerImageProcessor")
    processor = ImageProcessor.from_dict(settings) if settings else ImageProcessor()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 160), (90, 61))]
    ref, got = reference(images, return_tensors="pt"), processor(images)
    assert_float32_rounding(got["pixel_values"], ref["pixel_values"], what="pixel_values")
    assert torch.equal(got["pixel_mask"], ref["pixel_mask"])


# ----------------------------------------------------------------------------- a model fine-tuned with our trainer
def test_model_fine_tuned_with_our_trainer_exports(tmp_path):
    """The user's path: ``maskformers.finetune`` writes final/ (which pads inputs to 32, as training did), that
    folder exports with one warning about the padding, and transformers gives the same logits on a 64x64 input."""
    from maskformers.training.synthetic import SyntheticScenes

    ours = ours_tiny(seed=5)

    class TwoClasses:  # synthetic scenes, things vs stuff
        id2label, thing_ids = {0: "thing", 1: "stuff"}, frozenset({0})
        base = SyntheticScenes(4, size=64, seed=5)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            s = dict(self.base[i])
            s["labels"] = (s["labels"] >= 4).long()
            return s

    before = {k: v.clone() for k, v in ours.state_dict().items()}
    result = maskformers.finetune(ours, TwoClasses(), out=tmp_path / "run", crop_size=64, scale_range=(0.8, 1.2),
                                  max_steps=3, batch_size=2, num_points=100, log_every=1, lr=1e-3, progress=False)
    tuned = maskformers.from_pretrained(result.final).eval()
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert tuned.preprocessor_config["size_divisibility"] == 32
    with pytest.warns(UserWarning, match="size_divisibility=32 has no transformers equivalent") as record:
        tuned.save_pretrained(tmp_path / "hf", format="transformers")
    assert len(record) == 1
    hf = load_hf(transformers.Mask2FormerForUniversalSegmentation, tmp_path / "hf")
    assert hf.config.id2label == {0: "thing", 1: "stuff"} and hf.class_predictor.out_features == 3
    check_logits(tuned, hf, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")  # the processor loads too


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_points=8), r"encoder_points=8: transformers' deformable attention samples 4 points"),
    (dict(backbone={**SWIN, "depths": [1, 1, 2], "num_heads": [1, 1, 2]}), r"depths=\[1, 1, 2\]: .*four stages"),
    (dict(backbone={"name": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "kernel_size": 5}),
     r"kernel_size=5: transformers' ConvNeXt blocks have 7x7 depthwise kernels"),
])
def test_what_transformers_cannot_represent_is_refused(tmp_path, overrides, message):
    ours = build_mask2former(Mask2FormerConfig(**{**TINY, **overrides}))
    with pytest.raises(ValueError, match="cannot export to transformers: Mask2FormerConfig .*" + message):
        ours.save_pretrained(tmp_path / "hf", format="transformers")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_bad_options_are_refused(tmp_path):
    ours = ours_tiny()
    ours.id2label = {0: "cat"}
    with pytest.raises(ValueError, match=r"id2label has ids \[0\]\.\.\., the model 4 classes"):
        ours.save_pretrained(tmp_path / "a", format="transformers")
    with pytest.raises(ValueError, match="format must be 'maskformers' or 'transformers', got 'onnx'"):
        ours.save_pretrained(tmp_path / "a", format="onnx")
    with pytest.raises(ValueError, match="apply to format='transformers' only"):
        ours.save_pretrained(tmp_path / "a", with_text_mapper=True)
    with pytest.raises(ValueError, match="needs a OneFormer with a text mapper"):
        ours.save_pretrained(tmp_path / "a", format="transformers", with_text_mapper=True)


def test_export_over_our_layout_replaces_it(tmp_path):
    ours = ours_tiny()
    ours.save_pretrained(tmp_path / "out")
    export(ours, tmp_path / "out")
    assert not (tmp_path / "out" / "maskformers_config.json").exists()
    assert_same_files(maskformers.from_pretrained(tmp_path / "out").state_dict(), ours.state_dict())


# ----------------------------------------------------------------------------- the command
def test_export_command(tmp_path, capsys):
    from maskformers.cli import main

    ours = ours_tiny()
    ours.save_pretrained(tmp_path / "run" / "final")  # what a training run writes
    assert main(["export", str(tmp_path / "run" / "final"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'hf'}"
    hf = load_hf(transformers.Mask2FormerForUniversalSegmentation, tmp_path / "hf")
    check_logits(ours, hf, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)))
    capsys.readouterr()  # transformers' loading progress bar

    for args, message in [
        ([str(tmp_path / "hf"), str(tmp_path / "hf")], "is the source"),
        ([str(tmp_path / "run" / "final"), str(tmp_path / "hf")], "is not empty; pass force=True"),
        ([str(tmp_path / "missing"), str(tmp_path / "x")], "no such folder"),
    ]:
        code = main(["export", *args, "--to", "transformers"])
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["export", str(tmp_path / "run" / "final"), str(tmp_path / "hf"), "--to", "transformers",
                 "--force"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "run" / "final"), str(tmp_path / "y"), "--to", "onnx"])
    assert exit_info.value.code == 2
