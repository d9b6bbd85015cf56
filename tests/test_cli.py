"""The maskformers command line: segment (outputs, bad images, exit codes), convert, info."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from mask2former_helpers import make_hf_model, save_hf, tiny_hf_config
from maskformers.cli import main
from maskformers.models import Mask2Former
from maskformers.processing import ImageProcessor, load_image, post_process_panoptic
from maskformers.processing.visualize import segmentation_to_png

PREPROCESSOR = {
    "do_resize": True, "size": {"height": 64, "width": 64}, "size_divisor": 32, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "Mask2FormerImageProcessor",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mask2former")
    config = tiny_hf_config(num_labels=4)
    config.id2label = {0: "cat", 1: "dog", 2: "sky", 3: "road"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    # scale 0.5: class logits spread enough that some queries clear the thresholds
    save_hf(make_hf_model(config, seed=3, scale=0.5), folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {
        "rgb": folder / "street.png",
        "gray": folder / "gray.jpg",
        "corrupt": folder / "broken.png",
        "empty": folder / "empty.jpg",
        "missing": folder / "nowhere.png",
    }
    PIL.Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(paths["rgb"])
    PIL.Image.fromarray(rng.integers(0, 255, (33, 41), dtype=np.uint8), mode="L").save(paths["gray"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    paths["empty"].write_bytes(b"")
    return paths


def read_outputs(out: Path, stem: str):
    seg = np.asarray(PIL.Image.open(out / f"{stem}_segmentation.png"))
    overlay = PIL.Image.open(out / f"{stem}_overlay.png")
    record = json.loads((out / f"{stem}_segments.json").read_text())
    return seg, overlay, record


def test_segment_panoptic_writes_consistent_outputs(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    code = main(["segment", str(images["rgb"]), str(images["gray"]), "--model", str(checkpoint),
                 "--task", "panoptic", "--threshold", "0.1", "--out", str(out), "--quiet"])
    assert code == 0
    seg, overlay, record = read_outputs(out, "street")
    assert seg.shape == (50, 70)
    assert overlay.width > 70 and overlay.height >= 50  # image plus a legend panel
    assert record["task"] == "panoptic" and (record["height"], record["width"]) == (50, 70)

    # the PNG is exactly what the library computes for that image
    model = Mask2Former.from_pretrained(checkpoint)
    processor = ImageProcessor.from_pretrained(checkpoint)
    inputs = processor(load_image(images["rgb"]))
    with torch.no_grad():
        output = model(inputs["pixel_values"])
    expected = post_process_panoptic(
        output.class_logits, output.mask_logits, input_size=inputs["pixel_values"].shape[-2:],
        image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"], threshold=0.1,
    )[0]
    np.testing.assert_array_equal(seg, expected["segmentation"].numpy())
    assert [s["id"] for s in record["segments"]] == [s["id"] for s in expected["segments_info"]]
    assert len(record["segments"]) > 0
    for s in record["segments"]:
        assert s["label"] == {0: "cat", 1: "dog", 2: "sky", 3: "road"}[s["label_id"]]
        assert s["area"] == int((seg == s["id"]).sum())
    assert sum(s["area"] for s in record["segments"]) + int((seg == 0).sum()) == 50 * 70

    seg_gray, _, _ = read_outputs(out, "gray")
    assert seg_gray.shape == (33, 41)


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_segment_other_tasks(checkpoint, images, tmp_path, task):
    out = tmp_path / task
    assert main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--task", task,
                 "--threshold", "0.05", "--out", str(out), "--quiet"]) == 0
    seg, _, record = read_outputs(out, "street")
    assert seg.shape == (50, 70)
    if task == "semantic":
        assert set(np.unique(seg).tolist()) == {s["id"] for s in record["segments"]}
        assert seg.max() < 4
    else:  # instance ids are stored + 1 so that 0 means "no instance"
        assert len(record["segments"]) > 0
        ids = {s["id"] + 1 for s in record["segments"]}
        assert set(np.unique(seg).tolist()) <= ids | {0}


def test_segment_skips_bad_images_and_fails_at_the_end(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "mixed"
    code = main(["segment", str(images["corrupt"]), str(images["rgb"]), str(images["empty"]), str(images["missing"]),
                 "--model", str(checkpoint), "--out", str(out), "--quiet"])
    assert code == 1
    assert (out / "street_segmentation.png").is_file()  # the good image is still processed
    assert not (out / "broken_segmentation.png").exists() and not (out / "empty_segmentation.png").exists()
    err = capsys.readouterr().err
    assert "segmented 1 of 4" in err
    for key in ("corrupt", "empty", "missing"):
        assert f"failed: {images[key]}" in err


def test_segment_same_stem_does_not_overwrite(checkpoint, images, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = other / images["rgb"].name
    PIL.Image.new("RGB", (20, 30), (200, 10, 10)).save(twin)
    out = tmp_path / "twins"
    assert main(["segment", str(images["rgb"]), str(twin), "--model", str(checkpoint), "--out", str(out), "--quiet"]) == 0
    assert np.asarray(PIL.Image.open(out / "street_segmentation.png")).shape == (50, 70)
    assert np.asarray(PIL.Image.open(out / "street-2_segmentation.png")).shape == (30, 20)


def test_segment_bad_model_path(tmp_path, images, capsys):
    code = main(["segment", str(images["rgb"]), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path)])
    assert code == 2
    assert "cannot load model" in capsys.readouterr().err


def test_convert_round_trip(checkpoint, tmp_path):
    dst = tmp_path / "ours"
    assert main(["convert", str(checkpoint), str(dst)]) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = Mask2Former.from_pretrained(checkpoint)(x)
        b = Mask2Former.from_pretrained(dst)(x)
    torch.testing.assert_close(b.class_logits, a.class_logits, rtol=0, atol=0)
    torch.testing.assert_close(b.mask_logits, a.mask_logits, rtol=0, atol=0)
    assert Mask2Former.from_pretrained(dst).id2label == {0: "cat", 1: "dog", 2: "sky", 3: "road"}


def test_segmentation_png_depth_and_range():
    small = segmentation_to_png(torch.tensor([[0, 3], [255, 1]]))
    assert small.mode == "L"
    big = segmentation_to_png(torch.tensor([[0, 300]]))
    assert np.asarray(big).max() == 300
    assert np.asarray(segmentation_to_png(torch.tensor([[-1, 2]]), offset=1)).tolist() == [[0, 3]]
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        segmentation_to_png(torch.tensor([[-1, 2]]))


def test_info_runs(capsys):  # the report itself is tested in test_ops_build.py
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.startswith("  ")}
    assert lines["cpu"].startswith("  cpu: available")  # CI machines have a compiler and ninja


# ----------------------------------------------------------------------------- arguments checked first
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_out_folder_is_refused_before_loading(checkpoint, images, tmp_path, capsys, monkeypatch):
    import maskformers.hub

    monkeypatch.setattr(maskformers.hub, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, needle in ((a_file, "is a file"), (a_file / "sub", "which is a file")):
        code = main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--out", str(out)])
        assert code == 2
        _one_line_error(capsys, "--out", str(out), needle)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--out", str(locked / "o")]) == 2
    _one_line_error(capsys, "--out", "permission denied")


@pytest.mark.parametrize("device, needle", [("gpu0", "is not a torch device"), ("cuda:99", "CUDA")])
def test_bad_device_is_refused_before_loading(checkpoint, images, tmp_path, capsys, device, needle):
    code = main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--out", str(tmp_path), "--device", device])
    assert code == 2
    _one_line_error(capsys, f"--device {device!r}", needle)


@pytest.mark.parametrize("value", ["-1", "2", "nan", "inf", "high"])
def test_threshold_out_of_range(checkpoint, images, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--out", str(tmp_path), "--threshold", value])
    assert info.value.code == 2
    assert f"--threshold must be a number in [0, 1], got {value!r}" in capsys.readouterr().err


def test_option_that_does_not_apply_is_named(checkpoint, images, tmp_path, capsys):
    code = main(["segment", str(images["rgb"]), "--model", str(checkpoint), "--task", "semantic", "--threshold", "0.3",
                 "--mask-threshold", "0.4", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "--threshold does not apply to --task semantic" in err and "--mask-threshold does not apply" in err


def test_bad_checkpoint_configs_are_one_line_exit_2(checkpoint, images, tmp_path, capsys):
    import shutil

    for name, edit in (("queries", {"num_queries": -5}), ("hidden", {"hidden_dim": "sixty-four"})):
        folder = tmp_path / name
        shutil.copytree(checkpoint, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(edit)
        (folder / "config.json").write_text(json.dumps(config))
        code = main(["segment", str(images["rgb"]), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"])
        assert code == 2
        key, value = next(iter(edit.items()))
        _one_line_error(capsys, key, repr(value))
    folder = tmp_path / "processor"
    shutil.copytree(checkpoint, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(PREPROCESSOR, size={"shortest_edge": 64})))
    assert main(["segment", str(images["rgb"]), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    _one_line_error(capsys, "shortest_edge")


def test_folders_batches_and_panoptic_options(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.jpg", "c.png"):
        PIL.Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", str(checkpoint), "--threshold", "0.1", "--overlap-threshold", "0.5", "--mask-threshold",
              "0.4", "--quiet"]
    assert main(["segment", str(folder), "--out", str(one), *common]) == 0
    assert main(["segment", str(folder), "--out", str(two), "--batch-size", "2", *common]) == 0
    for stem in ("a", "b", "c"):
        s1, _, r1 = read_outputs(one, stem)
        s2, _, r2 = read_outputs(two, stem)
        assert s1.shape == (40, 60) and (s1 == s2).mean() > 0.999  # same-size images: batching changes nothing
    assert not (one / "notes_segmentation.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["segment", str(empty), "--out", str(tmp_path / "x"), "--model", str(checkpoint)]) == 2
    _one_line_error(capsys, "holds no images")


def test_fuse_labels_by_name_and_id(checkpoint, images, tmp_path, capsys):
    common = ["--model", str(checkpoint), "--threshold", "0", "--overlap-threshold", "0", "--quiet"]
    assert main(["segment", str(images["rgb"]), "--out", str(tmp_path / "plain"), *common]) == 0
    plain = [s["label_id"] for s in read_outputs(tmp_path / "plain", "street")[2]["segments"]]
    assert plain.count(3) >= 2  # several "road" segments without fusion
    for fuse in (["road"], ["3"], ["sky", "3"]):
        out = tmp_path / "-".join(fuse)
        assert main(["segment", str(images["rgb"]), "--out", str(out), "--fuse-labels", *fuse, *common]) == 0
        seg, _, record = read_outputs(out, "street")
        fused = [s for s in record["segments"] if s["label_id"] == 3]
        assert len(fused) == 1 and fused[0]["was_fused"]
        assert fused[0]["area"] == int((seg == fused[0]["id"]).sum()) > 0
    capsys.readouterr()
    code = main(["segment", str(images["rgb"]), "--fuse-labels", "unicorn", "--out", str(tmp_path / "u"), *common])
    assert code == 2
    _one_line_error(capsys, "--fuse-labels 'unicorn'")


def test_non_finite_weights_are_reported(checkpoint, images, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, folder / "model.safetensors")
    code = main(["segment", str(images["rgb"]), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite logits" in err and "segmented 0 of 1" in err


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from maskformers.cli import make_parser; make_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------- OneFormer checkpoints
@pytest.fixture(scope="module")
def oneformer_checkpoint(tmp_path_factory) -> Path:
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    from mask2former_helpers import perturb_, swin_config
    from oneformer_helpers import write_clip_vocab

    folder = tmp_path_factory.mktemp("tiny-oneformer")
    config = OneFormerConfig(
        backbone_config=swin_config(), hidden_dim=64, conv_dim=64, mask_dim=64, num_attention_heads=4,
        encoder_feedforward_dim=32, dim_feedforward=48, num_queries=10, num_labels=4, decoder_layers=3,
        encoder_layers=1, id2label={0: "cat", 1: "dog", 2: "sky", 3: "road"},
    )
    torch.manual_seed(5)
    perturb_(OneFormerForUniversalSegmentation(config), seed=5, scale=0.5).eval().save_pretrained(folder)
    write_clip_vocab(folder)
    info = {"0": {"name": "cat", "isthing": 1}, "1": {"name": "dog", "isthing": 1},
            "2": {"name": "sky", "isthing": 0}, "3": {"name": "road", "isthing": 0}}
    (folder / "tiny_panoptic.json").write_text(json.dumps(info))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 64, "longest_edge": 128}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "class_info_file": "tiny_panoptic.json", "num_text": 6,
        "image_processor_type": "OneFormerImageProcessor", "processor_class": "OneFormerProcessor",
    }))
    return folder


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_segment_with_a_oneformer_checkpoint(oneformer_checkpoint, images, tmp_path, task):
    """The model type comes from the checkpoint; the task prompt goes through the checkpoint's tokenizer; the
    outputs are exactly what the Python API computes for that task."""
    import maskformers
    from maskformers.processing import OneFormerProcessor

    out = tmp_path / task
    code = main(["segment", str(images["rgb"]), "--model", str(oneformer_checkpoint), "--task", task,
                 "--threshold", "0.05", "--out", str(out), "--quiet"])
    assert code == 0
    seg, _, record = read_outputs(out, "street")
    assert seg.shape == (50, 70) and record["task"] == task

    model = maskformers.from_pretrained(oneformer_checkpoint)
    processor = OneFormerProcessor.from_pretrained(oneformer_checkpoint)
    inputs = processor(load_image(images["rgb"]), task)
    with torch.inference_mode():
        output = model(inputs["pixel_values"], inputs["task_inputs"])
    post = {"panoptic": post_process_panoptic, "semantic": maskformers.post_process_semantic,
            "instance": maskformers.post_process_instance}[task]
    kwargs = {} if task == "semantic" else {"threshold": 0.05}
    if task == "panoptic":
        kwargs["label_ids_to_fuse"] = {2, 3}  # the stuff classes of the class info: merged, as the original does
    expected = post(output.class_logits, output.mask_logits, input_size=inputs["pixel_values"].shape[-2:],
                    image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"], model="oneformer",
                    **kwargs)[0]
    expected_map = expected if task == "semantic" else expected["segmentation"]
    np.testing.assert_array_equal(seg, expected_map.numpy())
    if task != "semantic":
        assert [s["id"] for s in record["segments"]] == [s["id"] for s in expected["segments_info"]]
        assert len(record["segments"]) > 0


def test_converted_oneformer_keeps_its_tokenizer_and_class_info(oneformer_checkpoint, images, tmp_path):
    converted = tmp_path / "ours"
    assert main(["convert", str(oneformer_checkpoint), str(converted)]) == 0
    for name in ("vocab.json", "merges.txt", "tiny_panoptic.json"):
        assert (converted / name).read_bytes() == (oneformer_checkpoint / name).read_bytes()
    read = lambda folder: json.loads((folder / "preprocessor_config.json").read_text())  # noqa: E731
    assert read(converted) == read(oneformer_checkpoint)
    for source, out in ((oneformer_checkpoint, tmp_path / "a"), (converted, tmp_path / "b")):
        assert main(["segment", str(images["rgb"]), "--model", str(source), "--threshold", "0.05", "--out", str(out),
                     "--quiet"]) == 0
    (seg_a, _, rec_a), (seg_b, _, rec_b) = read_outputs(tmp_path / "a", "street"), read_outputs(tmp_path / "b", "street")
    np.testing.assert_array_equal(seg_a, seg_b)
    assert [s["label_id"] for s in rec_a["segments"]] == [s["label_id"] for s in rec_b["segments"]]
