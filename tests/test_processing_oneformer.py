"""OneFormerProcessor and class info: parity with transformers' OneFormerProcessor, the deliberate
differences in the training targets, and bad inputs.

``pixel_values`` are compared at float32 rounding (tolerances.py), ``pixel_mask``, ``task_inputs``,
``text_inputs``, class labels and masks exactly. transformers reads the class info through a local
``repo_path`` (tests/data/oneformer), ours through ``class_info``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from maskformers.processing import (
    ClassInfo, CLIPTokenizer, ImageProcessor, OneFormerProcessor, load_class_info, segmentation_map_to_masks,
)
from oneformer_helpers import DATA, class_info, write_clip_vocab
from tolerances import assert_float32_rounding

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")
pytest.importorskip("open_clip")

SHAPES = [(120, 160), (90, 61), (33, 47)]
SMALL = {"shortest_edge": 100, "longest_edge": 160}  # targets: small canvases keep the 150-class masks cheap


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_dir):
    return transformers.CLIPTokenizer.from_pretrained(vocab_dir)


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    return CLIPTokenizer.from_pretrained(vocab_dir)


def _images(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _maps(shapes, classes, seed=0, ignore=255):
    """Blocky label maps (so nearest resizing keeps every class) with an ignored band."""
    rng = np.random.default_rng(seed)
    maps = []
    for h, w in shapes:
        blocks = rng.integers(0, classes, (max(h // 8, 1), max(w // 8, 1)))
        m = np.kron(blocks, np.ones((8, 8), dtype=np.int64))[:h, :w]
        m = np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])), mode="edge").astype(np.uint8)
        m[: h // 10] = ignore
        maps.append(m)
    return maps


def _pair(hf_tokenizer, tokenizer, dataset="cityscapes", num_text=12, **config):
    image_processor = transformers.OneFormerImageProcessor(
        class_info_file=f"{dataset}_panoptic.json", repo_path=str(DATA), num_text=num_text, **config
    )
    reference = transformers.OneFormerProcessor(image_processor=image_processor, tokenizer=hf_tokenizer)
    ours = OneFormerProcessor(
        tokenizer=tokenizer, class_info=DATA / f"{dataset}_panoptic.json", num_text=num_text, **config
    )
    return reference, ours


CONFIGS = [
    {"size": {"shortest_edge": 512, "longest_edge": 2048}, "ignore_index": 255},  # ADE20K hub checkpoints
    {},  # class defaults 800 / 1333 (COCO hub checkpoints)
    {"size": {"shortest_edge": 64, "longest_edge": 100}, "resample": 3},
]


@pytest.mark.parametrize("config", CONFIGS, ids=["ade20k-hub", "defaults", "small-bicubic"])
def test_inputs_match_transformers(config, hf_tokenizer, tokenizer):
    reference, ours = _pair(hf_tokenizer, tokenizer, **config)
    images = _images()
    for tasks in (["semantic"] * 3, ["instance", "panoptic", "semantic"]):
        ref = reference(images, tasks, return_tensors="pt")
        got = ours(images, tasks)
        assert_float32_rounding(got["pixel_values"], ref["pixel_values"], what="pixel_values")
        assert torch.equal(got["pixel_mask"], ref["pixel_mask"])
        assert got["task_inputs"].dtype == torch.int64 and got["task_inputs"].shape == (3, 77)
        assert torch.equal(got["task_inputs"], ref["task_inputs"])
        assert "text_inputs" not in got
    assert torch.equal(ours(images, "instance")["task_inputs"], reference(images, ["instance"] * 3)["task_inputs"])


def _placeholder_fixed(texts):
    """transformers' panoptic placeholder, spelt as the original training code spells it."""
    return ["a panoptic photo" if t == "an panoptic photo" else t for t in texts]


