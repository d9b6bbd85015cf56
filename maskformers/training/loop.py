"""The training loop: ``train(model, dataset, config=..., output_dir=...)``.

One optimizer step = ``grad_accumulation`` micro-batches of ``batch_size`` images on each process.
The data order is a function of the step alone (a seeded permutation per epoch, sliced by step, micro-
batch and rank), augmentations are seeded per (epoch, index) and the criterion's points per (step,
index), so a run resumed from a checkpoint repeats the uninterrupted run exactly (bit for bit on one
CPU process), and N processes compute the same update as one process with the same global batch.

A OneFormer trains on a :class:`~maskformers.training.oneformer_data.OneFormerTrainingDataset`: its task (and
text) inputs reach the model, and with a text mapper the criterion adds the contrastive term (:func:`criterion_for`).

Samples a :class:`~maskformers.training.data.TrainingDataset` with ``on_error="skip"`` could not use are listed
with their reason (on the console, in ``log.jsonl`` as ``{"step", "skipped": [{"index", "reason"}]}`` and in
:attr:`TrainResult.skipped_samples`); once more than ``config.max_skip_rate`` of the dataset proved unusable the
run stops with :class:`TooManySkipped`. Evaluations are printed as they are computed. ``on_step`` /
``on_eval`` callbacks and ``config.early_stopping_patience`` can end a run early (its last checkpoint is then
written at that step).

Outputs in ``output_dir``: ``log.jsonl`` (one record per logged step and per evaluation; rank 0),
``checkpoint-*.pt`` (see :mod:`.checkpoint`), ``best.pt`` (the model of the best evaluation),
TensorBoard events when ``tensorboard`` is installed. A tqdm progress bar shows loss, lr and images/s.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import TrainingConfig
from .criterion import MaskFormerCriterion, _mix
from .data import MODEL_INPUTS, TrainingDataset, collate
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, gather_objects, setup
from .finetune import labels_mismatch
from .matcher import HungarianMatcher
from .optim import build_optimizer, build_scheduler
from .run_log import JsonlLog
from .skipped import SkippedSamples, TooManySkipped

__all__ = ["train", "TrainResult", "TooManySkipped", "build_criterion", "criterion_for", "batch_indices",
           "MAIN_METRIC"]

MAIN_METRIC = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


@dataclass
class TrainResult:
    step: int
    losses: list[dict[str, float]] = field(default_factory=list)  # logged records of this call
    best: dict[str, Any] | None = None
    skipped: int = 0  # skipped draws (a bad sample drawn in two epochs counts twice)
    skipped_samples: dict[int, str] = field(default_factory=dict)  # dataset index -> reason, each bad sample once
    stopped: str | None = None  # why the run ended before config.max_steps (early stopping, a callback)


def criterion_for(model: nn.Module, config: TrainingConfig) -> MaskFormerCriterion:
    """The criterion of ``model``: Mask2Former's losses, plus OneFormer's contrastive term (weight
    ``config.contrastive_weight``, temperature ``config.contrastive_temperature``) when it has a text mapper."""
    if getattr(model, "text_mapper", None) is None:
        return build_criterion(config, num_classes=model.num_classes)
    from .contrastive import ContrastiveLoss

    return build_criterion(config, num_classes=model.num_classes,
                           extra_terms={"contrastive": ContrastiveLoss(temperature=config.contrastive_temperature)},
                           extra_weights={"loss_contrastive": config.contrastive_weight})


def build_criterion(config: TrainingConfig, num_classes: int, extra_terms: dict[str, nn.Module] | None = None,
                    extra_weights: dict[str, float] | None = None) -> MaskFormerCriterion:
    weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
               "loss_dice": config.dice_weight, **(extra_weights or {})}
    matcher = HungarianMatcher(cost_class=config.class_weight, cost_mask=config.mask_weight,
                               cost_dice=config.dice_weight, num_points=config.num_points)
    return MaskFormerCriterion(num_classes=num_classes, matcher=matcher, no_object_weight=config.no_object_weight,
                               num_points=config.num_points, oversample_ratio=config.oversample_ratio,
                               importance_sample_ratio=config.importance_sample_ratio, weights=weights,
                               extra_terms=extra_terms)


def batch_indices(step: int, micro: int, *, num_samples: int, config: TrainingConfig, rank: int = 0,
                  world_size: int = 1) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of one micro-batch: global batch ``step`` of the epoch's permutation, the
    slice of micro-batch ``micro`` on ``rank``. Incomplete global batches at an epoch's end are dropped."""
    b = config.batch_size
    global_batch = b * config.grad_accumulation * world_size
    per_epoch = num_samples // global_batch
    if per_epoch < 1:
        raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch}")
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(_mix(config.seed, epoch)))
    start = offset * global_batch + (micro * world_size + rank) * b
    return epoch, order[start:start + b].tolist()


