"""``maskformers.finetune(model, data, out=...)``: the one fine-tuning entry point (``maskformers train`` calls it).

It does, in order: check the output folder (:mod:`.run_folder`); read the data (a reader of samples, a
:class:`~maskformers.training.data.TrainingDataset`, or a Hugging Face ``datasets.Dataset`` with ``id2label``);
derive what was not given from the data (the task: panoptic when the data has thing classes, else semantic;
the crop: the images' median size, capped at 1024) and print the settings; give the model a new class head
when its classes differ from the data's (seeded by ``seed``); attach the preprocessing it trains with and its
classes' thing/stuff split (:func:`~maskformers.processing.model_settings.training_processor_config`); write
``run_config.json``; train (:func:`~maskformers.training.loop.train`); save ``final/`` and, with validation
data, ``best/`` (the best evaluation's weights), each a folder ``maskformers segment`` / ``evaluate`` /
``from_pretrained`` / ``ImageProcessor.from_pretrained`` read.
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..processing.class_info import ClassInfo
from ..processing.model_settings import training_processor_config
from .config import TrainingConfig
from .data import TrainingDataset
from .finetune import match_class_head
from .loop import TrainResult, train
from .run_folder import check_run_folder, claim_run_folder, write_run_config

__all__ = ["finetune", "FinetuneResult", "as_reader", "typical_image_size", "default_crop_size", "default_task"]

MAX_DEFAULT_CROP = 1024


@dataclass
class FinetuneResult(TrainResult):
    final: Path | None = None  # the last step's model folder
    best_model: Path | None = None  # the best evaluation's model folder (validation data only)
    settings: dict[str, Any] | None = None  # what run_config.json holds


def as_reader(data: Any, *, id2label: Mapping[int, str] | None = None, image_column: str = "image",
              annotation_column: str = "annotation") -> Any:
    """The sample reader behind ``data``: a reader itself, a TrainingDataset's, or a ``datasets.Dataset`` (needs
    ``id2label``) read by :class:`~maskformers.training.readers_semantic.HFSegmentationDataset`."""
    if isinstance(data, TrainingDataset):
        return data.reader
    if hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets.Dataset
        if id2label is None:
            raise ValueError("a datasets.Dataset needs id2label={id: name} (its annotation column holds class ids)")
        from .readers_semantic import HFSegmentationDataset

        return HFSegmentationDataset(data, id2label=id2label, image_column=image_column,
                                     annotation_column=annotation_column)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__") and getattr(data, "id2label", None)):
        raise TypeError(f"data must be a reader of samples (with id2label), a TrainingDataset or a datasets.Dataset; "
                        f"got a {type(data).__name__}")
    return data


def typical_image_size(reader: Any, *, max_images: int = 64) -> tuple[int, int] | None:
    """Median (height, width) of the reader's images: from the annotation file's sizes (COCO), the image headers
    (semantic folders) or up to 8 samples read; None when none can be read."""
    sizes: list[tuple[int, int]] = []
    if isinstance(getattr(reader, "size", None), tuple):  # synthetic scenes
        sizes = [tuple(reader.size)]
    elif getattr(reader, "images", None) and all("height" in im and "width" in im for im in reader.images[:1]):
        sizes = [(int(im["height"]), int(im["width"])) for im in reader.images]
    elif getattr(reader, "pairs", None):
        import PIL.Image

        step = max(1, len(reader.pairs) // max_images)
        for image_path, _ in reader.pairs[::step]:
            try:
                with PIL.Image.open(image_path) as im:
                    sizes.append((im.height, im.width))
            except OSError:
                continue
    else:
        step = max(1, len(reader) // 8)
        for i in range(0, len(reader), step)[:8]:
            try:
                sizes.append(tuple(reader[i]["image"].shape[1:]))
            except Exception:  # noqa: BLE001 - a bad sample tells nothing about the size; training reports it
                continue
    if not sizes:
        return None
    return int(statistics.median(h for h, _ in sizes)), int(statistics.median(w for _, w in sizes))


def default_task(reader: Any) -> str:
    """panoptic when the data has thing classes, semantic otherwise (label maps: one segment per class)."""
    return "panoptic" if getattr(reader, "thing_ids", None) else "semantic"


def default_crop_size(size: tuple[int, int] | None, task: str) -> int:
    """The training crop for images of typical ``size``: its longest side (panoptic / instance: large-scale
    jitter fits the image into the crop) or shortest side (semantic: resized around the crop), rounded up to a
    multiple of 32, capped at :data:`MAX_DEFAULT_CROP`; the cap when the size is unknown."""
    if size is None:
        return MAX_DEFAULT_CROP
    side = min(size) if task == "semantic" else max(size)
    return int(min(MAX_DEFAULT_CROP, max(32, -(-side // 32) * 32)))


def _set_thing_ids(reader: Any, thing_ids: Iterable[int | str]) -> None:
    by_name = {str(v): int(k) for k, v in reader.id2label.items()}
    ids = set()
    for t in thing_ids:
        key = str(t)
        if key.lstrip("-").isdigit() and int(key) in reader.id2label:
            ids.add(int(key))
        elif key in by_name:
            ids.add(by_name[key])
        else:
            raise ValueError(f"thing_ids (--thing-ids): {t!r} is neither a class id nor a class name of the data "
                             f"({len(reader.id2label)} classes: 0..{len(reader.id2label) - 1})")
    reader.thing_ids = frozenset(ids)


def _training_config(config: TrainingConfig | None, overrides: dict[str, Any]) -> TrainingConfig:
    names = {f.name for f in fields(TrainingConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"finetune() got unknown argument(s) {unknown}; training settings are TrainingConfig fields: "
                        f"{sorted(names)}")
    return TrainingConfig.from_dict({**(config.to_dict() if config is not None else {}), **overrides})


def finetune(
    model: nn.Module | str,
    data: Any,
    *,
    out: str | Path,
    val_data: Any = None,
    config: TrainingConfig | None = None,
    crop_size: int | None = None,
    scale_range: tuple[float, float] = (0.1, 2.0),
    on_error: str = "raise",
    id2label: Mapping[int, str] | None = None,
    thing_ids: Iterable[int | str] | None = None,
    tokenizer: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict[str, Any]], Any] | None = None,
    on_eval: Callable[[int, dict[str, float]], Any] | None = None,
    device: str | None = None,
    progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
    **training: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` (a Mask2Former or OneFormer, or a hub id / folder / "builtin") on ``data``; see the
    module doc for what it does and writes.

    training: :class:`~maskformers.training.config.TrainingConfig` fields (``max_steps=200, batch_size=4,
    lr=1e-4, seed=0, eval_every=50, early_stopping_patience=3, freeze_backbone=True, ...``) over ``config``;
    ``task`` defaults to the data's (see :func:`default_task`). crop_size: the training crop (default: from the
    images, :func:`default_crop_size`). val_data: a reader (or ``datasets.Dataset``) evaluated every
    ``eval_every`` steps (default: every ``checkpoint_every``); the best evaluation becomes ``out/best``.
    on_error: "skip" skips unusable samples (listed, and the run stops past ``max_skip_rate``). thing_ids: ids
    or names of the thing classes (semantic data has none). tokenizer: a OneFormer's CLIP tokenizer (default:
    its checkpoint folder's). resume / overwrite: see :mod:`.run_folder`. on_step / on_eval: see
    :func:`~maskformers.training.loop.train`. run_info: extra entries for ``run_config.json`` (the CLI stores
    its options there).
    """
    from .distributed import barrier, setup

    info = setup(device)
    out = Path(out)
    mode = check_run_folder(out, resume=resume, overwrite=overwrite)
    model_source = model if isinstance(model, str) else getattr(model, "source_folder", None)
    if isinstance(model, str):
        from ..hub import from_pretrained
        from .builtin import load_builtin_model

        model = load_builtin_model() if model == "builtin" else from_pretrained(model)
    given_dataset = data if isinstance(data, TrainingDataset) else None
    reader = as_reader(data, id2label=id2label)
    if thing_ids is not None:
        _set_thing_ids(reader, thing_ids)
    if "task" not in training and (config is None or given_dataset is not None):
        training["task"] = (given_dataset.task or "panoptic") if given_dataset is not None else default_task(reader)
    if val_data is not None and "eval_every" not in training and not (config and config.eval_every):
        training["eval_every"] = (config or TrainingConfig()).checkpoint_every
    config = _training_config(config, training)
    typical = typical_image_size(reader)
    crop = crop_size or default_crop_size(typical, config.task)
    say = (lambda message: print(message, file=sys.stderr)) if info.is_main else (lambda message: None)

    match_class_head(model, reader.id2label, seed=config.seed, say=say)
    class_info = ClassInfo(names=tuple(str(reader.id2label[i]) for i in range(len(reader.id2label))),
                           thing_ids=frozenset(getattr(reader, "thing_ids", ()) or ()))
    dataset = given_dataset or _training_dataset(model, reader, config, crop, scale_range, on_error, tokenizer)
    _attach_processor_config(model, config.task, crop, class_info, dataset)
    global_batch = config.batch_size * config.grad_accumulation * info.world_size
    if len(dataset) < global_batch:
        raise ValueError(f"batch_size (--batch-size) {config.batch_size} x grad_accumulation {config.grad_accumulation}"
                         f" x {info.world_size} process(es) = {global_batch} images per step, but the data has "
                         f"{len(dataset)} sample(s): lower --batch-size")
    val_reader = None if val_data is None else as_reader(val_data, id2label=id2label or reader.id2label)
    if val_reader is not None and thing_ids is not None:
        _set_thing_ids(val_reader, thing_ids)

    settings = {
        **dict(run_info or {}),
        "model": {"source": None if model_source is None else str(model_source), "type": type(model).__name__,
                  "num_classes": model.num_classes, "id2label": {str(k): v for k, v in model.id2label.items()}},
        "data": {"reader": type(reader).__name__, "samples": len(reader), "typical_size": typical,
                 "thing_ids": sorted(class_info.thing_ids), "crop_size": crop, "scale_range": list(scale_range),
                 "on_error": dataset.on_error, "validation": None if val_reader is None else len(val_reader)},
        "training": config.to_dict(),
        "preprocessor_config": model.preprocessor_config,
    }
    say(f"settings: task {config.task}, {config.max_steps} steps, batch {config.batch_size}"
        + (f" x {config.grad_accumulation} accumulated" if config.grad_accumulation > 1 else "")
        + f", crop {crop}" + (f" (images typically {typical[0]}x{typical[1]})" if typical and not crop_size else "")
        + f", lr {config.lr:g}, warmup {config.warmup_steps}, seed {config.seed}, "
        + (f"evaluation every {config.eval_every} steps" if val_reader is not None and config.eval_every
           else "no evaluation") + f"; {len(dataset)} training samples; writing to {out}")
    barrier()  # every process has checked the folder before rank 0 changes it
    if info.is_main:
        moved = claim_run_folder(out, mode)
        if moved is not None:
            say(f"--overwrite: the earlier run in {out} moved to {moved}")
        write_run_config(out, settings, resumed=(run_info or {}).get("resumed", {}) if mode == "resume" else None)
    barrier()

    result = train(model, dataset, config=config, output_dir=out, val_dataset=val_reader, resume=mode == "resume",
                   device=device, progress=progress, on_step=on_step, on_eval=on_eval)
    final = best = None
    if info.is_main:
        final = model.save_pretrained(out / "final")
        if (out / "best.pt").is_file():
            state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
            best_model = copy.deepcopy(model).cpu()
            best_model.load_state_dict(state["model"])
            best = best_model.save_pretrained(out / "best")
        say(f"trained to step {result.step}; best: {result.best}; models in {final}" + (f" and {best}" if best else ""))
    barrier()
    return FinetuneResult(**{f.name: getattr(result, f.name) for f in fields(TrainResult)}, final=final,
                          best_model=best, settings=settings)


