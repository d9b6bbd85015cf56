"""Batched inference for ``maskformers segment``: preprocess a batch of images, one forward pass under
``torch.inference_mode``, post-process each image at its original size.

Model-specific parts (which processor, the task prompt of OneFormer, which post-processing) are chosen
here once, from the model's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["SegmentRunner"]


class SegmentRunner:
    """``runner(batch, post_kwargs, failures, warn)`` -> one result per image (None for failed ones)."""

    def __init__(
        self, model: nn.Module, *, task: str, device: torch.device, dtype: torch.dtype, class_info: Any = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        from .models.oneformer import OneFormer
        from .processing import post_process_instance, post_process_panoptic, post_process_semantic
        from .processing.model_settings import image_processor_for

        self.task = task
        self.device, self.dtype = device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.is_oneformer = isinstance(model, OneFormer)
        post = {"panoptic": post_process_panoptic, "semantic": post_process_semantic, "instance": post_process_instance}
        self.post_defaults: dict[str, Any] = {}
        if self.is_oneformer:
            from .processing import OneFormerProcessor

            folder = getattr(model, "source_folder", None)
            if folder is None:
                raise ValueError("this OneFormer was not loaded from a checkpoint folder, so its tokenizer is unknown")
            self.processor = OneFormerProcessor.from_pretrained(folder, class_info=class_info)
            self.post_defaults["model"] = "oneformer"
            info = self.processor.class_info
            if task == "panoptic" and info is not None:  # the original merges every stuff class into one segment
                self.post_defaults["label_ids_to_fuse"] = set(info.stuff_ids)
        else:  # the model's saved settings: the rule `maskformers evaluate` follows too
            self.processor = image_processor_for(model, say=say)
        self.post = post[task]
        self._warned_non_finite = False

    def _inputs(self, images: list[Any]) -> dict[str, Any]:
        if self.is_oneformer:
            return self.processor(images, self.task, device=self.device)
        return self.processor(images, device=self.device)

    def __call__(
        self,
        batch: list[tuple[Any, Any]],
        post_kwargs: dict[str, Any],
        failures: list[tuple[str, str]],
        warn: Callable[[str], None],
    ) -> list[Any]:
        images = [image for _, image in batch]
        try:
            inputs = self._inputs(images)
            keep = list(range(len(batch)))
        except ValueError:  # find the image(s) the processor refuses, keep the rest
            keep = []
            for i, (path, image) in enumerate(batch):
                try:
                    self._inputs([image])
                    keep.append(i)
                except ValueError as exc:
                    failures.append((str(path), str(exc)))
                    warn(f"skipped {path}: {exc}")
            if not keep:
                return [None] * len(batch)
            inputs = self._inputs([images[i] for i in keep])
        args = [inputs["pixel_values"].to(self.dtype)]
        if self.is_oneformer:
            args.append(inputs["task_inputs"])
        with torch.inference_mode():
            output = self.model(*args)
        if not (torch.isfinite(output.class_logits).all() and torch.isfinite(output.mask_logits).all()):
            for i in keep:
                failures.append((str(batch[i][0]), "the model's logits are not finite (NaN/Inf): damaged weights?"))
            if not self._warned_non_finite:
                self._warned_non_finite = True
                warn("warning: the model produced non-finite logits (NaN/Inf); its weights may be damaged. "
                     "Those images are reported as failed.")
            return [None] * len(batch)
        results = self.post(
            output.class_logits, output.mask_logits, input_size=inputs["pixel_values"].shape[-2:],
            image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"],
            **{**self.post_defaults, **post_kwargs},
        )
        out: list[Any] = [None] * len(batch)
        for i, result in zip(keep, results):
            out[i] = result
        return out
