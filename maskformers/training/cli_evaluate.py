"""``maskformers evaluate`` (PQ / mIoU / mask AP of a model on a dataset) and ``maskformers demo`` (the built-in
model on a held-out synthetic scene).

    maskformers evaluate --model runs/ft/best --data coco-panoptic ... --task panoptic --json metrics.json
    maskformers evaluate --model runs/ft/best --data semantic-folder --images val/img --labels val/lab \\
        --task semantic --per-class          # id2label from the model when --id2label is not given
    maskformers demo --out demo/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_data import UsageError, add_common_data, add_tokenizer_argument, build_reader, load_model, load_tokenizer

__all__ = ["add_evaluate_parser", "run_evaluate", "add_demo_parser", "run_demo"]


# ---------------------------------------------------------------------------------------------- evaluate
def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="PQ / mIoU / mask AP of a model on a dataset; prints a table")
    p.add_argument("--model", required=True, help="hub id, folder, or 'builtin'")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], action="append", default=None,
                   help="metric(s) to compute (repeatable; default panoptic)")
    add_common_data(p)
    p.add_argument("--seed", type=int, default=None, help="synthetic: the held-out seed is used unless given")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.8,
                   help="panoptic: drop predictions scoring under this (default 0.8, the original's; a model early "
                        "in training may score lower)")
    p.add_argument("--overlap-threshold", type=float, default=0.8,
                   help="panoptic: drop a segment keeping less than this part of its mask (default 0.8)")
    p.add_argument("--per-class", action="store_true",
                   help="also print a table per class (PQ / IoU / AP) and the confusion matrix (always in --json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the metrics, per class included, to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tokenizer_argument(p)
    p.set_defaults(run=run_evaluate)
    return p


def _check_options(args: argparse.Namespace, tasks: list[str]) -> None:
    for name in ("threshold", "overlap_threshold"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if "instance" in tasks or args.data == "coco-instance":
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            from .readers_coco import PYCOCOTOOLS_HINT

            need = "mask AP (--task instance)" if "instance" in tasks else "reading COCO instance masks"
            raise UsageError(f"{need} needs pycocotools: {PYCOCOTOOLS_HINT}") from None


def _compare_labels(model_labels: dict[int, str], num_classes: int, data_labels: dict[int, str]) -> None:
    """An error when the dataset has classes the model cannot predict; a warning when the names differ."""
    beyond = sorted(c for c in data_labels if not 0 <= c < num_classes)
    if beyond:
        raise UsageError(f"the dataset has {len(data_labels)} classes, the model {num_classes}: class ids "
                         f"{beyond[:10]} ({', '.join(data_labels[c] for c in beyond[:3])}...) are not among the "
                         "model's; evaluate a model fine-tuned on these labels")
    if not model_labels or not data_labels or data_labels == model_labels:
        return
    differ = [c for c in sorted(data_labels) if data_labels[c] != model_labels.get(c)]
    example = f"; e.g. id {differ[0]}: model {model_labels.get(differ[0])!r}, dataset {data_labels[differ[0]]!r}" \
        if differ else ""
    print(f"maskformers evaluate: warning: the model's labels ({len(model_labels)} classes) differ from the "
          f"dataset's ({len(data_labels)}){example}; the metrics compare class ids as they are", file=sys.stderr)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_model, format_per_class, format_table
    from .builtin import BuiltinModelMissing, load_builtin_model

    tasks = args.task or ["panoptic"]
    _check_options(args, tasks)
    try:
        model = load_builtin_model() if args.model == "builtin" else load_model(args.model)
    except BuiltinModelMissing as exc:
        raise UsageError(str(exc)) from exc
    model_labels = {int(k): str(v) for k, v in (getattr(model, "id2label", None) or {}).items()}
    if args.data == "synthetic":
        args.val_scenes, args.val_images = args.scenes or 100, None
        reader = build_reader(args, split="val") if args.seed is None else build_reader(args)
    else:
        args.seed = 0
        reader = build_reader(args, id2label=model_labels)
    data_labels = {int(k): str(v) for k, v in (getattr(reader, "id2label", None) or {}).items()}
    _compare_labels(model_labels, model.num_classes, data_labels)
    tokenizer = load_tokenizer(args.tokenizer, model) if getattr(model, "task_encoder", None) is not None else None
    metrics = evaluate_model(model.to(args.device), reader, tasks=tasks, device=args.device,
                             batch_size=args.batch_size, limit=args.limit, ignore_index=args.ignore_index,
                             threshold=args.threshold, overlap_threshold=args.overlap_threshold,
                             progress=not args.quiet, tokenizer=tokenizer, per_class=True)
    print(format_table({k: v for k, v in metrics.items() if not k.startswith("n")}))
    if args.per_class:
        print(format_per_class(metrics, data_labels or model_labels))
    zero = [k for k in ("PQ", "PQ_th", "PQ_st") if metrics.get(k) == 0.0]
    if "panoptic" in tasks and zero and args.threshold > 0.5:
        print(f"maskformers evaluate: note: {zero[0]} is 0: predictions scoring under --threshold {args.threshold} "
              "are dropped, and a model early in training may score lower (try --threshold 0.5)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "data": args.data, "tasks": tasks,
                                               "threshold": args.threshold, "id2label": data_labels or model_labels,
                                               "metrics": metrics}, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="segment a held-out synthetic scene with the built-in model (offline)")
    p.add_argument("--out", default="maskformers-demo",
                   help="folder for scene.png (the input) and overlay.png (scene | ground truth | prediction)")
    p.add_argument("--scene", type=int, default=0, help="which held-out scene to draw")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes for the PQ (0: skip)")
    p.add_argument("--height", type=_display_height, default=512,
                   help="height in pixels of the scene | ground truth | prediction picture (default 512)")
    p.set_defaults(run=run_demo)
    return p


def _display_height(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"--height must be a whole number of pixels in [16, 4096], got {text!r}")
    return value


def run_demo(args: argparse.Namespace) -> int:
    import PIL.Image
    import torch

    from ..evaluation.evaluate import evaluate_model
    from ..processing import post_process_panoptic
    from ..processing.visualize import compare_segmentations, masks_to_segmentation
    from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED, BuiltinModelMissing, load_builtin_model
    from .data import collate
    from .synthetic import SyntheticScenes

    try:
        model = load_builtin_model().eval()
    except BuiltinModelMissing as exc:
        raise UsageError(str(exc)) from exc
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
    comparison = compare_segmentations(scene["image"], masks_to_segmentation(scene["masks"], scene["labels"]),
                                       (result["segmentation"], result["segments_info"]), id2label=model.id2label,
                                       height=args.height)
    comparison.save(folder / "overlay.png")
    found = ", ".join(f"{model.id2label[s['label_id']]} {s['score']:.2f}" for s in result["segments_info"])
    print(f"scene {args.scene}: {len(result['segments_info'])} segments ({found})")
    print(f"wrote {folder / 'scene.png'} and {folder / 'overlay.png'} (scene | ground truth | prediction, "
          f"{comparison.width}x{comparison.height})")
    if args.scenes:
        held_out = SyntheticScenes(args.scenes, size=BUILTIN_IMAGE_SIZE, seed=BUILTIN_VAL_SEED)
        m = evaluate_model(model, held_out, task="panoptic")
        f = {k: "n/a" if m[k] is None else f"{m[k]:.1f}" for k in ("PQ", "PQ_th", "PQ_st", "SQ", "RQ")}
        print(f"panoptic quality on {args.scenes} held-out scenes: PQ {f['PQ']} (things {f['PQ_th']}, "
              f"stuff {f['PQ_st']}), SQ {f['SQ']}, RQ {f['RQ']}")
    return 0
