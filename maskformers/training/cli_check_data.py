"""``maskformers check-data``: read every sample of a dataset once, as ``train`` would, and report every problem
at once, the classes' pixel and segment counts, and overlays of the ground truth for the first images.

    maskformers check-data --data semantic-folder --images img --labels lab --id2label labels.json
    maskformers check-data --data coco-panoptic --images val2017 --panoptic-dir panoptic_val2017 \\
        --annotations panoptic_val2017.json --overlays 16 --overlay-dir check/ --json report.json

The data options are ``train``'s (the --val-* ones too: both sets are checked). Problems: a file that is
missing or unreadable, an annotation whose size differs from its image's, class ids outside the label set,
colour masks without a palette, segments that cover no pixel, images with nothing labelled, and a dataset
of binary 0/255 masks whose objects would all be ignored. Exit code 0 when no problem was found, 1 when
some were, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .cli_data import UsageError, add_common_data, add_data_arguments, build_reader, has_val

__all__ = ["add_check_data_parser", "run_check_data", "check_reader"]


def add_check_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-data", help="read every sample once: report all problems, class counts and "
                                                 "ground-truth overlays (exit 1 when problems are found)")
    add_common_data(p)
    add_data_arguments(p, "val-")
    p.add_argument("--val-split", default=None, help="HF dataset split to check as well")
    p.add_argument("--seed", type=int, default=0, help="synthetic scenes' seed")
    p.add_argument("--limit", type=int, default=None, help="check the first N samples of each set only")
    p.add_argument("--overlays", type=int, default=8, help="write ground-truth overlays of the first N images "
                                                           "(default 8; 0: none)")
    p.add_argument("--overlay-dir", default="check-data", help="folder for the overlays (default ./check-data)")
    p.add_argument("--max-shown", type=int, default=50, help="problems printed (all of them go to --json)")
    p.add_argument("--json", default=None, help="also write the full report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_check_data)
    return p


def _overlay(sample: dict[str, Any], id2label: dict[int, str], path: Path) -> None:
    """The ground truth drawn over its image: one colour per class, outlines and a tag per segment."""
    from ..processing.visualize import overlay_segments
    from .data import panoptic_map

    segmentation, info = panoptic_map(sample)
    segments = [{"id": s["id"], "label_id": s["category_id"], "colour_key": s["category_id"]} for s in info]
    names = {**id2label, **{s["category_id"]: f"{id2label.get(s['category_id'], s['category_id'])} (crowd)"
                            for s in info if s["iscrowd"]}}
    overlay_segments(sample["image"], segmentation, segments, id2label=names).save(path)


def check_reader(reader: Any, *, limit: int | None = None, overlays: int = 0, overlay_dir: Path | None = None,
                 overlay_prefix: str = "", progress: bool = False) -> dict[str, Any]:
    """Read every sample of ``reader`` once. Returns ``{"samples": read, "problems": [str], "notes": [str],
    "classes": {id: {"name", "images", "segments", "pixels"}}, "void_pixels", "pixels", "overlays": [paths]}``."""
    import torch

    from .data import SampleError, check_sample

    id2label = {int(k): str(v) for k, v in (getattr(reader, "id2label", None) or {}).items()}
    num_classes = len(id2label)
    problems = [f"{image}: no label file ({reader.labels_dir})" for image in getattr(reader, "missing", [])]
    notes = []
    unpaired = getattr(reader, "unpaired_labels", [])
    if unpaired:
        notes.append(f"{len(unpaired)} label file(s) have no image, e.g. {', '.join(str(p) for p in unpaired[:3])}")
    images, segments, pixels = Counter(), Counter(), Counter()
    void = total = read = 0
    only_zero = with_void = 0  # semantic label maps holding class 0 and ignored pixels only
    written: list[str] = []
    n = len(reader) if limit is None else min(limit, len(reader))
    order: Any = range(n)
    if progress:
        from tqdm import tqdm

        order = tqdm(order, desc="check-data", unit="sample", file=sys.stderr)
    for index in order:
        try:
            sample = reader[index]
            check_sample(sample, num_classes)
        except SampleError as exc:
            problems.append(str(exc))
            continue
        read += 1
        source = sample.get("source", f"sample {index}")
        problems += [f"{source}: {e}" for e in sample.get("empty_segments", [])]
        masks, labels = sample["masks"].bool(), sample["labels"]
        covered = masks.any(0) if len(labels) else torch.zeros(sample["image"].shape[1:], dtype=torch.bool)
        uncovered = int((~covered).sum())
        void, total = void + uncovered, total + covered.numel()
        if not len(labels):
            problems.append(f"{source}: nothing labelled (every pixel is void / ignored)")
        for c in set(labels.tolist()):
            images[c] += 1
        for c, area in zip(labels.tolist(), masks.flatten(1).sum(1).tolist()):
            segments[c] += 1
            pixels[c] += area
        if hasattr(reader, "label_classes") and set(labels.tolist()) <= {0}:
            only_zero += 1
            with_void += uncovered > 0
        if overlay_dir is not None and len(written) < overlays:
            overlay_dir.mkdir(parents=True, exist_ok=True)
            path = overlay_dir / f"{overlay_prefix}{index:05d}_{Path(str(source)).stem}.png"
            _overlay(sample, id2label, path)
            written.append(str(path))
    if hasattr(reader, "label_classes") and num_classes > 1 and read and only_zero == read and 2 * with_void >= read:
        from .label_maps import BINARY_MASK_HINT, other_classes

        problems.append(f"every label map holds only class 0 ({id2label.get(0)}) and ignored pixels ({with_void} of "
                        f"{read} have ignored pixels): {other_classes(id2label, num_classes)} would never be "
                        f"learned; {BINARY_MASK_HINT}")
    absent = [c for c in sorted(id2label) if c not in images]
    if read and absent:
        shown = ", ".join(f"{c} ({id2label[c]})" for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
        notes.append(f"{len(absent)} class(es) never appear: {shown}")
    classes = {c: {"name": id2label.get(c, f"class {c}"), "images": images[c], "segments": segments[c],
                   "pixels": pixels[c]} for c in sorted(set(id2label) | set(images))}
    return {"samples": read, "of": n, "problems": problems, "notes": notes, "classes": classes, "void_pixels": void,
            "pixels": total, "overlays": written}


def _class_table(report: dict[str, Any]) -> str:
    total = max(report["pixels"], 1)
    rows = [["id", "class", "images", "segments", "pixels %"]]
    rows += [[str(c), r["name"], str(r["images"]), str(r["segments"]), f"{100 * r['pixels'] / total:.2f}"]
             for c, r in report["classes"].items()]
    rows.append(["", "void / ignored", "", "", f"{100 * report['void_pixels'] / total:.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def run_check_data(args: argparse.Namespace) -> int:
    for name in ("limit", "overlays", "max_shown"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "limit" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {1 if name == 'limit' else 0}, got {value}")
    if args.data == "coco-instance":
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            from .readers_coco import PYCOCOTOOLS_HINT

            raise UsageError(f"reading COCO instance masks needs pycocotools: {PYCOCOTOOLS_HINT}") from None
    if args.data == "synthetic":
        args.scenes = args.scenes or 100
        args.val_scenes = 0
    sets = [("train", "")]
    if args.data != "synthetic" and has_val(args):
        sets.append(("val", "val_"))
    reports = {}
    for split, prefix in sets:
        reader = build_reader(args, split=split, check_labels=False, skip_missing=True)
        reports[split] = check_reader(reader, limit=args.limit, overlays=args.overlays,
                                      overlay_dir=Path(args.overlay_dir) if args.overlays else None,
                                      overlay_prefix=prefix, progress=not args.quiet)
    found = 0
    for split, report in reports.items():
        name = f"{split} set" if len(reports) > 1 else "dataset"
        problems = report["problems"]
        found += len(problems)
        print(f"{name}: read {report['samples']} of {report['of']} samples; "
              f"{len(problems) or 'no'} problem{'' if len(problems) == 1 else 's'}")
        for line in problems[: args.max_shown]:
            print(f"  problem: {line}")
        if len(problems) > args.max_shown:
            print(f"  ... and {len(problems) - args.max_shown} more" + (" (all in --json)" if args.json else
                                                                          " (--json FILE lists all)"))
        for line in report["notes"]:
            print(f"  note: {line}")
        if report["samples"]:
            print(_class_table(report))
        if report["overlays"]:
            print(f"wrote {len(report['overlays'])} ground-truth overlays to {args.overlay_dir} (one colour per class; "
                  "unpainted pixels are void / ignored)")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, **reports}, indent=2) + "\n")
    return 1 if found else 0