@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k", "coco"])
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_targets_of_one_image_match_transformers(dataset, task, hf_tokenizer, tokenizer):
    classes = len(class_info(dataset))
    num_text = 40 if dataset != "cityscapes" else 12  # cityscapes: more segments than prompts
    reference, ours = _pair(hf_tokenizer, tokenizer, dataset, num_text=num_text, ignore_index=255, size=SMALL)
    for shape, seed in ((SHAPES[0], 0), (SHAPES[1], 1)):
        image, label_map = _images([shape], seed), _maps([shape], classes, seed)
        ref = reference(image, [task], segmentation_maps=label_map, return_tensors="pt")
        got = ours(image, task, segmentation_maps=label_map)
        h, w = got["image_sizes"][0].tolist()
        assert torch.equal(got["class_labels"][0], ref["class_labels"][0])
        assert got["mask_labels"][0].dtype == torch.float32 and len(got["class_labels"][0]) > 0
        assert torch.equal(got["mask_labels"][0][:, :h, :w], ref["mask_labels"][0][:, :h, :w])
        assert (got["mask_labels"][0][:, h:] == 0).all() and (got["mask_labels"][0][:, :, w:] == 0).all()
        ref_texts = reference.image_processor.encode_inputs(
            [torch.zeros(3, 4, 4)], [task], segmentation_maps=[torch.from_numpy(label_map[0])], return_tensors="pt"
        )["text_inputs"][0]
        assert torch.equal(got["text_inputs"][0], tokenizer(_placeholder_fixed(ref_texts)))
        if task != "panoptic":  # the same strings: the same ids as transformers' text_inputs
            assert torch.equal(got["text_inputs"], ref["text_inputs"])
        assert got["text_inputs"].shape == (1, num_text, 77)


def test_instance_ids_map_to_classes_and_reduce_labels_match_transformers(hf_tokenizer, tokenizer):
    reference, ours = _pair(hf_tokenizer, tokenizer, ignore_index=255, do_reduce_labels=True, size=SMALL)
    image = _images([SHAPES[0]])
    instance_map = _maps([SHAPES[0]], 9, seed=3, ignore=0)[0]  # 0 = unlabelled, reduced to ignore_index
    mapping = {i: c for i, c in zip(range(1, 9), [12, 14, 14, 1, 3, 19, 12, 11])}  # reduced: c - 1
    for task in ("panoptic", "instance", "semantic"):
        ref = reference(image, [task], segmentation_maps=[instance_map], instance_id_to_semantic_id=mapping,
                        return_tensors="pt")
        got = ours(image, task, segmentation_maps=[instance_map], instance_id_to_semantic_id=mapping)
        h, w = got["image_sizes"][0].tolist()
        assert torch.equal(got["class_labels"][0], ref["class_labels"][0])
        assert torch.equal(got["mask_labels"][0][:, :h, :w], ref["mask_labels"][0][:, :h, :w])
        if task != "panoptic":
            assert torch.equal(got["text_inputs"], ref["text_inputs"])
    first_seen = [11, 13, 13, 0, 2, 18, 11, 10]  # semantic: one entry per class, in order of first appearance
    assert got["class_labels"][0].tolist() == sorted(set(got["class_labels"][0].tolist()), key=first_seen.index)


def test_prompts_are_counted_per_image(hf_tokenizer, tokenizer):
    """transformers counts the classes over the batch so far; ours per image, like the original mapper:
    each image's prompts equal what transformers gives for that image alone."""
    reference, ours = _pair(hf_tokenizer, tokenizer, num_text=30, ignore_index=255, size=SMALL)
    images, maps = _images(SHAPES[:2]), _maps(SHAPES[:2], 19)
    got = ours(images, ["instance", "semantic"], segmentation_maps=maps)
    alone = [reference([im], [t], segmentation_maps=[m], return_tensors="pt")["text_inputs"][0]
             for im, t, m in zip(images, ["instance", "semantic"], maps)]
    assert torch.equal(got["text_inputs"], torch.stack(alone))
    batched = reference(images, ["instance", "semantic"], segmentation_maps=maps, return_tensors="pt")
    assert not torch.equal(batched["text_inputs"][1], alone[1])  # the difference is real
    assert (batched["mask_labels"][1][:, :, -1] == 255).all() and (got["mask_labels"][1][:, :, -1] == 0).all()


