"""OneFormer's training data: a task drawn per image, that task's targets, the task prompt and the text inputs.

It follows the original's unified dataset mapper (SHI-Labs OneFormer, ``OneFormerUnifiedDatasetMapper``):

- the task: ``u ~ U[0, 1)`` per image; semantic when ``u < semantic_prob`` (0.33), instance when
  ``u < instance_prob`` (0.66: a cumulative threshold, as ``INPUT.TASK_PROB.INSTANCE`` is read), panoptic
  otherwise, i.e. probabilities 0.33 / 0.33 / 0.34 (:func:`draw_task`);
- the targets: crowd segments and segments left empty by the augmentation are dropped for every task, then
  the processor's rule :func:`~maskformers.processing.oneformer_processor.task_targets` (semantic: one mask
  per class, in order of first appearance; instance: thing classes only; panoptic: every segment). Unlike
  Mask2Former's semantic targets (:func:`~maskformers.training.data.targets_for_task`), crowd regions are
  left out of the semantic masks too, as the unified mapper does;
- ``task_inputs`` (task_seq_len,): the CLIP ids of ``"the task is {task}"`` (the original writes "The task
  is ...", which the tokenizer lowercases to the same ids);
- ``text_inputs`` (num_text, text_seq_len): ``"a photo with a {name}"`` once per kept segment in class-id
  order, padded with the task's placeholder ("a semantic photo", ...) to ``num_text = num_queries - n_ctx``
  prompts (:func:`num_text_for`), only when the model has a text mapper (``num_text`` given).

The draw of image ``index`` in epoch ``e`` comes from a generator seeded by ``(seed, e, index)``, so a resumed
run, any number of workers and any process split draw the same tasks. The training loop sets the epoch
(:meth:`OneFormerTrainingDataset.set_epoch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..processing.class_info import ClassInfo, load_class_info
from ..processing.clip_tokenizer import CLIPTokenizer
from ..processing.oneformer_processor import OneFormerProcessor, task_targets
from .criterion import _mix
from .data import Sample, TrainingDataset

__all__ = ["draw_task", "oneformer_targets", "num_text_for", "OneFormerTrainingDataset", "SEMANTIC_PROB",
           "INSTANCE_PROB"]

SEMANTIC_PROB = 0.33  # the original's INPUT.TASK_PROB.SEMANTIC
INSTANCE_PROB = 0.66  # INPUT.TASK_PROB.INSTANCE: a cumulative threshold
_TASK_STREAM = 0x7A5C  # keeps the task draws apart from the augmentation's and the criterion's seeds


def draw_task(u: float, *, semantic_prob: float = SEMANTIC_PROB, instance_prob: float = INSTANCE_PROB) -> str:
    """The original's choice of task for a uniform draw ``u`` in [0, 1)."""
    if u < semantic_prob:
        return "semantic"
    if u < instance_prob:
        return "instance"
    return "panoptic"


