"""End-to-end forward: maskformers vs transformers with the same weights, side by side.

Models: Mask2Former with the swin-tiny COCO-panoptic architecture (133 classes, 100 queries) and OneFormer
with the swin-tiny ADE20K architecture (150 classes, 150 queries, task "panoptic"). A random-init
transformers model is written with `save_pretrained` and loaded by both libraries, so both run the very
same weights (the hub checkpoints cannot be downloaded here; speed does not depend on the values). For
each image size both models run alternately in this process (median of repeats); the table gives the
ratio, the max difference of each library's class/mask logits to transformers' float32 output on the
same image, and peak memory (each model in a fresh child process: resident memory added during one
forward, see peak_memory.py).

Precisions: "float32"; "bfloat16" (both models cast to bfloat16); "autocast" (float32 weights under
torch.autocast("cpu", bfloat16)); "best16" (the default 16-bit row: each library in its fastest 16-bit CPU
mode, ours in bfloat16, transformers under bfloat16 autocast).

    python benchmarks/end_to_end.py                          # both models, their default sizes and precisions
    python benchmarks/end_to_end.py --model oneformer        # 512x512 and 512x683
    python benchmarks/end_to_end.py --quick                  # Mask2Former 640 and OneFormer 512x683, float32
    python benchmarks/end_to_end.py --profile 640            # where the time goes, per library
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_model
from peak_memory import PeakRSS

os.environ.setdefault("MASKFORMERS_STRICT_OPS", "1")

# precision -> (dtype of the weights and inputs, autocast to bfloat16)
PRECISIONS = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False), "autocast": (torch.float32, True)}
# each library in its fastest 16-bit CPU mode: our model in bfloat16, transformers under bfloat16 autocast
# (transformers with bfloat16 weights took 61 s for one 384x384 Mask2Former forward here, 11x our bfloat16)
BEST_16BIT = {"maskformers": "bfloat16", "transformers": "autocast"}
CHOICES = [*PRECISIONS, "best16"]


def resolve(precision: str, library: str) -> str:
    """The precision a library runs under a row's precision name ("best16" differs per library)."""
    return BEST_16BIT[library] if precision == "best16" else precision


# model -> (default image sizes, default precisions, quick size)
MODELS = {
    "mask2former": ([(384, 384), (640, 640)], ["float32", "best16"], (640, 640)),
    "oneformer": ([(512, 512), (512, 683)], ["float32", "best16"], (512, 683)),
}
# "the task is panoptic": CLIP start, the, task, is, panoptic, end; 0-padded to 77 (OneFormer's processor)
PANOPTIC_TASK = [49406, 518, 2246, 533, 26765, 49407] + [0] * 71


def hf_config(kind: str):
    from transformers import Mask2FormerConfig, OneFormerConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    if kind == "mask2former":
        return Mask2FormerConfig(backbone_config=backbone, num_labels=133, num_queries=100)
    return OneFormerConfig(backbone_config=backbone, num_labels=150, num_queries=150)


def hf_class(kind: str):
    import transformers

    return getattr(transformers, {"mask2former": "Mask2Former", "oneformer": "OneFormer"}[kind] + "ForUniversalSegmentation")


def write_checkpoint(kind: str, folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = hf_class(kind)(hf_config(kind)).eval()
    with torch.no_grad():  # give the zero-initialised parameters values, as a trained model has
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)


def load(library: str, kind: str, folder: Path, precision: str):
    precision = resolve(precision, library)
    if library == "transformers":
        model = hf_class(kind).from_pretrained(folder)
    else:
        import maskformers

        model = maskformers.from_pretrained(folder)
    return model.to(PRECISIONS[precision][0]).eval()


def forward(library: str, kind: str, model, pixel_values: torch.Tensor, precision: str = "float32"):
    precision = resolve(precision, library)
    extra = ()
    if kind == "oneformer":
        extra = (torch.tensor([PANOPTIC_TASK] * pixel_values.shape[0]),)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISIONS[precision][1]):
        out = model(pixel_values, *extra)
    if library == "transformers":
        return out.class_queries_logits, out.masks_queries_logits
    return out.class_logits, out.mask_logits


def peak_in_this_process(library: str, kind: str, folder: str, height: int, width: int, precision: str) -> float:
    model = load(library, kind, Path(folder), precision)
    dtype = PRECISIONS[resolve(precision, library)][0]
    forward(library, kind, model, torch.randn(1, 3, 64, 64, dtype=dtype), precision)  # lazy init, kernel load
    x = torch.randn(1, 3, height, width, dtype=dtype)
    with PeakRSS() as peak:
        forward(library, kind, model, x, precision)
    return peak.mb