def test_image_without_segments_gets_empty_targets(tokenizer):
    ours = OneFormerProcessor(tokenizer=tokenizer, class_info=DATA / "cityscapes_panoptic.json", num_text=5,
                              ignore_index=255, size={"shortest_edge": 32, "longest_edge": 64})
    label_map = np.full((40, 50), 255, np.uint8)
    got = ours(_images([(40, 50)]), "panoptic", segmentation_maps=[label_map])
    assert got["mask_labels"][0].shape == (0, 32, 40) and got["class_labels"][0].shape == (0,)
    assert torch.equal(got["text_inputs"][0], tokenizer(["a panoptic photo"] * 5))


def test_from_pretrained_reads_hub_and_save_pretrained_folders(tmp_path, vocab_dir, hf_tokenizer, tokenizer):
    reference, _ = _pair(hf_tokenizer, tokenizer, "ade20k", num_text=134, ignore_index=255,
                         size={"shortest_edge": 96, "longest_edge": 160})
    images, tasks = _images(), ["semantic", "panoptic", "instance"]
    ref = reference(images, tasks, return_tensors="pt")
    ade = load_class_info(DATA / "ade20k_panoptic.json")
    # the hub layout: preprocessor_config.json naming a class_info_file of shi-labs/oneformer_demo, vocab + merges
    hub = tmp_path / "hub"
    reference.image_processor.save_pretrained(hub)
    config = json.loads((hub / "preprocessor_config.json").read_text())
    assert "metadata" in config  # transformers embeds the class info it loaded
    config["repo_path"] = "shi-labs/oneformer_demo"  # never contacted
    del config["metadata"]
    (hub / "preprocessor_config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, hub)
    ours = OneFormerProcessor.from_pretrained(hub)
    assert ours.class_info is None and ours.num_text == 134 and ours.size == {"shortest_edge": 96, "longest_edge": 160}
    got = ours(images, tasks)
    assert_float32_rounding(got["pixel_values"], ref["pixel_values"], what="pixel_values")
    assert torch.equal(got["task_inputs"], ref["task_inputs"])
    with pytest.raises(ValueError, match="class info .*ade20k_panoptic.json"):
        ours(images[:1], "panoptic", segmentation_maps=_maps(SHAPES[:1], 150))
    shutil.copy(DATA / "ade20k_panoptic.json", hub)  # the class info file beside the config is found
    assert OneFormerProcessor.from_pretrained(hub).class_info == ade
    explicit = OneFormerProcessor.from_pretrained(hub, class_info=class_info("cityscapes"))
    assert len(explicit.class_info.names) == 19
    assert OneFormerProcessor.from_dict(explicit.to_dict()).to_dict() == explicit.to_dict()
    # transformers 5's save_pretrained: processor_config.json (with metadata) and tokenizer.json
    saved = tmp_path / "saved"
    reference.save_pretrained(saved)
    assert not (saved / "vocab.json").exists() and (saved / "tokenizer.json").exists()
    ours = OneFormerProcessor.from_pretrained(saved)
    assert ours.class_info == ade
    got = ours(images, tasks)
    assert_float32_rounding(got["pixel_values"], ref["pixel_values"], what="pixel_values")
    assert torch.equal(got["task_inputs"], ref["task_inputs"])
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json or processor_config.json"):
        OneFormerProcessor.from_pretrained(tmp_path)


def test_segmentation_map_to_masks():
    label_map = torch.tensor([[0, 0, 3], [3, 255, 7]])
    masks, labels = segmentation_map_to_masks(label_map, ignore_index=255)
    assert labels.tolist() == [0, 3, 7] and masks.dtype == torch.bool
    assert masks.sum((1, 2)).tolist() == [2, 2, 1] and not masks[:, 1, 1].any()
    masks, labels = segmentation_map_to_masks(label_map, ignore_index=255, do_reduce_labels=True)
    assert labels.tolist() == [2, 6, 254] and masks.sum().item() == 4  # 0 -> ignored; 255 shifts too (transformers)
    _, labels = segmentation_map_to_masks(label_map, instance_id_to_semantic_id={0: 5, 3: 1, 7: 1, 255: 0})
    assert labels.tolist() == [5, 1, 1, 0]
    with pytest.raises(ValueError, match=r"instance ids \[7\]"):
        segmentation_map_to_masks(label_map, instance_id_to_semantic_id={0: 5, 3: 1}, ignore_index=255)
    with pytest.raises(ValueError, match="needs ignore_index"):
        segmentation_map_to_masks(label_map, do_reduce_labels=True)


def test_class_info_layouts_and_errors(tmp_path):
    info = load_class_info(DATA / "cityscapes_panoptic.json")
    assert info.names[11] == "person" and info.thing_ids == frozenset(range(11, 19))
    assert info.stuff_ids == frozenset(range(11))
    prepared = {**{str(i): n for i, n in enumerate(info.names)}, "thing_ids": list(range(11, 19)),
                "class_names": list(info.names)}
    assert load_class_info(prepared) == info == load_class_info(info.to_dict()) == load_class_info(info)
    for bad, message in [
        ({"0": {"name": "a", "isthing": 0}, "2": {"name": "b", "isthing": 1}}, r"0..1 each once; missing \[1\]"),
        ({"x": {"name": "a", "isthing": 0}}, "must be label ids"),
        ({"0": {"name": "a"}}, "lack 'name' or 'isthing'"),
        ({"0": "a", "thing_ids": [3]}, r"thing_ids \[3\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_class_info(bad)
    with pytest.raises(FileNotFoundError, match="class info file not found"):
        load_class_info(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_class_info(tmp_path / "list.json")
    assert isinstance(info, ClassInfo)


def test_bad_inputs(tokenizer):
    ours = OneFormerProcessor(tokenizer=tokenizer, class_info=DATA / "cityscapes_panoptic.json", num_text=4,
                              size={"shortest_edge": 32, "longest_edge": 64}, ignore_index=255)
    images = _images(SHAPES[:2])
    cases = [
        (dict(tasks="depth"), r"tasks must be among \('semantic', 'instance', 'panoptic'\), got 'depth'$"),
        (dict(tasks=["semantic", 3]), r"got 3$"),
        (dict(tasks=["semantic"]), "expected one task or 2"),
        (dict(segmentation_maps=_maps(SHAPES[:1], 19)), "expected 2 segmentation maps"),
        (dict(segmentation_maps=_maps([SHAPES[0], SHAPES[0]], 19)), r"segmentation map 1 is \(120, 160\), its image"),
        (dict(segmentation_maps=[np.zeros(s, np.float32) for s in SHAPES[:2]]), "expected an integer map"),
        (dict(segmentation_maps=[m + 30 for m in _maps(SHAPES[:2], 19, ignore=0)]), r"class ids \[30"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(images, **kwargs)
    with pytest.raises(ValueError, match="need num_text"):
        OneFormerProcessor(tokenizer=tokenizer, class_info=DATA / "cityscapes_panoptic.json")(
            images[:1], segmentation_maps=_maps(SHAPES[:1], 19))
    with pytest.raises(ValueError, match="no tokenizer"):
        OneFormerProcessor()(images)
    with pytest.raises(ValueError, match="num_text must be a positive int"):
        OneFormerProcessor(num_text=0)
    assert isinstance(ours, ImageProcessor) and ours.size_divisor == 0
