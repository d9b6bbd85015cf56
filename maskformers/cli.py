"""The ``maskformers`` command line.

    maskformers segment IMAGE... --model NAME_OR_PATH --task panoptic|semantic|instance --out DIR
    maskformers convert SRC DST
    maskformers info [--build]
    maskformers build-ops [--device auto|cpu|cuda|all] [--op NAME|all] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "make_parser"]

DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("panoptic", "semantic", "instance")


def _info(args: argparse.Namespace) -> int:
    from . import info

    return info.main(["--build"] if args.build else [])


def _build_ops(args: argparse.Namespace) -> int:
    from .ops import build

    return build.run(args)


def _convert(args: argparse.Namespace) -> int:
    from .hub import CheckpointError, convert

    try:
        folder = convert(args.src, args.dst)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"maskformers convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {folder}")
    return 0


# ----------------------------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------------------------


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:  # images with the same name from different folders
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


def _segments_for_task(task: str, result: Any) -> tuple[Any, list[dict[str, Any]], int]:
    """(segmentation map, segments with "id"/"label_id"/"score", PNG offset) of one post-processed image."""
    if task == "semantic":
        segmentation = result
        labels = segmentation.unique().tolist()
        segments = [{"id": int(c), "label_id": int(c), "colour_key": int(c)} for c in labels]
        return segmentation, segments, 0
    segments = [dict(s) for s in result["segments_info"]]
    for s in segments:
        s["colour_key"] = s["id"] if task == "instance" else s["label_id"] * 7919 + s["id"]
    return result["segmentation"], segments, 1 if task == "instance" else 0


def _segment(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .hub import CheckpointError
    from .models import Mask2Former
    from .processing import ImageLoadError, ImageProcessor, load_image
    from .processing import post_process_instance, post_process_panoptic, post_process_semantic
    from .processing.visualize import overlay_segments, segmentation_to_png

    try:
        model = Mask2Former.from_pretrained(args.model)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"maskformers segment: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = model.to(device=device, dtype=dtype).eval()
    processor = ImageProcessor.from_pretrained(model.preprocessor_config) if model.preprocessor_config else ImageProcessor()
    post = {"panoptic": post_process_panoptic, "semantic": post_process_semantic, "instance": post_process_instance}[args.task]
    post_kwargs: dict[str, Any] = {} if args.task == "semantic" else {"threshold": args.threshold}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    for path in tqdm([Path(p) for p in args.images], desc="segment", unit="image", disable=args.quiet):
        try:
            image = load_image(path)
            inputs = processor(image, device=device)
        except (ImageLoadError, OSError, ValueError) as exc:
            failures.append((str(path), str(exc)))
            tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        with torch.inference_mode():
            output = model(inputs["pixel_values"].to(dtype), inputs["pixel_mask"])
        result = post(
            output.class_logits, output.mask_logits, input_size=inputs["pixel_values"].shape[-2:],
            image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"], **post_kwargs,
        )[0]
        segmentation, segments, offset = _segments_for_task(args.task, result)
        segmentation = segmentation.cpu()
        stem = _unique_stem(path, used)
        overlay_segments(image, segmentation, segments, id2label=model.id2label).save(out_dir / f"{stem}_overlay.png")
        segmentation_to_png(segmentation, offset=offset).save(out_dir / f"{stem}_segmentation.png")
        counts = torch.bincount((segmentation.to(torch.int64) + offset).flatten())
        record = {
            "image": str(path), "height": image.height, "width": image.width, "task": args.task,
            "model": str(args.model),
            "segmentation_png": {
                "panoptic": "pixel value = segment id, 0 = no segment",
                "semantic": "pixel value = class id",
                "instance": "pixel value = instance id + 1, 0 = no instance",
            }[args.task],
            "segments": [
                {
                    "id": s["id"], "label_id": s["label_id"],
                    "label": model.id2label.get(s["label_id"], f"class {s['label_id']}"),
                    **({"score": s["score"]} if "score" in s else {}),
                    **({"was_fused": s["was_fused"]} if "was_fused" in s else {}),
                    "area": int(counts[s["id"] + offset]) if s["id"] + offset < len(counts) else 0,
                }
                for s in segments
            ],
        }
        (out_dir / f"{stem}_segments.json").write_text(json.dumps(record, indent=2) + "\n")

    done = len(args.images) - len(failures)
    print(f"segmented {done} of {len(args.images)} image(s) into {out_dir}", file=sys.stderr)
    for path, reason in failures:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformers", description="Mask2Former/OneFormer in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment images; writes overlay PNG, segmentation PNG and JSON per image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, help="hub id or folder (transformers or maskformers layout)")
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--threshold", type=float, default=0.5, help="panoptic/instance score threshold")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_segment)

    p = sub.add_parser("convert", help="convert a checkpoint (hub id, folder, detectron2 .pkl/.pth) to our format")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=_convert)

    p = sub.add_parser("info", help="versions, and which ms_deform_attn backends are available (and why not)")
    p.add_argument("--build", action="store_true", help="build the native kernels if they are not cached yet")
    p.set_defaults(run=_info)

    p = sub.add_parser("build-ops", help="compile the native kernels now (else: on first use)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="auto (default): what can run here, the CPU plus CUDA when a GPU is visible; "
                   "cuda: for TORCH_CUDA_ARCH_LIST (else the visible GPUs, else torch's architectures)")
    p.add_argument("--op", default="all", help="one op (ms_deform_attn, neighborhood_attention) or all")
    p.add_argument("--rebuild", action="store_true", help="delete the cached builds first and compile again")
    p.set_defaults(run=_build_ops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