def _training_dataset(model: nn.Module, reader: Any, config: TrainingConfig, crop: int,
                      scale_range: tuple[float, float], on_error: str, tokenizer: Any) -> TrainingDataset:
    from .transforms import lsj_augmentation, semantic_augmentation

    if config.task == "semantic":
        transform = semantic_augmentation(crop, min_sizes=[int(crop * x / 10) for x in range(5, 21)],
                                          max_size=crop * 4, seed=config.seed)
    else:
        transform = lsj_augmentation(crop, scale_range=tuple(scale_range), seed=config.seed)
    if getattr(model, "task_encoder", None) is None:
        return TrainingDataset(reader, task=config.task, transform=transform, on_error=on_error)
    from .oneformer_data import OneFormerTrainingDataset, num_text_for

    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from .cli_data import UsageError, load_tokenizer

        try:
            tokenizer = load_tokenizer(None if tokenizer is None else str(tokenizer), model)
        except UsageError as exc:  # a ValueError from Python, not a SystemExit
            raise ValueError(str(exc).replace("--tokenizer", "tokenizer=")) from None
    mapper = getattr(model, "text_mapper", None)
    return OneFormerTrainingDataset(
        reader, tokenizer=tokenizer, num_text=num_text_for(model), transform=transform, on_error=on_error,
        seed=config.seed, task_seq_len=model.task_encoder.task_seq_len,
        text_seq_len=mapper.text_encoder.context_length if mapper is not None else 77)


def _attach_processor_config(model: nn.Module, task: str, crop: int, class_info: ClassInfo, dataset: Any) -> None:
    """What the saved folders carry beside the weights: the preprocessing trained with, the classes' names and
    thing ids; a OneFormer also its text settings and tokenizer files."""
    config = training_processor_config(task, crop, class_info)
    if getattr(model, "task_encoder", None) is not None:
        config.update(class_info_file=None, num_text=dataset.num_text, task_seq_length=dataset.task_seq_len,
                      max_seq_length=dataset.text_seq_len)
        model.extra_files = {**getattr(model, "extra_files", {}), **dataset.tokenizer.files()}
    model.preprocessor_config = config
