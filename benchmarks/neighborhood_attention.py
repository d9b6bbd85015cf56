"""Benchmark of maskformers.ops.neighborhood_attention_2d: reference (PyTorch) vs native kernel.

Shapes are DiNAT-L's as OneFormer runs it (kernel 11, head dim 32, 6/12/24/48 heads at strides
4/8/16/32) on a 512x512 and an 800x1333 image padded to a multiple of 32. Each stage is timed with
dilation 1 and with the largest dilation of OneFormer's 640-pixel schedule; like DiNAT, a map smaller than
kernel * dilation is padded to that size first, so the row shows the map the op really sees. Both
implementations are timed alternately in one process (median of repeats) and their ratio printed; peak
memory is measured per implementation in a fresh child process (CPU: resident memory added during the
call, see peak_memory.py; CUDA: torch.cuda.max_memory_allocated).

The reference keeps K*K-fold copies of key and value for its backward, so reference forward+backward
rows whose estimate exceeds --max-reference-gb are skipped (and say so) instead of swapping the machine.

    python benchmarks/neighborhood_attention.py            # full table
    python benchmarks/neighborhood_attention.py --quick    # 512x512, dilation 1 only, fewer repeats
    python benchmarks/neighborhood_attention.py --device cuda [--quick]   # CUDA variants and FlexAttention

On CUDA (bfloat16 by default) every kernel variant (maskformers.ops.kernel_variants()) and FlexAttention
with a neighbourhood block mask and a bias score_mod (benchmarks/na_flex.py, compiled; the same semantics)
are timed beside the reference: wall ms per call (CUDA events) and GPU kernel ms per call (torch.profiler),
with the ratio to our default kernel and to FlexAttention. ``run(device, quick)`` returns the rows for
benchmarks/gpu_suite.py.
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

from machine import cpu_model  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

from maskformers.ops import kernel_variants, neighborhood_attention_2d, use_kernel_variant  # noqa: E402

KERNEL, HEAD_DIM = 11, 32
HEADS = (6, 12, 24, 48)  # DiNAT-L per stage
MAX_DILATION = (20, 10, 5, 2)  # OneFormer DiNAT-L, 640 schedule: largest dilation per stage
IMAGES = {"512x512": (512, 512), "800x1333": (800, 1333)}
IMPLS = ("reference", "native")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stage_map(image: tuple[int, int], stage: int, dilation: int) -> tuple[int, int]:
    """(h, w) the op sees at `stage` (0-3): the padded image at stride 4 * 2**stage, padded to the window."""
    stride = 4 * 2**stage
    h, w = (-(-side // 32) * 32 // stride for side in image)
    window = KERNEL * dilation
    return max(h, window), max(w, window)


def make_inputs(shape, heads, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    q, k, v = (torch.randn(1, h, w, heads, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g).to(device, dtype)
    return q, k, v, rpb


def run_once(impl, mode, inputs, dilation, grad_out=None) -> None:
    if mode == "forward":
        with torch.no_grad():
            neighborhood_attention_2d(*inputs, kernel_size=KERNEL, dilation=dilation, backend=impl)
        return
    args = [t.detach().requires_grad_(True) for t in inputs]
    out = neighborhood_attention_2d(*args, kernel_size=KERNEL, dilation=dilation, backend=impl)
    out.backward(grad_out)


def reference_backward_gb(shape, heads, dtype) -> float:
    """What the reference keeps for its backward: K*K-fold key and value copies plus the attention."""
    pixels = shape[0] * shape[1]
    size = torch.finfo(dtype).bits // 8
    return (2 * KERNEL**2 * pixels * heads * HEAD_DIM + 3 * pixels * heads * KERNEL**2) * size / 2**30


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_impls(impls, mode, inputs, dilation, grad_out, device, repeats, warmup):
    times = {impl: [] for impl in impls}
    for _ in range(warmup):
        for impl in impls:
            run_once(impl, mode, inputs, dilation, grad_out)
    for _ in range(repeats):
        for impl in impls:  # alternate so slow phases of the machine hit both
            sync(device)
            t0 = time.perf_counter()
            run_once(impl, mode, inputs, dilation, grad_out)
            sync(device)
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) * 1e3 for impl, ts in times.items()}


def measure_peak_child(shape, heads, dilation, dtype_name, impl, mode, device) -> float:
    code = (
        "import sys, json; sys.path.insert(0, %r); import neighborhood_attention as b; "
        "print(json.dumps(b._peak_in_this_process(%r, %d, %d, %r, %r, %r, %r)))"
        % (str(Path(__file__).parent), tuple(shape), heads, dilation, dtype_name, impl, mode, device)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl} {shape} {mode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_in_this_process(shape, heads, dilation, dtype_name, impl, mode, device) -> float:
    dtype = DTYPES[dtype_name]
    tiny = make_inputs((KERNEL * dilation, KERNEL * dilation), heads, dtype, device)
    run_once(impl, mode, tiny, dilation, torch.ones_like(tiny[0]))  # build / load outside the measurement
    inputs = make_inputs(shape, heads, dtype, device)
    grad_out = torch.randn_like(inputs[0])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(impl, mode, inputs, dilation, grad_out)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as peak:
        run_once(impl, mode, inputs, dilation, grad_out)
    return peak.mb



def print_row(row, header: bool) -> None:
    if header:
        print("| image | stage | map (h x w) | heads | dilation | dtype | pass | reference ms | native ms | speedup "
              "| reference peak MB | native peak MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    def fmt(x, spec):
        return "skipped" if x is None else format(x, spec)

    speed = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
    print(f"| {row['image']} | {row['stage']} | {row['map'][0]} x {row['map'][1]} | {row['heads']} | {row['dilation']} "
          f"| {row['dtype']} | {row['pass']} | {fmt(row['reference_ms'], '.1f')} | {row['native_ms']:.1f} | {speed} "
          f"| {fmt(row.get('reference_peak_mb'), '.0f')} | {fmt(row.get('native_peak_mb'), '.0f')} |", flush=True)


# ----------------------------------------------------------------------------------------------
# CUDA: every kernel variant, FlexAttention, the reference
# ----------------------------------------------------------------------------------------------


def cuda_impls() -> list[str]:
    return ["reference", *(f"native:{v}" for v in kernel_variants()["neighborhood_attention"]), "flex"]


def _call(impl: str, mode: str, inputs, dilation: int, grad_out):
    """A closure running one call of `impl` in `mode`."""
    if impl == "flex":
        from na_flex import flex_neighborhood_attention

        def op(q, k, v, rpb):
            return flex_neighborhood_attention(q, k, v, rpb, kernel_size=KERNEL, dilation=dilation)
    else:
        backend, _, variant = impl.partition(":")

        def op(q, k, v, rpb):
            with use_kernel_variant("neighborhood_attention", variant or None):
                return neighborhood_attention_2d(q, k, v, rpb, kernel_size=KERNEL, dilation=dilation, backend=backend)

    def once():
        if mode == "forward":
            with torch.no_grad():
                return op(*inputs)
        args = [t.detach().requires_grad_(True) for t in inputs]
        op(*args).backward(grad_out)

    return once


def run(device: str = "cuda", quick: bool = False, images=None, stages=None, dtypes=None, repeats: int | None = None,
        max_reference_gb: float = 8.0) -> list[dict]:
    """Time every implementation on CUDA; one dict per (image, stage, dilation, dtype, pass) with ``ms`` and
    ``kernel_ms`` ({impl: milliseconds}), ``skipped`` ({impl: why}) and ratios to our default kernel
    (``vs_default``) and to FlexAttention (``vs_flex``)."""
    from gpu_timing import cuda_ms, kernel_ms

    assert device == "cuda", "run() times the CUDA kernels; the CPU table is main()'s"
    images = images or (["512x512"] if quick else list(IMAGES))
    stages = stages if stages is not None else ([0] if quick else [0, 1, 2, 3])
    dtypes = dtypes or ["bfloat16"]
    repeats = repeats or (5 if quick else 20)
    rows = []
    for image in images:
        for stage in stages:
            for dilation in sorted({1, MAX_DILATION[stage]}):
                shape, heads = stage_map(IMAGES[image], stage, dilation), HEADS[stage]
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    inputs = make_inputs(shape, heads, dtype, device)
                    grad_out = torch.randn_like(inputs[0])
                    for mode in ("forward", "forward+backward"):
                        row = {"op": "neighborhood_attention", "image": image, "stage": stage + 1, "map": shape,
                               "heads": heads, "dilation": dilation, "dtype": dtype_name, "pass": mode, "ms": {},
                               "kernel_ms": {}, "skipped": {}}
                        for impl in cuda_impls():
                            if (impl == "reference" and mode != "forward"
                                    and reference_backward_gb(shape, heads, dtype) > max_reference_gb):
                                row["skipped"][impl] = "saved tensors exceed max_reference_gb"
                                continue
                            try:
                                fn = _call(impl, mode, inputs, dilation, grad_out)
                                row["ms"][impl] = cuda_ms(fn, repeats)
                                row["kernel_ms"][impl] = kernel_ms(fn)
                            except Exception as exc:  # a variant that does not apply (strict), a flex limit ...
                                row["skipped"][impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        default, flex = row["ms"].get("native:default"), row["ms"].get("flex")
                        row["vs_default"] = {k: default / v for k, v in row["ms"].items()} if default else {}
                        row["vs_flex"] = {k: flex / v for k, v in row["ms"].items()} if flex else {}
                        rows.append(row)
                        print_cuda_row(row, header=len(rows) == 1)
    return rows


def print_cuda_row(row, header: bool) -> None:
    impls = cuda_impls()
    if header:
        print("| image | stage | map | heads | dil | dtype | pass | " + " | ".join(impls) + " |")
        print("|---" * (7 + len(impls)) + "|")
    cells = []
    for impl in impls:
        ms, kern = row["ms"].get(impl), row["kernel_ms"].get(impl)
        if ms is None:
            cells.append("-")
            continue
        cells.append(f"{ms:.3f} ({kern:.3f} gpu)" if kern is not None else f"{ms:.3f}")
        if impl.startswith("native") and row["vs_flex"].get(impl):
            cells[-1] += f" {row['vs_flex'][impl]:.2f}x flex"
    print(f"| {row['image']} | {row['stage']} | {row['map'][0]}x{row['map'][1]} | {row['heads']} | {row['dilation']} "
          f"| {row['dtype']} | {row['pass']} | " + " | ".join(cells) + " |", flush=True)


def cuda_main(args, argv) -> int:
    from gpu_timing import device_label

    explicit = argv or sys.argv[1:]
    rows = run("cuda", args.quick, images=args.images if "--images" in explicit else None,
               stages=args.stages if "--stages" in explicit else None,
               dtypes=args.dtypes if "--dtypes" in explicit else None, repeats=args.repeats,
               max_reference_gb=args.max_reference_gb)
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cuda", "gpu": device_label(),
            "kernel_size": KERNEL, "head_dim": HEAD_DIM, "variants": kernel_variants()["neighborhood_attention"]}
    name = f"neighborhood_attention{'-quick' if args.quick else ''}-cuda.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['gpu']}, torch {meta['torch']}; wall ms (gpu kernel ms) per call, ratio to FlexAttention. "
          f"JSON: {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512x512, dilation 1, float32, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-reference-gb", type=float, default=8.0,
                        help="skip reference forward+backward rows whose saved tensors would exceed this")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory probes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return cuda_main(args, argv)
    if args.quick:
        args.images, args.dtypes = ["512x512"], ["float32"]
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = 1

    rows = []
    for image in args.images:
        for stage in args.stages:
            dilations = [1] if args.quick else sorted({1, MAX_DILATION[stage]})
            for dilation in dilations:
                shape, heads = stage_map(IMAGES[image], stage, dilation), HEADS[stage]
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    inputs = make_inputs(shape, heads, dtype, args.device)
                    grad_out = torch.randn_like(inputs[0])
                    for mode in ("forward", "forward+backward"):
                        impls = list(IMPLS)
                        if mode != "forward" and reference_backward_gb(shape, heads, dtype) > args.max_reference_gb:
                            impls = ["native"]
                        ms = time_impls(impls, mode, inputs, dilation, grad_out, args.device, repeats, warmup)
                        row = {
                            "image": image, "stage": stage + 1, "map": shape, "heads": heads, "dilation": dilation,
                            "dtype": dtype_name, "pass": mode, "reference_ms": ms.get("reference"),
                            "native_ms": ms["native"],
                            "speedup": ms["reference"] / ms["native"] if "reference" in ms else None,
                        }
                        if not args.no_memory:
                            for impl in IMPLS:
                                row[f"{impl}_peak_mb"] = (
                                    measure_peak_child(shape, heads, dilation, dtype_name, impl, mode, args.device)
                                    if impl in impls else None
                                )
                        if "reference" not in impls:
                            row["reference_skipped"] = (
                                f"needs ~{reference_backward_gb(shape, heads, dtype):.1f} GB > --max-reference-gb")
                        rows.append(row)
                        print_row(row, header=len(rows) == 1)

    meta = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
        "cpu_model": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "kernel_size": KERNEL, "head_dim": HEAD_DIM, "repeats": repeats,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    out = args.out or Path(__file__).parent / "results" / (
        f"neighborhood_attention{'-quick' if args.quick else ''}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}; median of {repeats}. JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
