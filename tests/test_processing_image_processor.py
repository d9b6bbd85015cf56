"""ImageProcessor: configs, the resize rule, and bit-exact parity with transformers' Mask2FormerImageProcessor.

The reference is transformers' torchvision-backend processor. Our resize calls the same ``F.interpolate``
kernels on the same dtypes (uint8 where torchvision resizes uint8, float + round where it does not), so the
resized pixels are the same integers; ``pixel_values`` (float32 rescale + normalize, an expression whose
evaluation order transformers may change) are compared at float32 rounding (tolerances.py), ``pixel_mask``
exactly. A resize that differs by one grey level moves a value by ~0.017, far beyond that bound.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers.processing import ImageProcessor
from maskformers.processing.image_processor import resized_size
from tolerances import assert_float32_rounding

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")
from transformers import Mask2FormerImageProcessor  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws the same images whatever ran before it (-k, reordering)."""
    global RNG
    RNG = np.random.default_rng(0)
SHAPES = [(480, 640), (300, 200), (97, 131), (33, 31), (384, 384)]


def _images(shapes=SHAPES, channels: int = 3) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in shapes]


def _reference(config: dict, images) -> dict:
    # do_convert_rgb: without it transformers keeps 1- and 4-channel PIL images as they are and fails on them
    return Mask2FormerImageProcessor(**config)(images, return_tensors="pt", do_convert_rgb=True)


def _assert_same(ours: dict, ref: dict) -> None:
    assert ours["pixel_values"].dtype == torch.float32 and ours["pixel_mask"].dtype == torch.int64
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert_float32_rounding(ours["pixel_values"], ref["pixel_values"], what="pixel_values")
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"])


CONFIGS = [
    {"size": {"height": 384, "width": 384}, "ignore_index": 255},  # the hub Mask2Former checkpoints
    {},  # class defaults: shortest 800 / longest 1333, size_divisor 32
    {"size": {"shortest_edge": 512, "longest_edge": 700}, "resample": 3},
    {"size": {"shortest_edge": 200, "longest_edge": 2048}, "size_divisor": 0},
    {"size": {"max_height": 300, "max_width": 333}, "resample": 0, "size_divisor": 16},
    {"size": {"height": 200, "width": 150}, "do_normalize": False},
    {"size": {"height": 200, "width": 150}, "do_rescale": False},
    {"size": {"height": 96, "width": 80}, "do_resize": False, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]},
    {"size": {"height": 128, "width": 128}, "rescale_factor": 1 / 127.5, "image_mean": 0.5, "image_std": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c) or "defaults")
def test_pixel_values_match_transformers(config):
    images = _images()
    ours = ImageProcessor(**config)(images)
    _assert_same(ours, _reference(config, images))
    assert ours["original_sizes"].tolist() == [list(s) for s in SHAPES]


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # transformers reads paths via torchvision
@pytest.mark.parametrize(
    "kind", ["pil", "pil_gray", "pil_rgba", "pil_palette", "numpy_gray", "numpy_rgba", "tensor_chw", "path_png"]
)
def test_input_kinds_match_transformers(kind, tmp_path):
    arrays = _images(SHAPES[:3])
    if kind == "pil":
        images = [PIL.Image.fromarray(a) for a in arrays]
    elif kind == "pil_gray":
        images = [PIL.Image.fromarray(a).convert("L") for a in arrays]
    elif kind == "pil_rgba":
        alphas = [RNG.integers(0, 256, a.shape[:2], dtype=np.uint8) for a in arrays]
        images = [PIL.Image.fromarray(np.dstack([a, m])) for a, m in zip(arrays, alphas)]
    elif kind == "pil_palette":
        images = [PIL.Image.fromarray(a).convert("P") for a in arrays]
    elif kind == "numpy_gray":
        images = [a[..., 0] for a in arrays]
    elif kind == "numpy_rgba":
        images = _images(SHAPES[:3], channels=4)
    elif kind == "tensor_chw":
        images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    else:
        images = []
        for i, a in enumerate(arrays):
            PIL.Image.fromarray(a).save(tmp_path / f"{i}.png")
            images.append(str(tmp_path / f"{i}.png"))
    config = {"size": {"shortest_edge": 256, "longest_edge": 400}}
    # transformers takes no list of 2-D arrays: give it the same gray images as (H, W, 1)
    reference_images = [a[..., None] for a in images] if kind == "numpy_gray" else images
    _assert_same(ImageProcessor(**config)(images), _reference(config, reference_images))


def test_float_images_in_unit_range_match_transformers_on_the_255_scale():
    unit = [a.astype(np.float32) / np.float32(255.0) for a in _images(SHAPES[:3])]
    config = {"size": {"height": 200, "width": 300}}
    ours = ImageProcessor(**config)(unit)
    _assert_same(ours, _reference(config, [u * np.float32(255.0) for u in unit]))  # transformers expects 0..255


