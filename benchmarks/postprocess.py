"""Post-processing at a large target size: peak memory and time of semantic / instance / panoptic.

Issue 9, item 3: mapping a 384x384 Mask2Former output onto a 4000x3000 photo peaked at 17.2 GB (panoptic).
This script runs the three tasks on synthetic head outputs (confident rectangles, so every query survives
the thresholds: 100 kept queries for Mask2Former, 150 for OneFormer) for

- ``maskformers``: this checkout's ``maskformers.processing``;
- ``baseline``: ``maskformers/processing/postprocess.py`` as it was at ``--baseline-rev`` (default: the
  version before chunked resizing), loaded from git; Mask2Former rules only (it had no OneFormer rules);
- ``transformers``: ``Mask2FormerImageProcessor`` / ``OneFormerImageProcessor`` post-processing.

Each (model, task, library) runs in a fresh child process: peak memory is the resident memory added during
one call (peak_memory.py), time the median of ``--repeats`` calls. The table also says whether the
segmentation map and segment list equal maskformers' (a hash of both; Mask2Former inputs are 384x384, where
all three share one geometry; OneFormer inputs are unpadded, where transformers' and ours agree).

    python benchmarks/postprocess.py            # 4000x3000 (needs ~20 GB free for baseline/transformers)
    python benchmarks/postprocess.py --quick    # 1333x1000, one repeat (a smoke run, not a measurement)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

TASKS = ("semantic", "instance", "panoptic")
# model family -> (input size, queries, classes); mask logits are at 1/4 of the input
SETUPS = {"mask2former": ((384, 384), 100, 133), "oneformer": ((512, 680), 150, 150)}


def outputs(model: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (1, Q, K+1) peaked on one object class and mask logits (1, Q, h, w) holding confident
    rectangles, so every query passes the class, mask and overlap thresholds somewhere."""
    (height, width), queries, classes = SETUPS[model]
    h, w = height // 4, width // 4
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(1, queries, h, w, generator=g) - 6
    for q in range(queries):
        y0, x0 = torch.randint(0, h - 8, (1,), generator=g).item(), torch.randint(0, w - 8, (1,), generator=g).item()
        dy, dx = torch.randint(4, h // 3, (1,), generator=g).item(), torch.randint(4, w // 3, (1,), generator=g).item()
        masks[0, q, y0 : y0 + dy, x0 : x0 + dx] += 14
    class_logits = torch.randn(1, queries, classes + 1, generator=g)
    class_logits[0, torch.arange(queries), torch.randint(0, classes, (queries,), generator=g)] = 8.0
    return class_logits, masks


def baseline_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:maskformers/processing/postprocess.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    module = types.ModuleType("baseline_postprocess")
    exec(compile(source, f"{rev}:postprocess.py", "exec"), module.__dict__)
    return module


def make_call(library: str, model: str, task: str, target: tuple[int, int], rev: str):
    """A no-argument function running one post-processing call, returning (segmentation, segments)."""
    class_logits, mask_logits = outputs(model)
    input_size = SETUPS[model][0]
    if library == "transformers":
        from types import SimpleNamespace

        from transformers import Mask2FormerImageProcessor, OneFormerImageProcessor

        if model == "oneformer":
            processor = OneFormerImageProcessor()
            # class info without a download; a non-ADE20K name keeps its ADE20K-only label remap out of the way
            processor.metadata = {"thing_ids": list(range(SETUPS[model][2]))}
            processor.class_info_file = "coco_panoptic.json"
        else:
            processor = Mask2FormerImageProcessor()
        out = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
        method = getattr(processor, f"post_process_{task}_segmentation")
        kwargs = {"target_sizes": [target]}
        if task == "panoptic":
            kwargs["label_ids_to_fuse"] = set()
        if task == "semantic":
            return lambda: (method(out, **kwargs)[0], [])
        return lambda: (lambda r: (r["segmentation"], r["segments_info"]))(method(out, **kwargs)[0])
    if library == "baseline":
        module = baseline_module(rev)
        extra = {}
    else:
        import maskformers.processing as module

        extra = {"model": model}
    fn = getattr(module, f"post_process_{task}")
    kwargs = dict(input_size=input_size, target_sizes=[target], **extra)
    if task == "semantic":
        return lambda: (fn(class_logits, mask_logits, **kwargs)[0], [])
    return lambda: (lambda r: (r["segmentation"], r["segments_info"]))(fn(class_logits, mask_logits, **kwargs)[0])


def digest(segmentation: torch.Tensor, segments: list) -> str:
    """Hash of the map (as int64, so dtypes do not matter) and of the ids and labels of the segments."""
    h = hashlib.sha256(segmentation.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps([(s["id"], s["label_id"]) for s in segments]).encode())
    return h.hexdigest()[:16]


def child(library: str, model: str, task: str, target: tuple[int, int], repeats: int, rev: str) -> dict:
    call = make_call(library, model, task, target, rev)
    with torch.inference_mode():
        with PeakRSS() as peak:
            segmentation, segments = call()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return {"peak_mb": peak.mb, "ms": statistics.median(times) * 1e3, "digest": digest(segmentation, segments),
            "segments": len(segments)}


def run_child(library: str, model: str, task: str, target, repeats: int, rev: str) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import postprocess as p; "
        f"print(json.dumps(p.child({library!r}, {model!r}, {task!r}, {tuple(target)!r}, {repeats}, {rev!r})))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1333x1000 target, one repeat")
    parser.add_argument("--target", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--libraries", nargs="+", default=["maskformers", "baseline", "transformers"],
                        choices=["maskformers", "baseline", "transformers"])
    parser.add_argument("--baseline-rev", default="de91e15", help="git revision of the baseline postprocess.py")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    target = tuple(args.target) if args.target else ((1000, 1333) if args.quick else (3000, 4000))
    repeats = args.repeats or (1 if args.quick else 3)

    rows = []
    print(f"target {target[0]}x{target[1]} (height x width), median of {repeats}\n")
    print("| model | task | library | peak MB | ms | segments | same result as maskformers |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for task in args.tasks:
            ours = None
            for library in args.libraries:
                if library == "baseline" and model != "mask2former":
                    continue
                row = {"model": model, "task": task, "library": library,
                       **run_child(library, model, task, target, repeats, args.baseline_rev)}
                if library == "maskformers":
                    ours = row.get("digest")
                row["same_as_maskformers"] = None if ours is None or "digest" not in row else row["digest"] == ours
                rows.append(row)
                if "error" in row:
                    print(f"| {model} | {task} | {library} | failed: {row['error'][:80]} | | | |", flush=True)
                    continue
                same = {None: "-", True: "yes", False: "NO"}[row["same_as_maskformers"]]
                print(f"| {model} | {task} | {library} | {row['peak_mb']:.0f} | {row['ms']:.0f} | {row['segments']} "
                      f"| {same} |", flush=True)

    import transformers

    meta = {
        "target": list(target), "repeats": repeats, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "cpu_model": cpu_model(),
        "python": platform.python_version(), "baseline_rev": args.baseline_rev,
        "setups": {m: {"input": list(s[0]), "queries": s[1], "classes": s[2]} for m, s in SETUPS.items()},
    }
    out = args.out or HERE / "results" / f"postprocess{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
          f"{meta['transformers']}; median of {repeats}. JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
