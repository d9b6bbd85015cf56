"""``maskformers evaluate`` (PQ / mIoU / mask AP of a model on a dataset) and ``maskformers demo`` (the built-in
model on a held-out synthetic scene).

    maskformers evaluate --model runs/ft/best --data coco-panoptic ... --task panoptic --json metrics.json
    maskformers demo --out demo/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_data import add_common_data, add_tokenizer_argument, build_reader, load_model, load_tokenizer

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
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    add_tokenizer_argument(p)
    p.set_defaults(run=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_model, format_table
    from .builtin import BuiltinModelMissing, load_builtin_model

    try:
        model = load_builtin_model() if args.model == "builtin" else load_model(args.model)
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
    tokenizer = load_tokenizer(args.tokenizer, model) if getattr(model, "task_encoder", None) is not None else None
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
