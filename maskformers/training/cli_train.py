"""``maskformers train``: train or fine-tune a Mask2Former or a OneFormer (one process or torchrun).

    maskformers train --recipe builtin --out runs/builtin            # the built-in model, from scratch
    maskformers train --model facebook/mask2former-swin-tiny-coco-panoptic --data coco-panoptic \\
        --images train2017 --panoptic-dir panoptic_train2017 --annotations panoptic_train2017.json --out runs/ft
    torchrun --nproc_per_node=8 -m maskformers train ...               # DDP (see README)

OneFormer trains the same way: ``--model`` a OneFormer checkpoint or a config JSON with ``"model_type":
"oneformer"``; its CLIP tokenizer comes from the checkpoint folder or ``--tokenizer`` (a folder with
``vocab.json`` + ``merges.txt``, or CLIP's ``bpe_simple_vocab_16e6.txt.gz``). A task is drawn per image as the
original (see :mod:`.oneformer_data`); the saved models carry the tokenizer and class info, so ``maskformers
segment`` and ``maskformers evaluate`` run them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_data import add_common_data, add_data_arguments, add_tokenizer_argument, build_reader, has_val, load_model, \
    load_tokenizer

__all__ = ["add_train_parser", "run_train"]


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train or fine-tune a Mask2Former or a OneFormer (one process or torchrun)")
    p.add_argument("--recipe", choices=["builtin"], help="a complete recipe: 'builtin' = the shipped demo model")
    p.add_argument("--model", default=None,
                   help="start from: a hub id or folder (fine-tuning), 'builtin' (new built-in architecture) or "
                        "a model config JSON (new model; \"model_type\": \"oneformer\" makes a OneFormer)")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], default=None,
                   help="the targets' task and the evaluation metric (OneFormer: the metric only; its training "
                        "draws a task per image)")
    add_common_data(p)
    add_data_arguments(p, "val-")
    p.add_argument("--val-split", default=None, help="HF dataset split for evaluation")
    p.add_argument("--val-scenes", type=int, default=None, help="synthetic: held-out scenes for evaluation")
    p.add_argument("--out", required=True, help="output folder: log.jsonl, checkpoints, best/ and final/ models")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in --out")
    p.add_argument("--config", help="JSON file of TrainingConfig fields (overridden by the options below)")
    for name, kind in (("steps", int), ("batch-size", int), ("accum", int), ("lr", float), ("eval-every", int),
                       ("checkpoint-every", int), ("num-points", int), ("seed", int), ("workers", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: float32)")
    p.add_argument("--scale-range", type=float, nargs=2, default=None, help="large-scale-jitter range")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad samples: fail or skip")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tokenizer_argument(p)
    p.set_defaults(run=run_train)
    return p


def _training_config(args: argparse.Namespace) -> Any:
    from .builtin import BUILTIN_RECIPE
    from .config import TrainingConfig

    fields: dict[str, Any] = dict(BUILTIN_RECIPE["training"]) if args.recipe == "builtin" else {}
    if args.config:
        fields.update(json.loads(Path(args.config).read_text()))
    for option, field in (("task", "task"), ("steps", "max_steps"), ("batch_size", "batch_size"),
                          ("accum", "grad_accumulation"), ("lr", "lr"), ("eval_every", "eval_every"),
                          ("checkpoint_every", "checkpoint_every"), ("num_points", "num_points"), ("seed", "seed"),
                          ("workers", "num_workers"), ("amp", "amp")):
        if getattr(args, option) is not None:
            fields[field] = getattr(args, option)
    return TrainingConfig.from_dict(fields)


def _package_oneformer(model: Any, tokenizer: Any, dataset: Any, size: int) -> None:
    """Make ``save_pretrained`` write what ``maskformers segment`` / ``evaluate`` need beside the weights: the
    tokenizer files and a processor config holding the dataset's class info (names, thing ids)."""
    from ..processing.oneformer_processor import OneFormerProcessor

    config = dict(model.preprocessor_config or OneFormerProcessor(
        size={"shortest_edge": size, "longest_edge": 4 * size}).to_dict())
    config.update(class_info=dataset.class_info.to_dict(), class_info_file=None, num_text=dataset.num_text,
                  task_seq_length=dataset.task_seq_len, max_seq_length=dataset.text_seq_len)
    config.pop("metadata", None)
    model.preprocessor_config = config
    model.extra_files = {**getattr(model, "extra_files", {}), **tokenizer.files()}


