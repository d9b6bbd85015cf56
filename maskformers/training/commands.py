"""The ``maskformers train``, ``maskformers evaluate`` and ``maskformers demo`` commands.

Each command is an ``add_*_parser(subparsers)`` / ``run_*(args)`` pair, registered by ``maskformers.cli``.

    maskformers train --recipe builtin --out runs/builtin            # the built-in model, from scratch
    maskformers train --model facebook/mask2former-swin-tiny-coco-panoptic --data coco-panoptic \\
        --images train2017 --panoptic-dir panoptic_train2017 --annotations panoptic_train2017.json --out runs/ft
    torchrun --nproc_per_node=8 -m maskformers train ...               # DDP (see README)
    maskformers evaluate --model runs/ft/best --data coco-panoptic ... --task panoptic --json metrics.json
    maskformers demo --out demo/

OneFormer trains the same way: ``--model`` a OneFormer checkpoint or a config JSON with ``"model_type":
"oneformer"``; its CLIP tokenizer comes from the checkpoint folder or ``--tokenizer`` (a folder with
``vocab.json`` + ``merges.txt``, or CLIP's ``bpe_simple_vocab_16e6.txt.gz``). A task is drawn per image as the
original (see :mod:`.oneformer_data`); the saved models carry the tokenizer and class info, so ``maskformers
segment`` and ``maskformers evaluate`` run them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_train_parser", "run_train", "add_evaluate_parser", "run_evaluate", "add_demo_parser", "run_demo",
           "build_reader"]

DATA_KINDS = ("synthetic", "coco-panoptic", "coco-instance", "semantic-folder", "hf")


def _add_data_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}images", help="image folder (COCO, semantic folders)")
    p.add_argument(f"--{prefix}annotations", help="COCO JSON (panoptic or instances)")
    p.add_argument(f"--{prefix}panoptic-dir", help="COCO panoptic PNG folder")
    p.add_argument(f"--{prefix}labels", help="label PNG folder (semantic folders)")


def _add_common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA_KINDS, default="synthetic", help="dataset format (default: synthetic)")
    _add_data_arguments(p)
    p.add_argument("--id2label", help="JSON file {id: name} (semantic folders, HF datasets)")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--reduce-labels", action="store_true", help="ADE20K: 0 -> ignore, other ids - 1")
    p.add_argument("--hf-name", help="Hugging Face dataset name (needs `pip install datasets`)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-annotation", choices=["semantic", "instance"], default="semantic")
    p.add_argument("--image-column", default="image")
    p.add_argument("--annotation-column", default="annotation")
    p.add_argument("--scenes", type=int, default=None, help="synthetic: number of scenes")
    p.add_argument("--size", type=int, default=None, help="synthetic scene size / training crop size")


def build_reader(args: argparse.Namespace, *, split: str = "train") -> Any:
    """The sample reader described by the command-line arguments (``split`` "val" reads --val-* paths)."""
    from .synthetic import SyntheticScenes

    def arg(name: str) -> Any:
        value = getattr(args, f"val_{name}", None) if split == "val" else None
        return value if value is not None else getattr(args, name, None)

    kind = args.data
    if kind == "synthetic":
        from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED

        size = args.size or BUILTIN_IMAGE_SIZE
        if split == "val":
            return SyntheticScenes(args.val_scenes, size=size, seed=BUILTIN_VAL_SEED)
        return SyntheticScenes(args.scenes or 100_000, size=size, seed=args.seed)
    if kind in ("coco-panoptic", "coco-instance"):
        from .readers_coco import CocoInstances, CocoPanoptic

        if not arg("images") or not arg("annotations"):
            raise SystemExit(f"--data {kind} needs --images and --annotations")
        if kind == "coco-instance":
            return CocoInstances(arg("images"), arg("annotations"))
        if not arg("panoptic_dir"):
            raise SystemExit("--data coco-panoptic needs --panoptic-dir")
        return CocoPanoptic(arg("images"), arg("panoptic_dir"), arg("annotations"))
    if not args.id2label:
        raise SystemExit(f"--data {kind} needs --id2label FILE (JSON {{id: name}})")
    id2label = {int(k): v for k, v in json.loads(Path(args.id2label).read_text()).items()}
    if kind == "semantic-folder":
        from .readers_semantic import SemanticFolder

        if not arg("images") or not arg("labels"):
            raise SystemExit("--data semantic-folder needs --images and --labels")
        return SemanticFolder(arg("images"), arg("labels"), id2label=id2label, ignore_index=args.ignore_index,
                              reduce_labels=args.reduce_labels)
    from .readers_semantic import HFSegmentationDataset, load_hf_dataset

    if not args.hf_name:
        raise SystemExit("--data hf needs --hf-name")
    hf_split = getattr(args, "val_split", None) if split == "val" else args.hf_split
    return HFSegmentationDataset(load_hf_dataset(args.hf_name, hf_split), id2label=id2label,
                                 image_column=args.image_column, annotation_column=args.annotation_column,
                                 annotation=args.hf_annotation, ignore_index=args.ignore_index,
                                 reduce_labels=args.reduce_labels)


def _has_val(args: argparse.Namespace) -> bool:
    if args.data == "synthetic":
        return args.val_scenes > 0
    if args.data == "hf":
        return bool(args.val_split)
    return bool(args.val_images)


# ---------------------------------------------------------------------------------------------- train
def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train or fine-tune a Mask2Former or a OneFormer (one process or torchrun)")
    p.add_argument("--recipe", choices=["builtin"], help="a complete recipe: 'builtin' = the shipped demo model")
    p.add_argument("--model", default=None,
                   help="start from: a hub id or folder (fine-tuning), 'builtin' (new built-in architecture) or "
                        "a model config JSON (new model; \"model_type\": \"oneformer\" makes a OneFormer)")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], default=None,
                   help="the targets' task and the evaluation metric (OneFormer: the metric only; its training "
                        "draws a task per image)")
    _add_common_data(p)
    _add_data_arguments(p, "val-")
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
    _add_tokenizer_argument(p)
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


def _add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="OneFormer: CLIP tokenizer folder (vocab.json + merges.txt) or bpe_simple_vocab_16e6.txt.gz "
                        "(default: the checkpoint folder's)")


def _load_model(spec: str | None, seed: int = 0) -> Any:
    """The built-in architecture, a new model from a config JSON (``"model_type": "oneformer"`` or OneFormer
    fields make a OneFormer, else a Mask2Former), or a checkpoint (either model, read from it)."""
    from .builtin import build_builtin_model

    if spec in (None, "builtin"):
        return build_builtin_model(seed)
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        import torch

        from ..models.mask2former import Mask2FormerConfig, build_mask2former
        from ..models.oneformer import OneFormerConfig, build_oneformer

        fields = json.loads(path.read_text())
        if isinstance(fields.get("config"), dict):  # a saved maskformers_config.json
            fields = {"model_type": fields.get("model_type"), **fields["config"]}
        model_type = fields.pop("model_type", None)
        if model_type is None:
            own = {f.name for f in dataclasses.fields(OneFormerConfig)} - {f.name for f in
                                                                           dataclasses.fields(Mask2FormerConfig)}
            model_type = "oneformer" if own & set(fields) else "mask2former"
        if model_type not in ("mask2former", "oneformer"):
            raise SystemExit(f"{path}: model_type must be 'mask2former' or 'oneformer', got {model_type!r}")
        torch.manual_seed(seed)
        if model_type == "oneformer":
            return build_oneformer(OneFormerConfig.from_dict(fields))
        return build_mask2former(Mask2FormerConfig.from_dict(fields))
    from ..hub import from_pretrained

    return from_pretrained(spec)


def _tokenizer(spec: str | None, model: Any) -> Any:
    """A OneFormer's CLIP tokenizer: ``--tokenizer`` (folder or BPE merge file), else its checkpoint folder's."""
    from ..processing.clip_tokenizer import CLIPTokenizer

    if spec is not None:
        path = Path(spec)
        if path.is_dir():
            return CLIPTokenizer.from_pretrained(path)
        if path.is_file():
            return CLIPTokenizer.from_bpe_file(path)
        raise SystemExit(f"--tokenizer {spec}: no such folder or file")
    folder = getattr(model, "source_folder", None)
    if folder is not None:
        try:
            return CLIPTokenizer.from_pretrained(folder)
        except FileNotFoundError:
            pass
    where = "" if folder is None else f"; {folder} has none"
    raise SystemExit("a OneFormer needs its CLIP tokenizer: pass --tokenizer FOLDER (vocab.json + merges.txt, e.g. "
                     "a OneFormer hub checkpoint) or --tokenizer bpe_simple_vocab_16e6.txt.gz (CLIP's merge list, "
                     f"shipped by open_clip and the original OneFormer){where}")


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
        model = _load_model(args.model, config.seed)
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
            tokenizer = _tokenizer(args.tokenizer, model)
            dataset = OneFormerTrainingDataset(
                reader, tokenizer=tokenizer, num_text=num_text_for(model), transform=transform,
                on_error=args.on_error, seed=config.seed, task_seq_len=model.task_encoder.task_seq_len,
                text_seq_len=mapper.text_encoder.context_length if mapper is not None else 77)
            _package_oneformer(model, tokenizer, dataset, size)
        else:
            dataset = TrainingDataset(reader, task=config.task, transform=transform, on_error=args.on_error)
        val = build_reader(args, split="val") if _has_val(args) and config.eval_every else None
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


# ---------------------------------------------------------------------------------------------- evaluate
def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="PQ / mIoU / mask AP of a model on a dataset; prints a table")
    p.add_argument("--model", required=True, help="hub id, folder, or 'builtin'")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], action="append", default=None,
                   help="metric(s) to compute (repeatable; default panoptic)")
    _add_common_data(p)
    p.add_argument("--seed", type=int, default=None, help="synthetic: the held-out seed is used unless given")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    _add_tokenizer_argument(p)
    p.set_defaults(run=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_model, format_table
    from .builtin import BuiltinModelMissing, load_builtin_model

    try:
        model = load_builtin_model() if args.model == "builtin" else _load_model(args.model)
    except BuiltinModelMissing as exc:
        print(f"maskformers evaluate: {exc}", file=sys.stderr)
        return 2
    if args.data == "synthetic":
        args.val_scenes, args.val_images = args.scenes or 100, None
        reader = build_reader(args, split="val") if args.seed is None else build_reader(args)
    else:
        args.seed = 0
        reader = build_reader(args)
    tasks = args.task or ["panoptic"]
    tokenizer = _tokenizer(args.tokenizer, model) if getattr(model, "task_encoder", None) is not None else None
    metrics = evaluate_model(model.to(args.device), reader, tasks=tasks, device=args.device,
                             batch_size=args.batch_size, limit=args.limit, ignore_index=args.ignore_index,
                             progress=True, tokenizer=tokenizer)
    print(format_table({k: v for k, v in metrics.items() if not k.startswith("n")}))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "data": args.data, "tasks": tasks,
                                               "metrics": metrics}, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="segment a held-out synthetic scene with the built-in model (offline)")
    p.add_argument("--out", default="maskformers-demo", help="folder for the input and overlay PNGs")
    p.add_argument("--scene", type=int, default=0, help="which held-out scene to draw")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes for the PQ (0: skip)")
    p.set_defaults(run=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    import PIL.Image
    import torch

    from ..evaluation.evaluate import evaluate_model
    from ..processing import post_process_panoptic
    from ..processing.visualize import overlay_segments
    from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED, BuiltinModelMissing, load_builtin_model
    from .data import collate
    from .synthetic import SyntheticScenes

    try:
        model = load_builtin_model().eval()
    except BuiltinModelMissing as exc:
        print(f"maskformers demo: {exc}", file=sys.stderr)
        return 2
    scene = SyntheticScenes(args.scene + 1, size=BUILTIN_IMAGE_SIZE, seed=BUILTIN_VAL_SEED)[args.scene]
    batch = collate([(scene, {"labels": scene["labels"], "masks": scene["masks"]})])
    with torch.inference_mode():
        out = model(batch["pixel_values"])
    size = tuple(scene["image"].shape[1:])
    result = post_process_panoptic(out.class_logits, out.mask_logits, input_size=batch["pixel_values"].shape[-2:],
                                   image_sizes=[size], target_sizes=[size], threshold=0.8)[0]
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(scene["image"].permute(1, 2, 0).numpy()).save(folder / "scene.png")
    overlay = overlay_segments(scene["image"], result["segmentation"], result["segments_info"],
                               id2label=model.id2label)
    overlay.save(folder / "overlay.png")
    found = ", ".join(f"{model.id2label[s['label_id']]} {s['score']:.2f}" for s in result["segments_info"])
    print(f"scene {args.scene}: {len(result['segments_info'])} segments ({found})")
    print(f"wrote {folder / 'scene.png'} and {folder / 'overlay.png'}")
    if args.scenes:
        held_out = SyntheticScenes(args.scenes, size=BUILTIN_IMAGE_SIZE, seed=BUILTIN_VAL_SEED)
        m = evaluate_model(model, held_out, task="panoptic")
        print(f"panoptic quality on {args.scenes} held-out scenes: PQ {m['PQ']:.1f} (things {m['PQ_th']:.1f}, "
              f"stuff {m['PQ_st']:.1f}), SQ {m['SQ']:.1f}, RQ {m['RQ']:.1f}")
    return 0
