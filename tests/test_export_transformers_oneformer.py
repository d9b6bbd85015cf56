"""Export of OneFormer to transformers: our models (Swin, ConvNeXt, DiNAT; with and without the text mapper)
-> ``save_pretrained(format="transformers")`` -> transformers' ``OneFormerForUniversalSegmentation`` (no missing
or unexpected keys) -> the same logits in float64 on every prediction for the three tasks, transformers ->
ours -> transformers giving back the same file, ``OneFormerProcessor.from_pretrained`` of the folder
(tokenizer, class info, pixels), a model fine-tuned with our trainer, and refusals.

DiNAT runs in transformers through the float64 loop stand-ins for NATTEN (tests/natten_loops.py, see
test_dinat.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mask2former_helpers import F64, assert_predictions_close, max_differences, perturb_
from oneformer_helpers import clip_bpe_file
from safetensors.torch import load_file
from test_dinat import hf_dinat_runs, hf_natten  # noqa: F401  (fixtures)
from test_dinat import tiny_config as dinat_tiny_config
from test_export_transformers import assert_same_files, export, load_hf, reset_unused_
from test_oneformer_parity import hf_outputs, our_outputs, task_inputs, text_inputs
from test_oneformer_parity import tiny_hf_config as oneformer_hf_config
from tolerances import assert_float32_rounding

import maskformers
from maskformers.models.oneformer import OneFormerConfig, build_oneformer
from maskformers.processing import CLIPTokenizer, OneFormerProcessor
from maskformers.processing.class_info import ClassInfo

transformers = pytest.importorskip("transformers")
OneFormerHF = transformers.OneFormerForUniversalSegmentation

SWIN = {"name": "swin", "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 7}
CONVNEXT = {"name": "convnext", "depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128], "layer_scale_init_value": 0.5}
DINAT = {"name": "dinat", "embed_dim": 16, "depths": [2, 2, 2, 1], "num_heads": [1, 2, 2, 4], "kernel_size": 3,
         "dilations": [[1, 4], [2, 1], [1, 2], [1]], "mlp_ratio": 2.0, "layer_scale": 0.5}
TINY = dict(backbone=SWIN, num_classes=4, num_queries=10, hidden_dim=64, conv_dim=64, mask_dim=64, num_heads=4,
            encoder_layers=2, encoder_ffn_dim=32, decoder_layers=3, decoder_ffn_dim=48, query_dec_layers=2,
            text_width=64, text_layers=2, text_heads=1, text_vocab_size=99, text_n_ctx=4, text_context_length=77)
LABELS = {0: "cat", 1: "dog", 2: "sky", 3: "road"}
CLASS_INFO = ClassInfo(names=tuple(LABELS.values()), thing_ids=frozenset({0, 1}))


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file(clip_bpe_file())


def ours_tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_oneformer(OneFormerConfig(**{**TINY, **overrides}), id2label=LABELS)
    model.preprocessor_config = OneFormerProcessor(class_info=CLASS_INFO).to_dict()
    return perturb_(model, seed=seed).eval()


def check_logits(ours, hf, x, *, text=None, tasks=("semantic", "instance", "panoptic")):
    """Every prediction, the task token and the contrastive queries (and text queries) in float64."""
    hf, ours, x = hf.double(), ours.double(), x.double()
    worst = (0.0, 0.0)
    for task in tasks:
        t = task_inputs(task, x.shape[0])
        expected, ref = hf_outputs(hf, x, t, text)
        got, out = our_outputs(ours, x, t, text)
        assert len(got) == len(expected) == ours.config.decoder_layers + 1
        assert_predictions_close(expected, got, **F64)
        torch.testing.assert_close(out.task_token, ref.task_token, **F64)
        torch.testing.assert_close(out.contrastive_queries, ref.transformer_decoder_contrastive_queries, **F64)
        if text is not None:
            torch.testing.assert_close(out.text_queries, ref.text_queries, **F64)
        assert any(0.02 < (m < 0).double().mean() < 0.98 for _, m in got)  # masks that mask
        worst = tuple(max(a, b) for a, b in zip(worst, max_differences(expected, got)))
    return worst


# ----------------------------------------------------------------------------- ours -> transformers, same logits
def test_swin_export_gives_transformers_the_same_logits(tmp_path, tokenizer):
    ours = ours_tiny(seed=1)
    hf = load_hf(OneFormerHF, export(ours, tmp_path / "hf", tokenizer=tokenizer))
    assert not hf.config.is_training and hf.model.text_mapper is None and hf.config.id2label == LABELS
    check_logits(ours, hf, torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(1)))


def test_convnext_export_gives_transformers_the_same_logits(tmp_path, tokenizer):
    ours = ours_tiny(seed=2, backbone=CONVNEXT)
    with pytest.warns(UserWarning, match="ConvNextBackbone does not pad"):
        ours.save_pretrained(tmp_path / "hf", format="transformers", tokenizer=tokenizer)
    hf = load_hf(OneFormerHF, tmp_path / "hf")
    assert hf.config.backbone_config.model_type == "convnext"
    check_logits(ours, hf, torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)))  # multiples of 32


def test_dinat_export_gives_transformers_the_same_logits(hf_dinat_runs, tmp_path, tokenizer):  # noqa: F811
    ours = ours_tiny(seed=3, backbone=DINAT, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, encoder_layers=1,
                     text_width=32, text_n_ctx=0)
    hf = load_hf(OneFormerHF, export(ours, tmp_path / "hf", tokenizer=tokenizer))
    assert hf.config.backbone_config.model_type == "dinat" and hf.config.backbone_config.layer_scale_init_value == 0.5
    check_logits(ours, hf, torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(3)), tasks=("panoptic",))


def test_text_mapper_export_gives_the_same_text_queries(tmp_path, tokenizer):
    """with_text_mapper=True writes an is_training model. transformers attends bidirectionally in the text encoder
    and applies its dropout in the pixel decoder even in eval mode: both off here, so nothing differs."""
    ours = ours_tiny(seed=4, with_text_mapper=True, text_causal_mask=False, query_dropout=0.0)
    hf = load_hf(OneFormerHF, export(ours, tmp_path / "hf", with_text_mapper=True, tokenizer=tokenizer))
    assert hf.config.is_training and hf.model.text_mapper is not None
    text = text_inputs(2, ours.num_queries - 4, vocab=99, seed=4)
    check_logits(ours, hf, torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(4)), text=text)
    ours.config.text_causal_mask = True  # the original's (our default): transformers cannot apply it
    with pytest.warns(UserWarning, match="causal mask but never applies it"):
        ours.save_pretrained(tmp_path / "causal", format="transformers", with_text_mapper=True, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- transformers -> ours -> transformers
@pytest.mark.parametrize("backbone", ["swin-is_training", "convnext", "dinat"])
def test_round_trip_gives_back_the_same_file(request, tmp_path, tokenizer, backbone):
    overrides = dict(is_training=True, dropout=0.0) if backbone == "swin-is_training" else {}
    config = oneformer_hf_config(**overrides)
    if backbone == "convnext":
        config.backbone_config = transformers.ConvNextConfig(
            depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128], out_features=["stage1", "stage2", "stage3", "stage4"])
    elif backbone == "dinat":
        request.getfixturevalue("hf_dinat_runs")
        config.backbone_config = dinat_tiny_config(layer_scale=0.25)
    torch.manual_seed(5)
    hf = perturb_(OneFormerHF(config), seed=5).eval()
    reset_unused_(hf)
    hf.save_pretrained(tmp_path / "src")
    ours = maskformers.from_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning):  # convnext: padding; is_training: the causal mask ours keeps
        ours.save_pretrained(tmp_path / "back", format="transformers", with_text_mapper=ours.text_mapper is not None,
                             tokenizer=tokenizer)
    assert_same_files(load_file(tmp_path / "back" / "model.safetensors"),
                      load_file(tmp_path / "src" / "model.safetensors"))
    assert_same_files(maskformers.from_pretrained(tmp_path / "back").state_dict(), ours.state_dict())


# ----------------------------------------------------------------------------- the processor
def test_oneformer_processor_loads_the_folder_offline(tmp_path, tokenizer, monkeypatch):
    from transformers.models.oneformer import image_processing_oneformer

    def no_download(*args):
        raise AssertionError(f"transformers looks for the class info elsewhere: {args}")

    monkeypatch.setattr(image_processing_oneformer, "load_metadata", no_download)
    ours = ours_tiny(seed=6)
    settings = OneFormerProcessor(size={"shortest_edge": 64, "longest_edge": 128}, resample=3, num_text=6,
                                  class_info=CLASS_INFO, ignore_index=255)
    ours.preprocessor_config = settings.to_dict()  # what a training run stores (class info included)
    export(ours, tmp_path / "hf", tokenizer=tokenizer)
    reference = transformers.OneFormerProcessor.from_pretrained(tmp_path / "hf")  # the folder alone
    assert type(reference.tokenizer).__name__ == "CLIPTokenizer" and reference.task_seq_length == 77
    metadata = reference.image_processor.metadata
    assert metadata["class_names"] == list(LABELS.values()) and metadata["thing_ids"] == [0, 1]
    assert reference.image_processor.num_text == 6 and reference.image_processor.ignore_index == 255
    mine = OneFormerProcessor.from_pretrained(tmp_path / "hf")
    assert mine.class_info == CLASS_INFO and mine.to_dict() == {**settings.to_dict(), "class_info_file": ""}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 160), (90, 61))]
    for tasks in (["semantic", "instance"], ["panoptic", "panoptic"]):
        ref, got = reference(images, tasks, return_tensors="pt"), mine(images, tasks)
        assert_float32_rounding(got["pixel_values"], ref["pixel_values"], what="pixel_values")
        assert torch.equal(got["pixel_mask"], ref["pixel_mask"]) and torch.equal(got["task_inputs"], ref["task_inputs"])
    # the exported model on the exported processor's inputs: the same logits through both libraries
    hf = load_hf(OneFormerHF, tmp_path / "hf")
    ref = reference(images[:1], ["panoptic"], return_tensors="pt")
    with torch.no_grad():
        expected = hf(pixel_values=ref["pixel_values"], task_inputs=ref["task_inputs"]).class_queries_logits
        got = ours(ref["pixel_values"], ref["task_inputs"]).class_logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32, the same computation


def test_tokenizer_and_class_info_travel_from_a_transformers_folder(tmp_path, tokenizer):
    """A OneFormer loaded from a hub-style folder (vocab.json + merges.txt, a class-info file beside) exports
    without being told its tokenizer; the class info becomes transformers' metadata."""
    import json

    ours = ours_tiny(seed=7)
    export(ours, tmp_path / "a", tokenizer=tokenizer)
    (tmp_path / "a" / "tiny_panoptic.json").write_text(json.dumps(CLASS_INFO.to_dict()))
    config = json.loads((tmp_path / "a" / "preprocessor_config.json").read_text())
    config.pop("metadata")
    config["class_info_file"] = "tiny_panoptic.json"
    (tmp_path / "a" / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = maskformers.from_pretrained(tmp_path / "a")
    export(loaded, tmp_path / "b")
    assert (tmp_path / "b" / "vocab.json").read_bytes() == (tmp_path / "a" / "vocab.json").read_bytes()
    written = json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())
    assert written["class_info_file"] == "" and written["metadata"]["thing_ids"] == [0, 1]