def measure_peak_child(library: str, kind: str, folder: Path, size: tuple[int, int], precision: str) -> float:
    code = (
        "import sys; sys.path.insert(0, %r); import end_to_end as e; print(e.peak_in_this_process(%r, %r, %r, %d, %d, %r))"
        % (str(Path(__file__).parent), library, kind, str(folder), size[0], size[1], precision)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {library}:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def profile(kind: str, models: dict, size: tuple[int, int], rows: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = torch.randn(1, 3, *size)
    for library, model in models.items():
        forward(library, kind, model, x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(library, kind, model, x)
        print(f"\n### {library} {kind}, {size[0]}x{size[1]}, float32\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def run_model(kind: str, sizes, precisions, repeats: int, memory: bool, rows: list) -> None:
    libraries = ("transformers", "maskformers")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(kind, folder)
        # every row is compared with transformers' float32 output on the same image
        inputs = {size: torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 7 + size[1]))
                  for size in sizes}
        truth_model = load("transformers", kind, folder, "float32")
        truths = {size: forward("transformers", kind, truth_model, x) for size, x in inputs.items()}
        del truth_model
        for precision in precisions:
            models = {lib: load(lib, kind, folder, precision) for lib in libraries}
            for size in sizes:
                xs = {lib: inputs[size].to(PRECISIONS[resolve(precision, lib)][0]) for lib in libraries}
                outs = {lib: forward(lib, kind, models[lib], xs[lib], precision) for lib in libraries}  # warm-up
                times = {lib: [] for lib in libraries}
                for _ in range(repeats):
                    for lib in libraries:
                        t0 = time.perf_counter()
                        forward(lib, kind, models[lib], xs[lib], precision)
                        times[lib].append(time.perf_counter() - t0)
                ms = {lib: statistics.median(t) * 1e3 for lib, t in times.items()}
                row = {
                    "model": kind, "image": f"{size[0]}x{size[1]}", "precision": precision,
                    "transformers_ms": ms["transformers"], "maskformers_ms": ms["maskformers"],
                    "speedup": ms["transformers"] / ms["maskformers"],
                }
                for lib in libraries:  # max |difference| to transformers float32, class and mask logits
                    for name, got, want in zip(("class", "mask"), outs[lib], truths[size]):
                        row[f"{lib}_max_diff_{name}"] = (got.float() - want).abs().max().item()
                if memory:
                    for lib in libraries:
                        row[f"{lib}_peak_mb"] = measure_peak_child(lib, kind, folder, size, precision)
                rows.append(row)
                print_row(row, header=len(rows) == 1, memory=memory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mask2former", "oneformer", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="one size per model, float32, fewer repeats")
    parser.add_argument("--images", type=parse_size, nargs="+", default=None, metavar="HxW",
                        help="image sizes (default: per model)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=CHOICES,
                        help="best16: maskformers in bfloat16 against transformers under bfloat16 autocast")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", type=parse_size, default=None, metavar="HxW",
                        help="profile both libraries at this size (float32) and exit")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    kinds = list(MODELS) if args.model == "all" else [args.model]

    if args.profile:
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(kind, Path(tmp))
                models = {lib: load(lib, kind, Path(tmp), "float32") for lib in ("transformers", "maskformers")}
                profile(kind, models, args.profile)
        return 0
    rows: list[dict] = []
    for kind in kinds:
        sizes, precisions, quick_size = MODELS[kind]
        if args.quick:
            sizes, precisions = [quick_size], ["float32"]
        run_model(kind, args.images or sizes, args.precisions or precisions, repeats, not args.no_memory, rows)

    import transformers

    meta = {
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "repeats": repeats,
        "config": "Mask2Former swin-tiny coco-panoptic (133 classes, 100 queries); OneFormer swin-tiny ade20k "
                  "(150 classes, 150 queries, task panoptic); batch 1, CPU",
    }
    out = args.out or Path(__file__).parent / "results" / f"end_to_end{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"transformers {meta['transformers']}; median of {repeats}. JSON: {out}")
    return 0


def print_row(row, header: bool, memory: bool) -> None:
    if header:
        cols = ("| model | image | precision | transformers ms | maskformers ms | speedup | "
                "max diff class / mask: transformers | maskformers |")
        sep = "|---|---|---|---|---|---|---|---|"
        if memory:
            cols += " transformers peak MB | maskformers peak MB |"
            sep += "---|---|"
        print(cols)
        print(sep)
    line = (f"| {row['model']} | {row['image']} | {row['precision']} | {row['transformers_ms']:.0f} | "
            f"{row['maskformers_ms']:.0f} | "
            f"{row['speedup']:.2f}x | {row['transformers_max_diff_class']:.1e} / {row['transformers_max_diff_mask']:.1e} | "
            f"{row['maskformers_max_diff_class']:.1e} / {row['maskformers_max_diff_mask']:.1e} |")
    if memory:
        line += f" {row['transformers_peak_mb']:.0f} | {row['maskformers_peak_mb']:.0f} |"
    print(line, flush=True)



if __name__ == "__main__":
    sys.exit(main())