def run_train(args: argparse.Namespace) -> int:
    from ..hub import from_pretrained
    from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_RECIPE
    from .data import TrainingDataset
    from .distributed import setup, teardown
    from .finetune import replace_class_head
    from .loop import train
    from .transforms import lsj_augmentation, semantic_augmentation

    if args.recipe == "builtin":
        args.data, args.model = "synthetic", args.model or "builtin"
        args.scenes = args.scenes or BUILTIN_RECIPE["train_scenes"]
        args.scale_range = args.scale_range or BUILTIN_RECIPE["scale_range"]
        if args.val_scenes is None:
            args.val_scenes = BUILTIN_RECIPE["val_scenes"]
    args.val_scenes = 100 if args.val_scenes is None else args.val_scenes
    config = _training_config(args)
    args.seed = config.seed
    info = setup(args.device)
    try:
        reader = build_reader(args)
        model = load_model(args.model, config.seed)
        labels = dict(getattr(reader, "id2label", {}))
        if labels and labels != dict(model.id2label):
            if info.is_main:
                print(f"fine-tuning: new class head for {len(labels)} classes (was {model.num_classes})",
                      file=sys.stderr)
            replace_class_head(model, labels, keep_matching=True)
        size = args.size or (BUILTIN_IMAGE_SIZE if args.data == "synthetic" else 1024)
        if config.task == "semantic":
            crop = args.size or 512
            transform = semantic_augmentation(crop, min_sizes=[int(crop * x / 10) for x in range(5, 21)],
                                              max_size=crop * 4, seed=config.seed)
        else:
            transform = lsj_augmentation(size, scale_range=tuple(args.scale_range or (0.1, 2.0)), seed=config.seed)
        if getattr(model, "task_encoder", None) is not None:  # OneFormer: a task drawn per image, prompts
            from .oneformer_data import OneFormerTrainingDataset, num_text_for

            mapper = getattr(model, "text_mapper", None)
            tokenizer = load_tokenizer(args.tokenizer, model)
            dataset = OneFormerTrainingDataset(
                reader, tokenizer=tokenizer, num_text=num_text_for(model), transform=transform,
                on_error=args.on_error, seed=config.seed, task_seq_len=model.task_encoder.task_seq_len,
                text_seq_len=mapper.text_encoder.context_length if mapper is not None else 77)
            _package_oneformer(model, tokenizer, dataset, size)
        else:
            dataset = TrainingDataset(reader, task=config.task, transform=transform, on_error=args.on_error)
        val = build_reader(args, split="val") if has_val(args) and config.eval_every else None
        result = train(model, dataset, config=config, output_dir=args.out, val_dataset=val, resume=args.resume,
                       device=args.device, progress=not args.quiet)
        if info.is_main:
            out = Path(args.out)
            model.save_pretrained(out / "final")
            best = out / "best.pt"
            if best.is_file():
                import torch

                state = torch.load(best, map_location="cpu", weights_only=False)
                best_model = from_pretrained(out / "final")
                best_model.load_state_dict(state["model"])
                best_model.save_pretrained(out / "best")
            print(f"trained to step {result.step}; best: {result.best}; skipped samples: {result.skipped}; "
                  f"models in {out / 'final'}" + (f" and {out / 'best'}" if best.is_file() else ""), file=sys.stderr)
    finally:
        teardown()
    return 0


