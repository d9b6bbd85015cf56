"""Run a model over a dataset and compute the standard metrics of a task.

Images are preprocessed by the model's own settings (:func:`~maskformers.processing.model_settings.
image_processor_for`: its ``preprocessor_config``, the rule ``maskformers segment`` follows too), one batch
holding images of one resized size only, so an image's prediction does not depend on its batch; predictions
go through the project's post-processing, and:

- panoptic: PQ / SQ / RQ (all, things, stuff) against the samples' segments (crowd segments respected);
- semantic: mIoU (with fwIoU and pixel accuracy) against the class map (uncovered pixels ignored);
- instance: COCO mask AP (pycocotools) against the thing segments.

``tasks`` may ask for several metrics from one model (a panoptic model is usually also scored on mIoU
and AP, as in the Mask2Former paper); the instance and semantic metrics then use the model's own
instance and semantic post-processing.

A OneFormer runs once per metric with that metric's task prompt (panoptic for PQ, semantic for mIoU,
instance for AP: ``"the task is {task}"`` through its CLIP tokenizer) and OneFormer's post-processing
(``model="oneformer"`` in :mod:`maskformers.processing.postprocess`): stuff classes fused into one segment
per class for PQ, as the original's panoptic inference; for AP every top-k (query, class) pair of a thing
class (the original's ``is_demo=False`` with its thing filter).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..processing import post_process_instance, post_process_panoptic, post_process_semantic
from ..processing.model_settings import image_processor_for
from ..training.data import panoptic_map, semantic_map
from .coco_ap import MaskAP
from .panoptic_quality import PanopticQuality
from .semantic_iou import SemanticIoU

__all__ = ["evaluate_model", "format_table", "format_per_class"]

def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    task: str = "panoptic",
    tasks: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    thing_ids: Iterable[int] | None = None,
    batch_size: int = 4,
    threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    ignore_index: int = 255,
    progress: bool = False,
    limit: int | None = None,
    tokenizer: Any = None,
    per_class: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (a reader of samples, or a TrainingDataset: its reader is used).

    threshold / overlap_threshold: panoptic post-processing (the original's 0.8 / 0.8; predictions scoring
    under ``threshold`` are dropped, which can drop every prediction of a young model). tokenizer: a
    OneFormer's :class:`~maskformers.processing.CLIPTokenizer` (default: the one in the folder the model was
    loaded from). Returns a flat dict: "PQ", "SQ", "RQ", "PQ_th", ... / "mIoU", "fwIoU", "pACC" / "AP",
    "AP50", ... (percent; None where there is nothing to measure, e.g. "PQ_th" without thing classes).
    per_class adds "per_class": {class id: {"PQ", "SQ", "RQ", "TP", "FP", "FN" / "IoU", "ACC" / "AP"}} for
    every class of the model (None where a class was not measured: absent from ground truth and predictions,
    or AP of a stuff class) and, for semantic, "confusion": (num_classes, num_classes) counts as nested
    lists, rows ground truth, columns prediction.
    """
    reader = getattr(dataset, "reader", dataset)
    thing_ids = frozenset(thing_ids if thing_ids is not None else getattr(reader, "thing_ids", ()))
    num_classes = model.num_classes
    tasks = list(tasks or [task])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = _task_prompts(model, tokenizer)  # None for Mask2Former
    post: dict[str, Any] = {} if prompts is None else {"model": "oneformer"}
    fuse = set(range(num_classes)) - thing_ids if prompts is not None else None
    pq = PanopticQuality(num_classes=num_classes, thing_ids=thing_ids) if "panoptic" in tasks else None
    miou = SemanticIoU(num_classes=num_classes, ignore_index=ignore_index) if "semantic" in tasks else None
    ap = MaskAP(class_ids=sorted(thing_ids)) if "instance" in tasks else None
    n = len(reader) if limit is None else min(limit, len(reader))
    processor = image_processor_for(model, say=lambda message: print(message, file=sys.stderr))
    batches = _same_size_batches((reader[i] for i in range(n)), processor, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for samples in batches:
            inputs = processor([s["image"] for s in samples], device=device)
            pixel_values = inputs["pixel_values"]
            predict = _predictor(model, pixel_values, prompts)
            sizes = [tuple(s["image"].shape[1:]) for s in samples]
            common = dict(input_size=tuple(pixel_values.shape[-2:]), image_sizes=inputs["image_sizes"].tolist(),
                          target_sizes=sizes, **post)
            if pq is not None:
                results = post_process_panoptic(*predict("panoptic"), threshold=threshold, label_ids_to_fuse=fuse,
                                                overlap_mask_area_threshold=overlap_threshold, **common)
                for s, r in zip(samples, results):
                    gt, gt_segments = panoptic_map(s)
                    pq.update(r["segmentation"].cpu(), r["segments_info"], gt, gt_segments)
            if miou is not None:
                for s, r in zip(samples, post_process_semantic(*predict("semantic"), **common)):
                    miou.update(r.cpu(), semantic_map(s, ignore_index))
            if ap is not None:
                things = torch.tensor(sorted(thing_ids), dtype=torch.int64)
                instance = dict(threshold=0.0) if prompts is None else dict(threshold=None, thing_ids=thing_ids)
                for s, r in zip(samples, post_process_instance(*predict("instance"), return_masks=True, **instance,
                                                               **common)):
                    keep = [k for k, seg in enumerate(r["segments_info"]) if seg["label_id"] in thing_ids]
                    labels = torch.tensor([r["segments_info"][k]["label_id"] for k in keep], dtype=torch.int64)
                    scores = torch.tensor([r["segments_info"][k]["score"] for k in keep], dtype=torch.float64)
                    is_thing = torch.isin(s["labels"], things)
                    ap.update(r["masks"][keep].cpu(), labels, scores, s["masks"][is_thing], s["labels"][is_thing],
                              s["iscrowd"][is_thing])
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = {}
    classes: dict[int, dict[str, Any]] = {c: {} for c in range(num_classes)}
    for metric, keys in ((pq, ("PQ", "SQ", "RQ", "TP", "FP", "FN")), (miou, ("IoU", "ACC")), (ap, ("AP",))):
        if metric is None:
            continue
        result = metric.compute()
        measured = result.pop("per_class")
        for c, row in classes.items():
            row.update({k: measured.get(c, {}).get(k) for k in keys})
        confusion = result.pop("confusion", None)
        if per_class and confusion is not None:
            metrics["confusion"] = confusion.tolist()
        metrics.update(result)
    if per_class:
        metrics["per_class"] = classes
    return metrics


def _same_size_batches(samples: Iterable[dict[str, Any]], processor: Any, batch_size: int):
    """Lists of at most ``batch_size`` consecutive samples whose images the processor resizes to one size."""
    batch: list[dict[str, Any]] = []
    key = None
    for sample in samples:
        size = processor.output_size(*sample["image"].shape[1:])
        if batch and (size != key or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(sample)
        key = size
    if batch:
        yield batch


def _task_prompts(model: torch.nn.Module, tokenizer: Any) -> Callable[[str, int], torch.Tensor] | None:
    """For a OneFormer, ``prompts(task, batch)`` -> (batch, task_seq_len) ids; None for other models."""
    encoder = getattr(model, "task_encoder", None)
    if encoder is None:
        return None
    from ..processing.oneformer_processor import OneFormerProcessor

    if tokenizer is None:
        from ..processing.clip_tokenizer import CLIPTokenizer

        folder = getattr(model, "source_folder", None)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(folder) if folder is not None else None
        except FileNotFoundError:
            tokenizer = None
        if tokenizer is None:
            raise ValueError("evaluating a OneFormer needs its CLIP tokenizer for the task prompts: pass tokenizer= "
                             "(maskformers.processing.CLIPTokenizer), or load the model from a checkpoint folder "
                             f"holding vocab.json + merges.txt (this one came from {folder})")
    return OneFormerProcessor(tokenizer=tokenizer, task_seq_length=encoder.task_seq_len).task_inputs


def _predictor(model: torch.nn.Module, pixel_values: torch.Tensor, prompts: Any) -> Callable[[str], tuple]:
    """``predict(task)`` -> float32 (class_logits, mask_logits) of the batch: one forward pass for a
    Mask2Former, one per task (its prompt) for a OneFormer, each run once."""
    cache: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def predict(task: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = None if prompts is None else task
        if key not in cache:
            args = [pixel_values] if prompts is None else [pixel_values, prompts(task, len(pixel_values))
                                                          .to(pixel_values.device)]
            with torch.inference_mode():
                out = model(*args)
            cache[key] = (out.class_logits.float(), out.mask_logits.float())
        return cache[key]

    return predict


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict[str, Any]) -> str:
    """A two-row plain-text table of the scalar metrics (numbers to two decimals, "n/a" for None)."""
    keys = [k for k, v in metrics.items() if not isinstance(v, (dict, list))]
    cells = [_cell(metrics[k]) for k in keys]
    widths = [max(len(k), len(c)) for k, c in zip(keys, cells)]
    return "\n".join(["  ".join(k.rjust(w) for k, w in zip(keys, widths)),
                      "  ".join(c.rjust(w) for c, w in zip(cells, widths))])


def format_per_class(metrics: dict[str, Any], id2label: Mapping[int, str], *, max_confusion: int = 20) -> str:
    """A table with a row per class (the ``per_class`` entries of :func:`evaluate_model` with
    ``per_class=True``; "n/a" where a class has no number) and, for up to ``max_confusion`` classes, the
    confusion matrix in percent of each ground-truth row."""
    rows = metrics.get("per_class", {})
    columns = [c for c in ("PQ", "SQ", "RQ", "TP", "FP", "FN", "IoU", "ACC", "AP")
               if any(c in r for r in rows.values())]
    table = [["id", "class", *columns]]
    table += [[str(c), id2label.get(c, f"class {c}"), *(_cell(r.get(k)) for k in columns)] for c, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    confusion = metrics.get("confusion")
    if confusion is not None:
        n = len(confusion)
        if n > max_confusion:
            lines.append(f"confusion matrix ({n} x {n}): in the JSON (--json)")
        else:
            lines.append("confusion matrix, % of each ground-truth class's pixels (rows: ground truth, "
                         "columns: prediction)")
            lines.append("      " + "".join(f"{j:>6}" for j in range(n)))
            for i, row in enumerate(confusion):
                total = sum(row)
                lines.append(f"{i:>6}" + "".join(f"{100 * v / total:6.1f}" if total else f"{'-':>6}" for v in row))
    return "\n".join(lines)
