"""Benchmark of maskformers.ops.ms_deform_attn: reference (grid_sample) vs native kernel, side by side.

Shapes are the Mask2Former pixel-decoder encoder's: the stride 8/16/32 levels of a square image, every
position a query, 8 heads, D = 32, 4 points. For each row both implementations are timed alternately in
this one process (median of repeated runs, so machine noise hits both alike) and the ratio is printed.
Peak memory is measured per implementation in a fresh child process (CPU: resident memory added during
the call, see peak_memory.py; CUDA: torch.cuda.max_memory_allocated), so neither sees the other's caches.

    python benchmarks/ms_deform_attn.py            # full table
    python benchmarks/ms_deform_attn.py --quick    # one image size, batch 1, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# The benchmark must never time the fallback while calling it "native".
os.environ["MASKFORMERS_STRICT_OPS"] = "1"

from maskformers.ops import ms_deform_attn  # noqa: E402
from machine import cpu_model  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

HEADS, HEAD_DIM, POINTS, STRIDES = 8, 32, 4, (8, 16, 32)
IMPLS = ("reference", "native")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def level_shapes(image: int) -> list[tuple[int, int]]:
    """Encoder levels as Mask2Former orders them: stride 32 first."""
    return [(-(-image // s), -(-image // s)) for s in reversed(STRIDES)]


def make_inputs(image: int, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = level_shapes(image)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(shapes)
    value = torch.randn(batch, S, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    # reference points near each query's own pixel plus small offsets, as in the encoder
    loc = (torch.rand(batch, S, HEADS, L, POINTS, 2, generator=g) * 1.1 - 0.05).to(device)
    logits = torch.randn(batch, S, HEADS, L * POINTS, generator=g)
    weights = logits.softmax(-1).view(batch, S, HEADS, L, POINTS).to(device)
    if dtype != torch.float32:
        loc, weights = loc.to(dtype), weights.to(dtype)
    return value, spatial_shapes, level_start_index, loc, weights


def run_once(impl: str, mode: str, inputs, grad_out=None) -> None:
    value, shapes, starts, loc, weights = inputs
    if mode == "forward":
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, loc, weights, backend=impl)
        return
    args = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn(args[0], shapes, starts, args[1], args[2], backend=impl)
    out.backward(grad_out)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_row(image, batch, dtype_name, mode, device, repeats, warmup):
    inputs = make_inputs(image, batch, DTYPES[dtype_name], device)
    grad_out = None
    if mode == "forward+backward":
        B, Q, H, D = batch, inputs[3].shape[1], HEADS, HEAD_DIM
        grad_out = torch.randn(B, Q, H * D, device=device).to(DTYPES[dtype_name])
    times = {impl: [] for impl in IMPLS}
    for _ in range(warmup):
        for impl in IMPLS:
            run_once(impl, mode, inputs, grad_out)
    sync(device)
    for _ in range(repeats):
        for impl in IMPLS:  # alternate so slow phases of the machine hit both
            sync(device)
            t0 = time.perf_counter()
            run_once(impl, mode, inputs, grad_out)
            sync(device)
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) * 1e3 for impl, ts in times.items()}


def measure_peak_child(image, batch, dtype_name, impl, device) -> dict[str, float]:
    """Run in a fresh interpreter: peak extra memory (MB) of forward, then of forward+backward."""
    code = (
        "import sys, json; sys.path.insert(0, %r); import ms_deform_attn as b; "
        "print(json.dumps(b._peak_in_this_process(%d, %d, %r, %r, %r)))"
        % (str(Path(__file__).parent), image, batch, dtype_name, impl, device)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl} {image} b{batch} {dtype_name}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_in_this_process(image, batch, dtype_name, impl, device) -> dict[str, float]:
    inputs = make_inputs(image, batch, DTYPES[dtype_name], device)
    grad_out = torch.randn(batch, inputs[3].shape[1], HEADS * HEAD_DIM, device=device).to(DTYPES[dtype_name])
    result = {}
    # The kernel build (native) and lazy library loading happen once, outside the measurement.
    tiny = make_inputs(16, 1, DTYPES[dtype_name], device)
    run_once(impl, "forward", tiny)
    run_once(impl, "forward+backward", tiny, torch.zeros(1, tiny[3].shape[1], HEADS * HEAD_DIM, device=device).to(tiny[0].dtype))
    for mode in ("forward", "forward+backward"):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_base = torch.cuda.memory_allocated()
            run_once(impl, mode, inputs, grad_out)
            torch.cuda.synchronize()
            result[mode] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
        else:
            with PeakRSS() as peak:
                run_once(impl, mode, inputs, grad_out)
            result[mode] = peak.mb
    return result



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="640x640, batch 1, float32, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, nargs="+", default=[384, 640, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory probes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batches, args.dtypes = [640], [1], ["float32"]
    repeats = args.repeats or (5 if args.quick else 10)
    warmup = 1 if args.quick else 2

    rows = []
    for image in args.images:
        for batch in args.batches:
            for dtype_name in args.dtypes:
                peaks = {}
                if not args.no_memory:
                    peaks = {impl: measure_peak_child(image, batch, dtype_name, impl, args.device) for impl in IMPLS}
                for mode in ("forward", "forward+backward"):
                    ms = time_row(image, batch, dtype_name, mode, args.device, repeats, warmup)
                    row = {
                        "image": image, "levels": level_shapes(image), "batch": batch, "dtype": dtype_name,
                        "pass": mode, "reference_ms": ms["reference"], "native_ms": ms["native"],
                        "speedup": ms["reference"] / ms["native"],
                    }
                    if peaks:
                        row["reference_peak_mb"] = peaks["reference"][mode]
                        row["native_peak_mb"] = peaks["native"][mode]
                    rows.append(row)
                    print_row(row, header=len(rows) == 1, memory=bool(peaks))

    meta = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
        "cpu_model": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "heads": HEADS, "head_dim": HEAD_DIM, "points": POINTS, "repeats": repeats,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    out = args.out or Path(__file__).parent / "results" / f"ms_deform_attn{'-quick' if args.quick else ''}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}; median of {repeats}. JSON: {out}")
    return 0


def print_row(row, header: bool, memory: bool) -> None:
    if header:
        cols = "| image | levels (h=w) | B | dtype | pass | reference ms | native ms | speedup |"
        sep = "|---|---|---|---|---|---|---|---|"
        if memory:
            cols += " reference peak MB | native peak MB |"
            sep += "---|---|"
        print(cols)
        print(sep)
    levels = "/".join(str(h) for h, _ in row["levels"])
    line = (f"| {row['image']} | {levels} | {row['batch']} | {row['dtype']} | {row['pass']} | "
            f"{row['reference_ms']:.2f} | {row['native_ms']:.2f} | {row['speedup']:.1f}x |")
    if memory:
        line += f" {row['reference_peak_mb']:.0f} | {row['native_peak_mb']:.0f} |"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