def test_sixteen_bit_is_not_clipped():
    """transformers clips 16-bit PIL images to 255 (all white); ours is the same picture as its 8-bit version."""
    a8 = _images([(40, 50)])[0][..., 0]
    image16 = PIL.Image.fromarray(a8.astype(np.uint16) * 257)
    assert image16.mode == "I;16"
    processor = ImageProcessor(size={"height": 40, "width": 50}, size_divisor=0)
    ours16 = processor(image16)["pixel_values"]
    ours8 = processor(PIL.Image.fromarray(a8))["pixel_values"]
    assert (ours16 - ours8).abs().max() < 1e-5


def test_batch_padding_masks_and_sizes():
    images = _images([(100, 50), (40, 160)])
    processor = ImageProcessor(size={"shortest_edge": 64, "longest_edge": 1000}, size_divisor=32)
    out = processor(images)
    assert out["image_sizes"].tolist() == [[128, 64], [64, 256]]
    assert out["pixel_values"].shape == (2, 3, 128, 256)
    for i, (h, w) in enumerate(out["image_sizes"].tolist()):
        mask = out["pixel_mask"][i]
        assert mask[:h, :w].all() and mask.sum() == h * w
        assert (out["pixel_values"][i, :, h:, :] == 0).all() and (out["pixel_values"][i, :, :, w:] == 0).all()
    single = processor(images[1])
    assert torch.equal(single["pixel_values"][0], out["pixel_values"][1, :, :64, :256])


def test_pad_size_matches_transformers_and_rejects_too_small():
    images = _images(SHAPES[:2])
    config = {"size": {"height": 96, "width": 64}, "pad_size": {"height": 128, "width": 100}}
    _assert_same(ImageProcessor(**config)(images), _reference(config, images))
    with pytest.raises(ValueError, match=r"pad_size \(50, 50\).*\(96, 64\)"):
        ImageProcessor(size={"height": 96, "width": 64}, pad_size={"height": 50, "width": 50})(images)


