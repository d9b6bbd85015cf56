"""End-to-end Mask2Former forward: maskformers vs transformers with the same weights, side by side.

A random-init transformers `Mask2FormerForUniversalSegmentation` with the swin-tiny COCO-panoptic
architecture (133 classes, 100 queries) is written with `save_pretrained` and loaded by both libraries,
so both run the very same weights (the hub checkpoints cannot be downloaded here; speed does not depend
on the values). For each image size both models run alternately in this process (median of repeats);
the table gives the ratio, the max difference of each library's class/mask logits to transformers'
float32 output on the same image, and peak memory (each model in a fresh child process: resident memory
added during one forward, see peak_memory.py).

    python benchmarks/end_to_end.py                 # 384 and 640, float32 and bfloat16
    python benchmarks/end_to_end.py --quick         # 640, float32
    python benchmarks/end_to_end.py --profile 640   # where the time goes, per library
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

from peak_memory import PeakRSS

os.environ.setdefault("MASKFORMERS_STRICT_OPS", "1")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def swin_tiny_coco_panoptic_config():
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(backbone_config=backbone, num_labels=133, num_queries=100)


def write_checkpoint(folder: Path, seed: int = 0) -> None:
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(swin_tiny_coco_panoptic_config()).eval()
    with torch.no_grad():  # give the zero-initialised parameters values, as a trained model has
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)


def load(library: str, folder: Path, dtype: torch.dtype):
    if library == "transformers":
        from transformers import Mask2FormerForUniversalSegmentation

        model = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
    else:
        from maskformers import Mask2Former

        model = Mask2Former.from_pretrained(folder)
    return model.to(dtype).eval()


def forward(library: str, model, pixel_values: torch.Tensor):
    with torch.inference_mode():
        out = model(pixel_values)
    if library == "transformers":
        return out.class_queries_logits, out.masks_queries_logits
    return out.class_logits, out.mask_logits


def peak_in_this_process(library: str, folder: str, image: int, dtype_name: str) -> float:
    model = load(library, Path(folder), DTYPES[dtype_name])
    forward(library, model, torch.randn(1, 3, 64, 64, dtype=DTYPES[dtype_name]))  # lazy init, kernel load
    x = torch.randn(1, 3, image, image, dtype=DTYPES[dtype_name])
    with PeakRSS() as peak:
        forward(library, model, x)
    return peak.mb


def measure_peak_child(library: str, folder: Path, image: int, dtype_name: str) -> float:
    code = (
        "import sys; sys.path.insert(0, %r); import end_to_end as e; "
        "print(e.peak_in_this_process(%r, %r, %d, %r))" % (str(Path(__file__).parent), library, str(folder), image, dtype_name)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {library}:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def profile(models: dict, image: int, dtype: torch.dtype, rows: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = torch.randn(1, 3, image, image, dtype=dtype)
    for library, model in models.items():
        forward(library, model, x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(library, model, x)
        print(f"\n### {library}, {image}x{image}, {dtype}\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="640x640 float32 only, fewer repeats")
    parser.add_argument("--images", type=int, nargs="+", default=[384, 640])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", type=int, default=None, metavar="IMAGE", help="profile both at this size and exit")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.dtypes = [640], ["float32"]
    repeats = args.repeats or (3 if args.quick else 7)

    libraries = ("transformers", "maskformers")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder)
        if args.profile:
            profile({lib: load(lib, folder, torch.float32) for lib in libraries}, args.profile, torch.float32)
            return 0
        # every row is compared with transformers' float32 output on the same image (in bfloat16,
        # transformers' own CPU output is NaN, see README)
        inputs = {image: torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(image))
                  for image in args.images}
        truth_model = load("transformers", folder, torch.float32)
        truths = {image: forward("transformers", truth_model, x) for image, x in inputs.items()}
        del truth_model
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            models = {lib: load(lib, folder, dtype) for lib in libraries}
            for image in args.images:
                x = inputs[image].to(dtype)
                outs = {lib: forward(lib, models[lib], x) for lib in libraries}  # warm-up and outputs
                times = {lib: [] for lib in libraries}
                for _ in range(repeats):
                    for lib in libraries:
                        t0 = time.perf_counter()
                        forward(lib, models[lib], x)
                        times[lib].append(time.perf_counter() - t0)
                ms = {lib: statistics.median(t) * 1e3 for lib, t in times.items()}
                row = {
                    "image": image, "dtype": dtype_name,
                    "transformers_ms": ms["transformers"], "maskformers_ms": ms["maskformers"],
                    "speedup": ms["transformers"] / ms["maskformers"],
                }
                for lib in libraries:  # max |difference| to transformers float32, class and mask logits
                    for name, got, want in zip(("class", "mask"), outs[lib], truths[image]):
                        row[f"{lib}_max_diff_{name}"] = (got.float() - want).abs().max().item()
                if not args.no_memory:
                    for lib in libraries:
                        row[f"{lib}_peak_mb"] = measure_peak_child(lib, folder, image, dtype_name)
                rows.append(row)
                print_row(row, header=len(rows) == 1, memory=not args.no_memory)

    import transformers

    meta = {
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "repeats": repeats,
        "config": "swin-tiny coco-panoptic (133 classes, 100 queries), batch 1, CPU",
    }
    out = args.out or Path(__file__).parent / "results" / f"end_to_end{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"transformers {meta['transformers']}; median of {repeats}. JSON: {out}")
    return 0


def print_row(row, header: bool, memory: bool) -> None:
    if header:
        cols = ("| image | dtype | transformers ms | maskformers ms | speedup | "
                "max diff class / mask: transformers | maskformers |")
        sep = "|---|---|---|---|---|---|---|"
        if memory:
            cols += " transformers peak MB | maskformers peak MB |"
            sep += "---|---|"
        print(cols)
        print(sep)
    line = (f"| {row['image']} | {row['dtype']} | {row['transformers_ms']:.0f} | {row['maskformers_ms']:.0f} | "
            f"{row['speedup']:.2f}x | {row['transformers_max_diff_class']:.1e} / {row['transformers_max_diff_mask']:.1e} | "
            f"{row['maskformers_max_diff_class']:.1e} / {row['maskformers_max_diff_mask']:.1e} |")
    if memory:
        line += f" {row['transformers_peak_mb']:.0f} | {row['maskformers_peak_mb']:.0f} |"
    print(line, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
