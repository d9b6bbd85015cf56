"""``maskformers segment``: images (or folders of images) -> overlay PNG, segmentation PNG and segments JSON.

Every argument and the output folder are checked before anything heavy is imported or loaded; a bad
one is one line on stderr naming the option and the value, and exit code 2. Images that cannot be read
or processed are reported and skipped; the others are still segmented; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_segment_parser", "run_segment", "UsageError", "segments_for_task", "segment_records"]

TASKS = ("panoptic", "semantic", "instance")
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
_PNG_MEANING = {
    "panoptic": "pixel value = segment id, 0 = no segment",
    "semantic": "pixel value = class id",
    "instance": "pixel value = instance id + 1, 0 = no instance",
    "instance-oneformer": "pixel value = instance id, 0 = no instance",
}


class UsageError(ValueError):
    """A command-line argument is invalid; the message names the option and the value."""


def _unit_interval(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1], got {text!r}") from None
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1], got {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be a positive integer, got {text!r}")
    return value


def add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images; writes overlay PNG, segmentation PNG and JSON per image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (their images, sorted)")
    p.add_argument("--model", required=True, help="hub id or folder (transformers or maskformers layout): "
                   "a Mask2Former or a OneFormer, read from the checkpoint")
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--threshold", type=_unit_interval("--threshold"), default=None,
                   help="panoptic/instance: minimum segment score (default 0.5)")
    p.add_argument("--mask-threshold", type=_unit_interval("--mask-threshold"), default=None,
                   help="panoptic: mask probability threshold (default 0.5)")
    p.add_argument("--overlap-threshold", type=_unit_interval("--overlap-threshold"), default=None,
                   help="panoptic: minimum visible share of a segment's mask (default 0.8)")
    p.add_argument("--fuse-labels", nargs="+", default=None, metavar="LABEL",
                   help="panoptic: labels (ids or names) whose segments merge into one per image (stuff classes)")
    p.add_argument("--class-info", default=None, metavar="JSON",
                   help="OneFormer: class metadata (names, thing ids) as in shi-labs/oneformer_demo, when the "
                   "checkpoint folder does not carry it; panoptic then merges each stuff class into one segment")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_segment)


# ------------------------------------------------------------------------------------------------
# checks before loading anything
# ------------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == out else f"is under {str(parent)!r}, which is a file"
                raise UsageError(f"--out {str(out)!r} {where}; give a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"--out {str(out)!r}: cannot write into {str(parent)!r} (permission denied)")
            return


def _expand_images(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"IMAGE folder {item!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        else:
            paths.append(path)  # a missing or unreadable file is reported and skipped later, like a bad image
    return paths


def _check_device(text: str):
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text!r}: no CUDA GPU is visible to torch {torch.__version__} here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device {text!r}: unsupported device type {device.type!r}")
    return device


def _post_kwargs(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    applies = {
        "threshold": ("panoptic", "instance"),
        "mask_threshold": ("panoptic",),
        "overlap_threshold": ("panoptic",),
        "fuse_labels": ("panoptic",),
    }
    kwargs: dict[str, Any] = {}
    for name, tasks in applies.items():
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if args.task not in tasks:
            notes.append(f"note: {flag} does not apply to --task {args.task} (only {'/'.join(tasks)}); ignored")
            continue
        kwargs[{"overlap_threshold": "overlap_mask_area_threshold"}.get(name, name)] = value
    if args.task != "semantic":
        kwargs.setdefault("threshold", 0.5)
    return kwargs


def _fuse_ids(labels: list[str], id2label: dict[int, str]) -> set[int]:
    by_name = {name: i for i, name in id2label.items()}
    ids = set()
    for label in labels:
        if label.isdigit() and (int(label) in id2label or not id2label):
            ids.add(int(label))
        elif label in by_name:
            ids.add(by_name[label])
        else:
            raise UsageError(f"--fuse-labels {label!r} is neither a class id nor a label of the model")
    return ids


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # images with the same name from different folders
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


def segments_for_task(task: str, result: Any, ids_from_one: bool) -> tuple[Any, list[dict[str, Any]], int]:
    """(segmentation map, segments with "id"/"label_id"/"score", PNG offset) of one post-processed image.
    ``ids_from_one``: instance ids start at 1 with 0 = none (OneFormer), else at 0 with -1 = none."""
    if task == "semantic":
        segmentation = result
        segments = [{"id": int(c), "label_id": int(c), "colour_key": int(c)} for c in segmentation.unique().tolist()]
        return segmentation, segments, 0
    segments = [dict(s) for s in result["segments_info"]]
    for s in segments:
        s["colour_key"] = s["id"] if task == "instance" else s["label_id"] * 7919 + s["id"]
    return result["segmentation"], segments, 1 if task == "instance" and not ids_from_one else 0


def segment_records(
    segmentation: Any, segments: list[dict[str, Any]], offset: int, id2label: dict[int, str]
) -> list[dict[str, Any]]:
    """One dict per segment (id, label_id, label, score and was_fused when known, area in pixels of the map), as
    ``NAME_segments.json`` lists them; arguments as :func:`segments_for_task` returns them."""
    import torch

    counts = torch.bincount((segmentation.to(torch.int64) + offset).flatten())
    return [
        {
            "id": s["id"], "label_id": s["label_id"], "label": id2label.get(s["label_id"], f"class {s['label_id']}"),
            **({"score": s["score"]} if "score" in s else {}),
            **({"was_fused": s["was_fused"]} if "was_fused" in s else {}),
            "area": int(counts[s["id"] + offset]) if s["id"] + offset < len(counts) else 0,
        }
        for s in segments
    ]


def _write_outputs(
    out_dir: Path, stem: str, path: Path, image, task: str, model_name: str, result, id2label, ids_from_one: bool
) -> None:
    from .processing.visualize import overlay_segments, segmentation_to_png

    segmentation, segments, offset = segments_for_task(task, result, ids_from_one)
    segmentation = segmentation.cpu()
    overlay_segments(image, segmentation, segments, id2label=id2label).save(out_dir / f"{stem}_overlay.png")
    segmentation_to_png(segmentation, offset=offset).save(out_dir / f"{stem}_segmentation.png")
    record = {
        "image": str(path), "height": image.height, "width": image.width, "task": task, "model": model_name,
        "segmentation_png": _PNG_MEANING["instance-oneformer" if task == "instance" and ids_from_one else task],
        "segments": segment_records(segmentation, segments, offset, id2label),
    }
    (out_dir / f"{stem}_segments.json").write_text(json.dumps(record, indent=2) + "\n")


def run_segment(args: argparse.Namespace) -> int:
    notes: list[str] = []
    try:
        out_dir = Path(args.out)
        _check_out(out_dir)
        paths = _expand_images(args.images)
        post_kwargs = _post_kwargs(args, notes)
        device = _check_device(args.device)
    except UsageError as exc:
        print(f"maskformers segment: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)

    import torch
    from tqdm import tqdm

    from .hub import CheckpointError, from_pretrained
    from .processing import ImageLoadError, load_image
    from .segment_runner import SegmentRunner

    try:
        model = from_pretrained(args.model)
        runner = SegmentRunner(
            model, task=args.task, device=device, dtype=getattr(torch, args.dtype), class_info=args.class_info,
            say=lambda message: print(message, file=sys.stderr),
        )
        if "fuse_labels" in post_kwargs:
            post_kwargs["label_ids_to_fuse"] = _fuse_ids(post_kwargs.pop("fuse_labels"), model.id2label)
    except UsageError as exc:
        print(f"maskformers segment: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError, TypeError) as exc:
        print(f"maskformers segment: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)

    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    batch: list[tuple[Path, Any]] = []
    bar = tqdm(total=len(paths), desc="segment", unit="image", disable=args.quiet)

    def flush() -> None:
        results = runner(batch, post_kwargs, failures, warn=lambda m: tqdm.write(m, file=sys.stderr))
        for (path, image), result in zip(batch, results):
            if result is not None:
                _write_outputs(out_dir, _unique_stem(path, used), path, image, args.task, str(args.model), result,
                               model.id2label, ids_from_one=runner.is_oneformer)
        bar.update(len(batch))
        batch.clear()

    for path in paths:
        try:
            image = load_image(path)
        except (ImageLoadError, OSError, ValueError) as exc:
            failures.append((str(path), str(exc)))
            tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        batch.append((path, image))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    bar.close()

    done = len(paths) - len(failures)
    print(f"segmented {done} of {len(paths)} image(s) into {out_dir}", file=sys.stderr)
    for path, reason in failures:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0