# ----------------------------------------------------------------------------- a model fine-tuned with our trainer
def test_model_fine_tuned_with_our_trainer_exports(tmp_path, tokenizer):
    """The user's path: ``maskformers.finetune`` writes final/ with the tokenizer, class info and processor settings
    (padding to 32, as training did); that folder exports (warning about the text mapper and the padding) and
    transformers gives the same logits on a 64x64 input."""
    from maskformers.training.synthetic import SyntheticScenes

    ours = ours_tiny(seed=8, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, with_text_mapper=True,
                     text_width=32, text_heads=2, text_context_length=16, text_n_ctx=2, text_vocab_size=49408,
                     query_dropout=0.0)  # the trainer's tests' tiny OneFormer
    labels = {0: "thing", 1: "stuff"}

    class TwoClasses:  # synthetic scenes, things vs stuff
        id2label, thing_ids = labels, frozenset({0})
        base = SyntheticScenes(4, size=64, seed=8)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            s = dict(self.base[i])
            s["labels"] = (s["labels"] >= 4).long()
            return s

    before = {k: v.clone() for k, v in ours.state_dict().items() if not k.startswith("transformer_decoder.head")}
    result = maskformers.finetune(ours, TwoClasses(), out=tmp_path / "run", tokenizer=tokenizer, crop_size=64,
                                  max_steps=2, batch_size=2, num_points=100, log_every=1, lr=1e-3, progress=False)
    tuned = maskformers.from_pretrained(result.final).eval()
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())
    with pytest.warns(UserWarning) as record:
        tuned.save_pretrained(tmp_path / "hf", format="transformers")  # the tokenizer travelled in final/
    messages = " | ".join(str(w.message) for w in record)
    assert "the text mapper" in messages and "is not exported" in messages
    assert "size_divisibility=32 has no transformers equivalent" in messages
    hf = load_hf(OneFormerHF, tmp_path / "hf")
    assert hf.config.id2label == labels and not hf.config.is_training
    assert transformers.OneFormerProcessor.from_pretrained(tmp_path / "hf").image_processor.metadata["thing_ids"] == [0]
    check_logits(tuned, hf, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match=r"text_heads=2: transformers' text encoder has text_width // 64 = 0 heads"):
        tuned.save_pretrained(tmp_path / "with-mapper", format="transformers", with_text_mapper=True)