def test_resize_rule_matches_transformers_on_many_sizes():
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    sizes = RNG.integers(1, 3000, (400, 2)).tolist() + [[800, 1333], [1333, 800], [1, 2999], [750, 1000]]
    for h, w in sizes:
        for short, long in [(800, 1333), (384, 384), (512, 2048), (100, 101)]:
            expected = get_size_with_aspect_ratio((h, w), short, long)
            assert resized_size(h, w, {"shortest_edge": short, "longest_edge": long}) == expected, (h, w, short, long)
        expected = get_image_size_for_max_height_width((h, w), 640, 480)
        assert resized_size(h, w, {"max_height": 640, "max_width": 480}) == expected
        out = resized_size(h, w, {"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32)
        base = get_size_with_aspect_ratio((h, w), 800, 1333)
        assert out == tuple(math.ceil(v / 32) * 32 for v in base)


def test_from_pretrained_folder_file_and_dict(tmp_path):
    reference = Mask2FormerImageProcessor(size={"height": 384, "width": 384}, ignore_index=255, num_labels=80)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    from_folder = ImageProcessor.from_pretrained(tmp_path)
    assert from_folder.to_dict() == ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json").to_dict()
    assert from_folder.to_dict() == ImageProcessor.from_dict(config).to_dict()
    assert from_folder.size == {"height": 384, "width": 384} and from_folder.ignore_index == 255
    assert ImageProcessor.from_dict(from_folder.to_dict()).to_dict() == from_folder.to_dict()
    images = _images(SHAPES[:2])
    _assert_same(from_folder(images), reference(images, return_tensors="pt"))


def test_size_divisibility_pads_to_a_multiple_as_the_original_repos(tmp_path):
    """size_divisibility=32 pads the batch canvas up to a multiple of 32 (detectron2's ImageList) without
    stretching the image: exactly the batch our training and evaluation build (collate); 0, the default,
    keeps transformers' canvas. The key round-trips, and transformers' processor still loads the file."""
    from maskformers.training.data import collate

    images = _images([(97, 131), (60, 70)])
    padded = ImageProcessor(do_resize=False, size_divisibility=32)(images)
    assert padded["pixel_values"].shape == (2, 3, 128, 160)
    assert padded["image_sizes"].tolist() == [[97, 131], [60, 70]]
    assert padded["pixel_mask"].sum((1, 2)).tolist() == [97 * 131, 60 * 70]
    samples = [{"image": torch.from_numpy(im).permute(2, 0, 1).contiguous()} for im in images]
    batch = collate([(s, {"labels": torch.zeros(0), "masks": torch.zeros(0, *s["image"].shape[1:], dtype=bool)})
                     for s in samples], size_divisibility=32)
    assert torch.equal(padded["pixel_values"], batch["pixel_values"])
    assert torch.equal(padded["pixel_mask"], batch["pixel_mask"])

    config = {"size": {"shortest_edge": 64, "longest_edge": 256}, "size_divisor": 0}
    plain = ImageProcessor(**config)(images[:1])
    _assert_same(plain, _reference(config, images[:1]))  # the default: transformers' canvas (64 x 86)
    assert plain["pixel_values"].shape[-2:] == (64, 86)
    divisible = ImageProcessor(**config, size_divisibility=32)
    out = divisible(images[:1])
    assert out["pixel_values"].shape[-2:] == (64, 96)
    assert torch.equal(out["pixel_values"][..., :86], plain["pixel_values"]) and not out["pixel_values"][..., 86:].any()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(divisible.to_dict()))
    assert ImageProcessor.from_pretrained(tmp_path).size_divisibility == 32
    assert ImageProcessor.from_dict(config).size_divisibility == 0  # a transformers config has no such key
    theirs = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    _assert_same(plain, theirs(images[:1], return_tensors="pt", do_convert_rgb=True))


def test_hub_style_config_keys():
    """The hub checkpoints' preprocessor_config.json (older key names included) loads."""
    config = {
        "_max_size": 1333, "do_normalize": True, "do_rescale": True, "do_resize": True, "ignore_index": 255,
        "image_mean": [0.48500001430511475, 0.4560000002384186, 0.4059999883174896],
        "image_processor_type": "Mask2FormerImageProcessor",
        "image_std": [0.2290000021457672, 0.2239999920129776, 0.22499999403953552],
        "num_labels": 133, "reduce_labels": False, "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384}, "size_divisor": 32,
    }
    processor = ImageProcessor.from_dict(config)
    assert processor.size == {"height": 384, "width": 384} and processor.do_reduce_labels is False
    assert ImageProcessor.from_dict({"size": 384, "max_size": 1333}).size == {"shortest_edge": 384, "longest_edge": 1333}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 384}, "needs max_size"),
        ({"size": {"shortest_edge": 800}}, "must have keys"),
        ({"size": {"height": 0, "width": 10}}, "positive"),
        ({"resample": 1}, "resample"),
        ({"resample": "lanczos"}, "resample"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "nonzero"),
        ({"size_divisor": -1}, "size_divisor"),
        ({"size_divisibility": -32}, "size_divisibility"),
        ({"size_divisibility": True}, "size_divisibility"),
        ({"pad_size": {"shortest_edge": 3, "longest_edge": 4}}, "pad_size"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ImageProcessor(**kwargs)


def test_bad_configs_and_calls_raise(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preprocessor config keys: \['crop_size'\]"):
        ImageProcessor.from_dict({"crop_size": 3})
    with pytest.raises(ValueError, match="do_convert_rgb"):
        ImageProcessor.from_dict({"do_convert_rgb": False})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        ImageProcessor()([])
    with pytest.raises(ValueError, match="empty"):
        ImageProcessor()(np.zeros((0, 5, 3), np.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resample", [0, 2, 3])
def test_cuda_matches_transformers_on_cuda(resample):
    images = _images(SHAPES[:3])
    config = {"size": {"shortest_edge": 256, "longest_edge": 400}, "resample": resample}
    ours = ImageProcessor(**config)(images, device="cuda")
    ref = Mask2FormerImageProcessor(**config)(images, return_tensors="pt", device="cuda")
    _assert_same(ours, ref)


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (2, 6000)])
def test_too_thin_images_are_refused_before_resizing(shape):
    """The DETR rule caps the long side, which rounds the short side of a 1x3000 image to 0 pixels; the
    processor names the image, its size and the size it would get instead of failing in F.interpolate."""
    image = np.zeros((*shape, 3), np.uint8)
    processor = ImageProcessor()  # shortest 800 / longest 1333
    out = processor.output_size(*shape)
    assert min(out) == 0
    message = re.escape(f"image 1 of size {shape} (height, width) is too thin") + ".*" + re.escape(str(out))
    with pytest.raises(ValueError, match=message):
        processor([np.zeros((20, 30, 3), np.uint8), image])
    wide_enough = np.zeros((3, 3000, 3), np.uint8)  # 3 * 1333 / 3000 = 1.33 -> 1 row: representable
    assert processor(wide_enough)["image_sizes"].tolist() == [[32, 1344]]  # 1 x 1333, rounded up to 32
    fixed = ImageProcessor(size={"height": 384, "width": 384})(image)  # a fixed size stretches any image
    assert fixed["pixel_values"].shape == (1, 3, 384, 384)
