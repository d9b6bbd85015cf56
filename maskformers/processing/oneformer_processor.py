"""OneFormer inputs: images, the task prompt as CLIP tokens, and (for training) targets with text prompts.

``OneFormerProcessor`` is the ``ImageProcessor`` with OneFormer's defaults (resize by shortest/longest edge,
no size divisor, pad to the batch with a pixel mask; the hub configs set 512/2048 for ADE20K, 800/1333 for
COCO) plus a ``CLIPTokenizer``. It returns what transformers' ``OneFormerProcessor`` returns for the same
images (tests/test_processing_oneformer.py): ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W),
``task_inputs`` (B, 77) int64 = the ids of ``f"the task is {task}"`` padded with 0; with segmentation maps
also ``mask_labels`` / ``class_labels`` (per image) and ``text_inputs`` (B, num_text, 77).

Targets follow the original training code (SHI-Labs ``OneFormerUnifiedDatasetMapper``) and transformers:
the map is resized like its image (nearest-exact), split into one binary mask per id (``ignore_index``
dropped, ids mapped through ``instance_id_to_semantic_id``), then per task: panoptic keeps every segment,
instance only thing classes, semantic one merged mask per class. ``text_inputs`` start as ``num_text``
copies of a placeholder ("a semantic photo", "an instance photo", "a panoptic photo"); then, in class-id
order, each class present fills one slot per kept segment (semantic: one per class) with
``f"a photo with a {name}"``. Three deliberate differences from transformers, which
tests/test_processing_oneformer.py checks:

- the counts are per image; transformers accumulates them over the batch, so an image's prompts name
  classes of the images before it;
- the panoptic placeholder is the original's "a panoptic photo", not transformers' "an panoptic photo";
- target masks are padded with 0 (no object) to the batch size; transformers pads them with
  ``ignore_index`` (e.g. 255) inside masks meant to be binary. An image with no segment gets (0, H, W)
  masks where transformers fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .class_info import ClassInfo, load_class_info
from .clip_tokenizer import CLIPTokenizer
from .image_processor import CONFIG_NAME, ImageProcessor

__all__ = ["OneFormerProcessor", "TASKS", "PLACEHOLDERS", "segmentation_map_to_masks", "task_targets"]

TASKS = ("semantic", "instance", "panoptic")
PLACEHOLDERS = {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "a panoptic photo"}


def _label_map(segmentation_map: Any, index: int) -> torch.Tensor:
    """A (H, W) integer map (numpy, tensor or PIL image) -> int64 tensor."""
    if not isinstance(segmentation_map, (np.ndarray, torch.Tensor)):
        segmentation_map = np.asarray(segmentation_map)  # PIL "L", "I", "P": the stored integers
    array = torch.as_tensor(segmentation_map)
    if array.dim() == 3 and array.shape[0] == 1:
        array = array[0]
    if array.dim() != 2 or array.is_floating_point() or array.is_complex() or array.dtype == torch.bool:
        raise ValueError(
            f"segmentation map {index}: expected an integer map (H, W), got {tuple(array.shape)} {array.dtype}"
        )
    return array.to(torch.int64)


def _resize_nearest_exact(label_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) int64 -> (h, w): the source pixel torchvision's nearest-exact resize picks, for any dtype
    (the rows and columns are chosen by resizing their float indices; exact below 2**24)."""
    if tuple(label_map.shape) == size:
        return label_map
    picks = []
    for length, out in zip(label_map.shape, size):
        index = torch.arange(length, dtype=torch.float32, device=label_map.device)[None, None]
        picks.append(F.interpolate(index, size=out, mode="nearest-exact")[0, 0].long())
    return label_map[picks[0][:, None], picks[1][None, :]]