def _state(model, optimizer, scheduler, scaler, criterion, step, config, best) -> dict[str, Any]:
    module = model.module if hasattr(model, "module") else model
    model_config = getattr(module, "config", None)
    return {
        "model": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "criterion": criterion.state_dict(),
        "step": step, "rng": ckpt.rng_state(), "training_config": config.to_dict(), "best": best,
        "model_config": model_config.to_dict() if hasattr(model_config, "to_dict") else None,
        "id2label": dict(getattr(module, "id2label", {}) or {}),
    }


def train(
    model: nn.Module,
    dataset: Any,
    *,
    config: TrainingConfig,
    output_dir: str | Path | None = None,
    val_dataset: Any = None,
    resume: bool = False,
    criterion: MaskFormerCriterion | None = None,
    device: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    evaluate_fn: Callable[..., dict[str, float]] | None = None,
    on_step: Callable[[dict[str, Any]], Any] | None = None,
    on_eval: Callable[[int, dict[str, float]], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (a :class:`~maskformers.training.data.TrainingDataset`).

    output_dir: where logs and checkpoints go (None: neither). resume: continue from the newest readable
    checkpoint in ``output_dir`` (falling back to an older one with a warning). stop_after: return after
    this many steps of this call (the schedule still runs to ``config.max_steps``). evaluate_fn:
    ``evaluate_fn(model, val_dataset, task=...)`` -> metrics (default: maskformers.evaluation).
    on_step: ``on_step(record)`` after every optimizer step (``{"step", "lr", "loss", each loss term}``, rank 0);
    on_eval: ``on_eval(step, metrics)`` after every evaluation (rank 0); either returning True ends the run
    after that step. Under torchrun the model is wrapped in DistributedDataParallel; rank 0 writes logs and
    checkpoints.

    The model is trained as it is: data of other classes than the model's is refused (use
    :func:`maskformers.finetune`, which gives the model a new class head, or
    :func:`~maskformers.training.finetune.replace_class_head`).
    """
    if not isinstance(dataset, TrainingDataset):
        what = "a reader of samples" if hasattr(dataset, "id2label") else "not a TrainingDataset"
        raise TypeError(f"train() takes a TrainingDataset (samples with their targets and augmentation); got a "
                        f"{type(dataset).__name__}, {what}. Wrap it: TrainingDataset(reader, task=..., transform=...), "
                        "or call maskformers.finetune(model, reader, out=...), which builds it")
    info: DistInfo = setup(device)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    check = getattr(dataset, "check_model", None)
    if check is not None:
        check(model)
    elif getattr(model, "task_encoder", None) is not None:
        raise ValueError("a OneFormer trains on a OneFormerTrainingDataset (maskformers.training.oneformer_data), "
                         f"which gives its task and text inputs; got a {type(dataset).__name__}")
    problem = labels_mismatch(model, dataset.id2label, dataset.num_classes)
    if problem is not None:
        raise ValueError(f"{problem}: train() does not change the model. maskformers.finetune(model, data, ...) "
                         "gives it a new class head for the data's classes (as `maskformers train` does), or call "
                         "maskformers.training.finetune.replace_class_head(model, dataset.id2label) first")
    if config.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    model = model.to(info.device)
    if criterion is None:
        criterion = criterion_for(model, config)
    criterion = criterion.to(info.device)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                backbone_lr_multiplier=config.backbone_lr_multiplier, extra_modules=[criterion])
    scheduler = build_scheduler(optimizer, max_steps=config.max_steps, power=config.poly_power,
                                warmup_steps=config.warmup_steps, warmup_factor=config.warmup_factor)
    scaler = torch.amp.GradScaler(info.device.type) if config.amp == "fp16" else None
    step, best, skipped_before = 0, None, {}
    if resume:
        if out is None:
            raise ValueError("resume=True needs output_dir")
        found = ckpt.load_latest(out)
        if found is not None:
            state, path = found
            ckpt.check_fits(model, state["model"], path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            criterion.load_state_dict(state.get("criterion", {}), strict=False)
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            ckpt.set_rng_state(state["rng"])
            step, best = int(state["step"]), state.get("best")
            skipped_before = dict(state.get("skipped_samples") or {})
    ddp = model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    log = JsonlLog(out / "log.jsonl" if out is not None and info.is_main else None, step)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp or "")
    skipped = SkippedSamples(len(dataset), config.max_skip_rate, known=skipped_before,
                             log_path=out / "log.jsonl" if out is not None else None)
    result = TrainResult(step=step, best=best, skipped_samples=skipped.reasons)
    last_steps = config.max_steps if stop_after is None else min(config.max_steps, step + stop_after)
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    plan = [batch_indices(st, micro, num_samples=len(dataset), config=config, rank=info.rank,
                          world_size=info.world_size) for st in range(step, last_steps)
            for micro in range(config.grad_accumulation)]
    loader = torch.utils.data.DataLoader(_EpochIndexed(dataset), collate_fn=list, num_workers=config.num_workers,
                                         batch_sampler=[[(e, i) for i in idx] for e, idx in plan])
    batches = iter(loader)
    tic, images = time.perf_counter(), 0

    def say(message: str) -> None:
        if info.is_main:
            (bar.write if bar is not None else print)(message, file=sys.stderr)

    evals_since_best = 0
    try:
        while step < last_steps:
            model.train()
            terms: dict[str, float] = {}
            micro_batches = []
            bad: list[tuple[int, str]] = []
            for _ in range(config.grad_accumulation):
                fetched = next(batches)  # [(index, (sample, target) or (None, reason))]
                batch = collate([item for _, item in fetched])
                bad += [(i, item[1]) for i, item in fetched if item[0] is None]
                keys = [_mix(config.seed, step, i) for i, (sample, _) in fetched if sample is not None]
                micro_batches.append((batch, keys))
            counts = _step_target_counts([b for b, _ in micro_batches])
            for micro, (batch, keys) in enumerate(micro_batches):
                last = micro == config.grad_accumulation - 1
                sync = contextlib.nullcontext() if last or ddp is model else ddp.no_sync()
                with sync:
                    loss, parts = _micro_step(ddp, criterion, batch, keys, counts, info.device, autocast_dtype)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                images += len(batch["targets"])
                for k, v in parts.items():  # each micro-batch holds its share of the step's normalised loss
                    terms[k] = terms.get(k, 0.0) + v
            _average_criterion_grads(criterion, info.world_size)
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = None
            if config.clip_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm))
            lr = max(g["lr"] for g in optimizer.param_groups)  # the base rate (heads)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            values = all_reduce_mean(torch.tensor([terms[k] for k in sorted(terms)], dtype=torch.float64))
            terms = dict(zip(sorted(terms), values.tolist()))
            bad = gather_objects(bad)
            if bad:
                result.skipped += len(bad)
                skipped.add(bad, step, log.write, say)  # raises TooManySkipped past config.max_skip_rate
            if step % config.log_every == 0 or step == last_steps:
                elapsed = time.perf_counter() - tic
                record = {"step": step, "lr": lr, "loss": terms["loss"],
                          **{k: v for k, v in terms.items() if k != "loss"},
                          "images_per_s": images * info.world_size / max(elapsed, 1e-9)}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record)
                result.losses.append(record)
                tic, images = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{record['images_per_s']:.1f}")
            if bar is not None:
                bar.update(1)
            stop = None
            if on_step is not None and info.is_main and on_step({"step": step, "lr": lr, **terms}):
                stop = "on_step asked to stop"

            if val_dataset is not None and config.eval_every and (step % config.eval_every == 0 or step == last_steps):
                metrics = _evaluate(model, val_dataset, config.task, info, evaluate_fn,
                                    tokenizer=getattr(dataset, "tokenizer", None))
                if info.is_main:
                    main = metrics.get(MAIN_METRIC[config.task])
                    log.write({"step": step, "eval": metrics})
                    say(f"step {step} eval: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                                          if isinstance(v, float) and not k.startswith("n")))
                    evals_since_best += 1
                    if on_eval is not None and on_eval(step, metrics):
                        stop = "on_eval asked to stop"
                    if main is not None and (best is None or main > best["value"]):
                        evals_since_best = 0
                        best = {"step": step, "metric": MAIN_METRIC[config.task], "value": main}
                        if out is not None:
                            module = model.module if hasattr(model, "module") else model
                            ckpt.atomic_save({"model": module.state_dict(), "best": best,
                                              "id2label": dict(getattr(module, "id2label", {}) or {})},
                                             out / "best.pt")
                    result.best = best
                    if config.early_stopping_patience and evals_since_best >= config.early_stopping_patience:
                        stop = (f"early stopping: {MAIN_METRIC[config.task]} did not improve on step {best['step']}'s "
                                f"{best['value']:.2f} in {evals_since_best} evaluations")
                tic = time.perf_counter()  # images/s measures training, not evaluation
            stop = broadcast_object(stop)
            if out is not None and (step % config.checkpoint_every == 0 or step == last_steps or stop):
                if info.is_main:
                    state = _state(model, optimizer, scheduler, scaler, criterion, step, config, best)
                    per_epoch = len(dataset) // (config.batch_size * config.grad_accumulation * info.world_size)
                    state["data_position"] = {"epoch": step // per_epoch, "batch_in_epoch": step % per_epoch,
                                              "world_size": info.world_size}  # the next step's batch
                    state["skipped_samples"] = dict(result.skipped_samples)
                    ckpt.save_checkpoint(out, state, keep=config.keep_checkpoints)
                barrier()
            if stop:
                result.stopped = stop
                say(f"stopped at step {step}: {stop}")
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
    result.step = step
    if result.skipped_samples:
        say(skipped.summary(result.skipped))
    return result


class _EpochIndexed(torch.utils.data.Dataset):
    """Items addressed by (epoch, index): sets the augmentation's epoch first (works in worker processes)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key
        for part in (self.dataset, getattr(self.dataset, "transform", None)):  # task draws, augmentation
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        return index, self.dataset[index]


def _step_target_counts(batches: list[dict[str, Any]]) -> list[int]:
    """Target counts of every image of the step, over the micro-batches of every process."""
    return gather_objects([int(t["labels"].numel()) for b in batches for t in b["targets"]])


def _average_criterion_grads(criterion: nn.Module, world_size: int) -> None:
    """Average the gradients of the criterion's parameters (OneFormer's logit scale) over processes, as DDP does
    for the model's: they are outside DDP, and each process would otherwise step its own copy apart."""
    if world_size > 1:
        for p in criterion.parameters():
            p.grad = all_reduce_mean(p.grad if p.grad is not None else torch.zeros_like(p))


def _micro_step(model, criterion, batch, keys, counts, device, autocast_dtype):
    """(total loss, {"loss": float, each term (summed over auxiliary levels): float}) of one micro-batch."""
    if not batch["targets"]:  # every sample skipped: a zero loss that still touches every parameter (DDP)
        loss = sum(p.sum() for p in model.parameters()) * 0.0
        return loss, {"loss": 0.0}
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}  # OneFormer's prompts
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        outputs = model(pixel_values, **inputs)
    losses = criterion(outputs, targets, image_keys=keys, step_target_counts=counts)
    total = criterion.total(losses)
    if not math.isfinite(float(total.detach())):
        raise FloatingPointError(f"non-finite training loss {float(total)}: "
                                 + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
    parts = {"loss": float(total.detach())}
    for k, v in losses.items():
        base = k.rstrip("0123456789").rstrip("_") if k[-1].isdigit() else k
        parts[base] = parts.get(base, 0.0) + float(v.detach())
    return total, parts


def _evaluate(model, dataset, task, info, evaluate_fn, tokenizer=None):
    module = model.module if hasattr(model, "module") else model
    if evaluate_fn is None:
        from ..evaluation.evaluate import evaluate_model as evaluate_fn
    extra = {} if tokenizer is None else {"tokenizer": tokenizer}  # OneFormer's task prompts
    was_training = module.training
    module.eval()
    try:
        metrics = evaluate_fn(module, dataset, task=task, device=info.device, **extra) if info.is_main else {}
    finally:
        module.train(was_training)
    barrier()
    return metrics