def oneformer_targets(
    sample: Mapping[str, Any], task: str, class_info: ClassInfo, num_text: int = 0
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({"labels": (N,), "masks": (N, H, W) bool}, text prompts)`` of ``sample`` for ``task`` (see the module doc);
    ``num_text`` 0 gives no prompts."""
    masks, labels, crowd = sample["masks"].bool(), sample["labels"], sample["iscrowd"].bool()
    keep = ~crowd & masks.flatten(1).any(1)
    masks, labels, texts = task_targets(masks[keep], labels[keep], task, class_info, num_text)
    return {"labels": labels, "masks": masks}, texts


def num_text_for(model: torch.nn.Module) -> int | None:
    """The number of text prompts per image a OneFormer's contrastive loss pairs with its queries
    (``num_queries - n_ctx``), or None when it has no text mapper."""
    mapper = getattr(model, "text_mapper", None)
    if mapper is None:
        return None
    n_ctx = mapper.prompt_ctx.num_embeddings if mapper.prompt_ctx is not None else 0
    return model.num_queries - n_ctx


class OneFormerTrainingDataset(TrainingDataset):
    """A reader + an augmentation, giving ``(sample, target)`` pairs for a OneFormer: the target holds
    ``labels``, ``masks``, ``task`` (str), ``task_inputs`` (task_seq_len,) int64 and, with ``num_text``,
    ``text_inputs`` (num_text, text_seq_len) int64; :func:`~maskformers.training.data.collate` batches them.

    task: None draws one per image as the original (``semantic_prob`` / ``instance_prob``); a task name
    trains that task alone. class_info: class names and thing ids for the prompts and the instance targets
    (default: the reader's ``id2label`` and ``thing_ids``). tokenizer: a :class:`~maskformers.processing.CLIPTokenizer`.
    """

    def __init__(
        self,
        reader: Sequence[Sample],
        *,
        tokenizer: CLIPTokenizer,
        num_text: int | None = None,
        task: str | None = None,
        class_info: ClassInfo | Mapping[str, Any] | str | None = None,
        transform: Callable[[Sample, int], Sample] | None = None,
        on_error: str = "raise",
        semantic_prob: float = SEMANTIC_PROB,
        instance_prob: float = INSTANCE_PROB,
        seed: int = 0,
        task_seq_len: int = 77,
        text_seq_len: int = 77,
        num_classes: int | None = None,
        thing_ids: Iterable[int] | None = None,
    ) -> None:
        if class_info is not None:
            class_info = load_class_info(class_info)
            num_classes = len(class_info.names) if num_classes is None else num_classes
            thing_ids = class_info.thing_ids if thing_ids is None else thing_ids
        super().__init__(reader, task=task or "panoptic", transform=transform, on_error=on_error,
                         num_classes=num_classes, thing_ids=thing_ids)
        self.task = task  # None: drawn per image
        if not 0.0 <= semantic_prob <= instance_prob <= 1.0:
            raise ValueError(f"expected 0 <= semantic_prob <= instance_prob <= 1 (cumulative thresholds), got "
                             f"semantic_prob={semantic_prob}, instance_prob={instance_prob}")
        if num_text is not None and (isinstance(num_text, bool) or not isinstance(num_text, int) or num_text < 1):
            raise ValueError(f"num_text must be a positive int or None, got {num_text!r}")
        if class_info is None:
            names = [self.id2label.get(i) for i in range(self.num_classes)]
            if None in names:
                raise ValueError(f"the reader's id2label does not name every class 0..{self.num_classes - 1}; "
                                 "pass class_info")
            class_info = ClassInfo(names=tuple(str(n) for n in names), thing_ids=self.thing_ids)
        self.class_info = load_class_info(class_info)
        if len(self.class_info.names) != self.num_classes:
            raise ValueError(f"class_info names {len(self.class_info.names)} classes, the dataset has "
                             f"{self.num_classes}")
        self.thing_ids = self.class_info.thing_ids
        self.processor = OneFormerProcessor(tokenizer=tokenizer, class_info=self.class_info, num_text=num_text,
                                            task_seq_length=task_seq_len, max_seq_length=text_seq_len)
        self.tokenizer, self.num_text = tokenizer, num_text
        self.task_seq_len, self.text_seq_len = task_seq_len, text_seq_len
        self.semantic_prob, self.instance_prob, self.seed = semantic_prob, instance_prob, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def task_of(self, index: int) -> str:
        """The task of image ``index`` in the current epoch."""
        if self.task is not None:
            return self.task
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index, _TASK_STREAM))
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        return draw_task(u, semantic_prob=self.semantic_prob, instance_prob=self.instance_prob)

    def make_target(self, sample: Sample, index: int) -> dict[str, Any]:
        task = self.task_of(index)
        target, texts = oneformer_targets(sample, task, self.class_info, self.num_text or 0)
        target["task"] = task
        target["task_inputs"] = self.processor.task_inputs(task, 1)[0]
        if self.num_text is not None:
            target["text_inputs"] = self.tokenizer(texts, context_length=self.text_seq_len)
        return target

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise a ValueError naming the mismatch unless ``model`` is a OneFormer these inputs fit."""
        encoder = getattr(model, "task_encoder", None)
        if encoder is None:
            raise ValueError(f"OneFormerTrainingDataset gives task and text inputs for a OneFormer, got a "
                             f"{type(model).__name__}: use TrainingDataset")
        if encoder.task_seq_len != self.task_seq_len:
            raise ValueError(f"the model's task encoder reads {encoder.task_seq_len} task tokens, the dataset gives "
                             f"task_seq_len={self.task_seq_len}")
        expected = num_text_for(model)
        if expected is None and self.num_text is not None:
            raise ValueError("the model has no text mapper (with_text_mapper=False): build the dataset with "
                             "num_text=None, or the model with a text mapper")
        if expected is not None:
            if self.num_text != expected:
                raise ValueError(f"the model pairs {expected} text prompts (num_queries - text_n_ctx) with its "
                                 f"queries, the dataset gives num_text={self.num_text}")
            length = model.text_mapper.text_encoder.context_length
            if length != self.text_seq_len:
                raise ValueError(f"the model's text encoder reads {length} tokens, the dataset gives "
                                 f"text_seq_len={self.text_seq_len}")
        if model.num_classes != self.num_classes:
            raise ValueError(f"the model predicts {model.num_classes} classes, the dataset has {self.num_classes}")