def segmentation_map_to_masks(
    segmentation_map: torch.Tensor,
    *,
    instance_id_to_semantic_id: Mapping[int, int] | None = None,
    ignore_index: int | None = None,
    do_reduce_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) integer map -> ``masks`` (N, H, W) bool, one per id present in increasing id order
    (``ignore_index`` left out), and ``labels`` (N,) int64: the id itself, or its class through
    ``instance_id_to_semantic_id``. ``do_reduce_labels``: id 0 becomes ``ignore_index``, every other id
    (``ignore_index`` itself included, as in transformers' OneFormer) becomes id - 1."""
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError("do_reduce_labels=True needs ignore_index (the id that 0 becomes)")
        segmentation_map = torch.where(segmentation_map == 0, ignore_index, segmentation_map - 1)
    ids = torch.unique(segmentation_map)
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    masks = segmentation_map[None] == ids[:, None, None]  # (N, H, W)
    if instance_id_to_semantic_id is None:
        return masks, ids
    shift = 1 if do_reduce_labels else 0
    missing = [i + shift for i in ids.tolist() if i + shift not in instance_id_to_semantic_id]
    if missing:
        raise ValueError(f"instance ids {missing[:10]} of the segmentation map are not in instance_id_to_semantic_id")
    labels = [instance_id_to_semantic_id[i + shift] - shift for i in ids.tolist()]
    return masks, torch.tensor(labels, dtype=torch.int64, device=ids.device)


def task_targets(
    masks: torch.Tensor, labels: torch.Tensor, task: str, class_info: ClassInfo, num_text: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """OneFormer's per-task rule (the original's unified dataset mapper): which segments are targets, and the
    ``num_text`` text prompts that name them. masks (N, H, W), labels (N,) -> the task's masks and labels
    (instance: thing classes only; semantic: one merged mask per class, in order of first appearance;
    panoptic: all) and the prompts: ``"a photo with a {name}"`` once per kept segment in class-id order,
    then the task's placeholder (:data:`PLACEHOLDERS`) up to ``num_text``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    unknown = sorted({int(c) for c in labels.tolist()} - set(range(len(class_info.names))))
    if unknown:
        raise ValueError(f"class ids {unknown} are not among the {len(class_info.names)} classes of the class info")
    if task == "instance":
        keep = torch.tensor([int(c) in class_info.thing_ids for c in labels.tolist()], dtype=torch.bool)
        masks, labels = masks[keep.to(masks.device)], labels[keep.to(labels.device)]
    elif task == "semantic":  # one mask per class, in order of first appearance
        classes = list(dict.fromkeys(labels.tolist()))
        merged = torch.zeros((len(classes), *masks.shape[1:]), dtype=torch.bool, device=masks.device)
        for k, c in enumerate(classes):
            merged[k] = masks[labels.to(masks.device) == c].any(0)
        masks = merged
        labels = torch.tensor(classes, dtype=torch.int64, device=labels.device)
    counts = torch.bincount(labels.cpu(), minlength=len(class_info.names)).tolist()
    named = [f"a photo with a {class_info.names[c]}" for c, n in enumerate(counts) for _ in range(n)]
    texts = named[:num_text] + [PLACEHOLDERS[task]] * max(num_text - len(named), 0)
    return masks, labels, texts


class OneFormerProcessor(ImageProcessor):
    """Turn images (and task names) into OneFormer inputs; see the module docstring.

    ``processor(images, "semantic")`` or one task per image; ``segmentation_maps`` (one (H, W) integer map
    per image, same size as its image) adds the training targets and ``text_inputs``, which need
    ``class_info`` (see ``maskformers.processing.class_info``) and ``num_text``.
    """

    def __init__(
        self,
        *,
        tokenizer: CLIPTokenizer | None = None,
        class_info: ClassInfo | Mapping[str, Any] | str | os.PathLike | None = None,
        class_info_file: str | None = None,
        num_text: int | None = None,
        task_seq_length: int = 77,
        max_seq_length: int = 77,
        size_divisor: int = 0,
        **image_kwargs: Any,
    ) -> None:
        super().__init__(size_divisor=size_divisor, **image_kwargs)
        if num_text is not None and (not isinstance(num_text, int) or num_text < 1):
            raise ValueError(f"num_text must be a positive int, got {num_text!r}")
        for name, value in (("task_seq_length", task_seq_length), ("max_seq_length", max_seq_length)):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        self.tokenizer = tokenizer
        self.class_info = None if class_info is None else load_class_info(class_info)
        self.class_info_file = class_info_file  # the name in the hub config, kept for to_dict
        self.num_text = num_text
        self.task_seq_length, self.max_seq_length = task_seq_length, max_seq_length

    # ------------------------------------------------------------------ configs
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "OneFormerProcessor":
        """From a transformers ``preprocessor_config.json`` dict (OneFormer keys included). A ``metadata``
        entry (transformers' prepared class info) becomes ``class_info``, and so does ``class_info_file`` when
        ``repo_path`` is a local folder holding it (a hub ``repo_path`` is never contacted)."""
        config = dict(config)
        repo_path = config.pop("repo_path", None)
        config.pop("num_labels", None)
        if "metadata" in config:
            config.setdefault("class_info", config.pop("metadata"))
        local = os.path.join(str(repo_path), str(config.get("class_info_file")))
        if config.get("class_info") is None and repo_path and os.path.isfile(local):  # a local repo_path only
            config["class_info"] = local
        return super().from_dict(config)  # type: ignore[return-value]

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        class_info: ClassInfo | Mapping[str, Any] | str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> "OneFormerProcessor":
        """From a checkpoint folder or hub id: ``preprocessor_config.json`` with ``vocab.json`` + ``merges.txt``
        (the hub checkpoints), or a transformers 5 ``save_pretrained`` folder (``processor_config.json``,
        ``tokenizer.json``). ``class_info`` (dict or JSON path) defaults to the config's ``metadata``, else its
        ``class_info_file`` when that file sits in the folder; it is never downloaded (see
        ``maskformers.processing.class_info``)."""
        from ..hub import builtin_folder

        folder = os.fspath(builtin_folder(source) or source)
        if not os.path.isdir(folder):
            from huggingface_hub import hf_hub_download  # only for hub ids

            for name in (CONFIG_NAME, "vocab.json", "merges.txt"):
                path = hf_hub_download(repo_id=folder, filename=name, revision=revision)
            folder = os.path.dirname(path)
        config_path = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(config_path):
            processor = super().from_pretrained(config_path)
        elif os.path.isfile(os.path.join(folder, "processor_config.json")):
            with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config.get("image_processor"), dict):
                raise ValueError(f"{folder!r}: processor_config.json has no 'image_processor' entry")
            processor = cls.from_dict(config["image_processor"])
        else:
            raise FileNotFoundError(f"no {CONFIG_NAME} or processor_config.json in folder {folder!r}")
        processor.tokenizer = CLIPTokenizer.from_pretrained(folder, context_length=processor.max_seq_length)
        beside = os.path.join(folder, processor.class_info_file or "")
        if class_info is not None:
            processor.class_info = load_class_info(class_info)
        elif processor.class_info is None and processor.class_info_file and os.path.isfile(beside):
            processor.class_info = load_class_info(beside)
        return processor  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            class_info_file=self.class_info_file, num_text=self.num_text,
            task_seq_length=self.task_seq_length, max_seq_length=self.max_seq_length,
        )
        if self.class_info is not None:
            out["class_info"] = self.class_info.to_dict()
        return out

    # ------------------------------------------------------------------ processing
    def task_inputs(self, tasks: str | Sequence[str], batch: int | None = None) -> torch.Tensor:
        """(B, task_seq_length) int64 ids of ``f"the task is {task}"``; one task broadcast to ``batch``."""
        tasks = [tasks] * (batch or 1) if isinstance(tasks, str) else list(tasks)
        bad = sorted({repr(t) for t in tasks if t not in TASKS})
        if bad or not tasks:
            raise ValueError(f"tasks must be among {TASKS}, got {', '.join(bad) or 'none'}")
        if batch is not None and len(tasks) != batch:
            raise ValueError(f"expected one task or {batch} (one per image), got {len(tasks)}")
        return self._tokenize([f"the task is {task}" for task in tasks], self.task_seq_length)

    def _tokenize(self, texts: list[str], length: int) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this OneFormerProcessor has no tokenizer: pass tokenizer=CLIPTokenizer(...)")
        return self.tokenizer(texts, context_length=length)

    def __call__(  # type: ignore[override]
        self,
        images: Any,
        tasks: str | Sequence[str] = "panoptic",
        *,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int] | None] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """Images and their task(s) -> the dict described in the module docstring (plus ``image_sizes``
        and ``original_sizes`` as ``ImageProcessor`` returns them)."""
        out: dict[str, Any] = super().__call__(images, device=device)
        batch = out["pixel_values"].shape[0]
        task_list = [tasks] * batch if isinstance(tasks, str) else list(tasks)
        out["task_inputs"] = self.task_inputs(task_list, batch).to(out["pixel_values"].device)
        if segmentation_maps is not None:
            out.update(self._targets(segmentation_maps, task_list, instance_id_to_semantic_id, out))
        return out

    def _targets(self, maps: Any, tasks: list[str], mapping: Any, out: dict[str, Any]) -> dict[str, Any]:
        if self.class_info is None:
            raise ValueError(
                "segmentation targets need the class info (class names and thing ids): pass class_info= a dict or "
                f"the JSON file {self.class_info_file or '<dataset>_panoptic.json'} of shi-labs/oneformer_demo"
            )
        if self.num_text is None:
            raise ValueError("segmentation targets need num_text (the number of text prompts per image)")
        batch = len(tasks)
        maps = list(maps) if isinstance(maps, (list, tuple)) else list(maps.unbind(0)) if (
            isinstance(maps, torch.Tensor) and maps.dim() == 3) else [maps]
        if len(maps) != batch:
            raise ValueError(f"expected {batch} segmentation maps (one per image), got {len(maps)}")
        mappings = list(mapping) if isinstance(mapping, (list, tuple)) else [mapping] * batch
        if len(mappings) != batch:
            raise ValueError(f"expected {batch} instance_id_to_semantic_id mappings, got {len(mappings)}")
        canvas = tuple(out["pixel_values"].shape[-2:])
        mask_labels, class_labels, texts = [], [], []
        for i, (raw, task) in enumerate(zip(maps, tasks)):
            label_map = _label_map(raw, i)
            original = tuple(out["original_sizes"][i].tolist())
            if tuple(label_map.shape) != original:
                raise ValueError(f"segmentation map {i} is {tuple(label_map.shape)}, its image {original}")
            resized = _resize_nearest_exact(label_map, tuple(out["image_sizes"][i].tolist()))
            masks, labels = segmentation_map_to_masks(
                resized, instance_id_to_semantic_id=mappings[i], ignore_index=self.ignore_index,
                do_reduce_labels=self.do_reduce_labels,
            )
            masks, labels, prompts = task_targets(masks, labels, task, self.class_info, self.num_text)
            padded = torch.zeros((len(labels), *canvas), dtype=torch.float32, device=out["pixel_values"].device)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            mask_labels.append(padded)
            class_labels.append(labels.to(padded.device))
            texts.append(self._tokenize(prompts, self.max_seq_length))
        text_inputs = torch.stack(texts).to(out["pixel_values"].device)  # (B, num_text, max_seq_length)
        return {"mask_labels": mask_labels, "class_labels": class_labels, "text_inputs": text_inputs}