# ----------------------------------------------------------------------------- refusals
def test_refusals(tmp_path, tokenizer):
    ours = ours_tiny()
    with pytest.raises(ValueError, match="without its CLIP tokenizer: .* pass tokenizer="):
        ours.save_pretrained(tmp_path / "a", format="transformers")
    ours.preprocessor_config = OneFormerProcessor(size_divisor=32).to_dict()
    with pytest.raises(ValueError, match="size_divisor=32: transformers' OneFormerImageProcessor does not round"):
        ours.save_pretrained(tmp_path / "a", format="transformers", tokenizer=tokenizer)
    ours.preprocessor_config = OneFormerProcessor(class_info=ClassInfo(names=("a",), thing_ids=frozenset())).to_dict()
    with pytest.raises(ValueError, match="the class info names 1 classes, the model has 4"):
        ours.save_pretrained(tmp_path / "a", format="transformers", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="task_mlp_layers=3: transformers' task MLP has 2 layers"):
        ours_tiny(task_mlp_layers=3).save_pretrained(tmp_path / "a", format="transformers", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"encoder_dropout=0.2: .* query_dropout is 0.1"):
        ours_tiny(with_text_mapper=True, encoder_dropout=0.2).save_pretrained(
            tmp_path / "a", format="transformers", with_text_mapper=True, tokenizer=tokenizer)
    assert not (tmp_path / "a").exists()
