"""Benchmark of maskformers.ops.ms_deform_attn: reference (grid_sample) vs native kernel, side by side.

Shapes are the Mask2Former pixel-decoder encoder's: the stride 8/16/32 levels of a square image, every
position a query, 8 heads, D = 32, 4 points. For each row both implementations are timed alternately in
this one process (median of repeated runs, so machine noise hits both alike) and the ratio is printed.
Peak memory is measured per implementation in a fresh child process (CPU: resident memory added during
the call, see peak_memory.py; CUDA: torch.cuda.max_memory_allocated), so neither sees the other's caches.

    python benchmarks/ms_deform_attn.py            # full table
    python benchmarks/ms_deform_attn.py --quick    # one image size, batch 1, fewer repeats
    python benchmarks/ms_deform_attn.py --device cuda [--quick]   # every CUDA kernel variant side by side

On CUDA every kernel variant (maskformers.ops.kernel_variants()) and, when fetched and built
(benchmarks/original_msda.py), the original Deformable-DETR op are timed beside the reference on the same
inputs: wall ms per call (CUDA events) and kernel ms per call (torch.profiler), the ratio to our default
kernels, and the DRAM floor of the forward (value + locations + weights + output read/written once, at the
GPU's nominal bandwidth). Two location patterns: "uniform" (every sample anywhere in its level: no cache
reuse between neighbouring queries) and "local" (the encoder's: each query samples around its own pixel,
Deformable-DETR's initial offset pattern plus noise). ``run(device, quick)`` returns the rows for
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

from maskformers.ops import kernel_variants, ms_deform_attn, use_kernel_variant  # noqa: E402

HEADS, HEAD_DIM, POINTS, STRIDES = 8, 32, 4, (8, 16, 32)
IMPLS = ("reference", "native")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def level_shapes(image: int) -> list[tuple[int, int]]:
    """Encoder levels as Mask2Former orders them: stride 32 first."""
    return [(-(-image // s), -(-image // s)) for s in reversed(STRIDES)]


def local_locations(shapes: list[tuple[int, int]], batch: int, g: torch.Generator) -> torch.Tensor:
    """(B, S, HEADS, L, POINTS, 2) locations of the encoder: every position of every level is a query whose
    reference point is its own pixel centre; head h, point p samples (p + 1) pixels of the sampled level
    away in direction 2 pi h / HEADS (Deformable-DETR's initial offsets), plus N(0, 0.5 px) noise."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    ref = torch.cat(refs)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
    angle = torch.arange(HEADS) * (2 * torch.pi / HEADS)
    direction = torch.stack([angle.cos(), angle.sin()], -1)[:, None, None, :]  # (HEADS, 1, 1, 2)
    radius = (torch.arange(POINTS) + 1.0)[None, None, :, None]
    sides = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)[None, :, None, :]  # (1, L, 1, 2)
    offsets = direction * radius / sides  # (HEADS, L, POINTS, 2)
    noise = torch.randn(batch, ref.shape[1], HEADS, len(shapes), POINTS, 2, generator=g) * 0.5 / sides
    return ref + offsets + noise


def make_inputs(image: int, batch: int, dtype: torch.dtype, device: str, seed: int = 0, locations: str = "uniform"):
    g = torch.Generator().manual_seed(seed)
    shapes = level_shapes(image)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(shapes)
    value = torch.randn(batch, S, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    if locations == "local":
        loc = local_locations(shapes, batch, g).to(device)
    else:  # anywhere in the level (a little beyond its borders too)
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
    tiny_grad = torch.zeros(1, tiny[3].shape[1], HEADS * HEAD_DIM, device=device).to(tiny[0].dtype)
    run_once(impl, "forward+backward", tiny, tiny_grad)
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



# ----------------------------------------------------------------------------------------------
# CUDA: every kernel variant, the original op, the reference
# ----------------------------------------------------------------------------------------------


def cuda_impls() -> list[str]:
    """reference, native:<variant> for every kernel variant, original (the Deformable-DETR op, if built)."""
    return ["reference", *(f"native:{v}" for v in kernel_variants()["ms_deform_attn"]), "original"]


def _call(impl: str, mode: str, inputs, grad_out):
    """A closure running one call of `impl` in `mode`; None when impl cannot run these inputs."""
    value, shapes, starts, loc, weights = inputs
    if impl == "original":
        import original_msda

        if value.dtype not in (torch.float32, torch.float64) or original_msda.load() is None:
            return None
        op = original_msda.original_ms_deform_attn
        backend, variant = None, None
    else:
        op = ms_deform_attn
        backend, _, variant = impl.partition(":")
        backend = backend or None

    def once():
        with use_kernel_variant("ms_deform_attn", variant or None):
            if mode == "forward":
                with torch.no_grad():
                    return op(value, shapes, starts, loc, weights, **({"backend": backend} if backend else {}))
            args = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
            out = op(args[0], shapes, starts, args[1], args[2], **({"backend": backend} if backend else {}))
            out.backward(grad_out)

    return once


def forward_floor_bytes(inputs) -> int:
    """Bytes the forward must move at least once: value, locations, weights read, output written."""
    value, _, _, loc, weights = inputs
    out = value.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return value.nbytes + loc.nbytes + weights.nbytes + out


def run(device: str = "cuda", quick: bool = False, images=None, batches=None, dtypes=None, locations=None,
        repeats: int | None = None) -> list[dict]:
    """Time every implementation on CUDA; one dict per (image, batch, dtype, locations, pass) with
    ``ms`` and ``kernel_ms`` ({impl: milliseconds or None}), ``floor_ms`` (forward DRAM floor) and ratios."""
    from gpu_timing import cuda_ms, kernel_ms, peak_bandwidth_tbs

    assert device == "cuda", "run() times the CUDA kernels; the CPU table is main()'s"
    images = images or ([640] if quick else [640, 1024])
    batches = batches or ([1] if quick else [1, 8])
    dtypes = dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    locations = locations or ["uniform", "local"]
    repeats = repeats or (5 if quick else 20)
    bandwidth = peak_bandwidth_tbs()
    rows = []
    for image in images:
        for batch in batches:
            for dtype_name in dtypes:
                for pattern in locations:
                    inputs = make_inputs(image, batch, DTYPES[dtype_name], device, locations=pattern)
                    grad_out = torch.randn(batch, inputs[3].shape[1], HEADS * HEAD_DIM, device=device).to(
                        DTYPES[dtype_name])
                    floor = forward_floor_bytes(inputs) / (bandwidth * 1e9) if bandwidth else None
                    for mode in ("forward", "forward+backward"):
                        row = {"op": "ms_deform_attn", "image": image, "levels": level_shapes(image), "batch": batch,
                               "dtype": dtype_name, "locations": pattern, "pass": mode, "ms": {}, "kernel_ms": {},
                               "floor_ms": floor if mode == "forward" else None, "skipped": {}}
                        for impl in cuda_impls():
                            try:
                                fn = _call(impl, mode, inputs, grad_out)
                                if fn is None:
                                    row["skipped"][impl] = "does not run these inputs (or not built)"
                                    continue
                                row["ms"][impl] = cuda_ms(fn, repeats)
                                row["kernel_ms"][impl] = kernel_ms(fn)
                            except RuntimeError as exc:  # e.g. a variant that does not apply (strict mode)
                                row["skipped"][impl] = str(exc).splitlines()[0][:200]
                        base = row["ms"].get("native:default")
                        row["vs_default"] = {k: base / v for k, v in row["ms"].items()} if base else {}
                        rows.append(row)
                        print_cuda_row(row, header=len(rows) == 1)
    return rows


def print_cuda_row(row, header: bool) -> None:
    impls = cuda_impls()
    if header:
        print("| image | B | dtype | locations | pass | floor ms | " + " | ".join(impls) + " |")
        print("|---" * (6 + len(impls)) + "|")
    cells = []
    for impl in impls:
        ms, kern = row["ms"].get(impl), row["kernel_ms"].get(impl)
        if ms is None:
            cells.append("-")
            continue
        ratio = row["vs_default"].get(impl)
        cells.append(f"{ms:.3f} ({kern:.3f} gpu)" if kern is not None else f"{ms:.3f}")
        if ratio is not None and impl != "native:default":
            cells[-1] += f" {ratio:.2f}x"
    floor = f"{row['floor_ms']:.3f}" if row["floor_ms"] else "-"
    print(f"| {row['image']} | {row['batch']} | {row['dtype']} | {row['locations']} | {row['pass']} | {floor} | "
          + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="640x640, batch 1, float32, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--locations", nargs="+", default=None, choices=["uniform", "local"],
                        help="CUDA: location patterns (default both)")
    parser.add_argument("--images", type=int, nargs="+", default=[384, 640, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory probes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return cuda_main(args, argv)
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
    name = f"ms_deform_attn{'-quick' if args.quick else ''}-{args.device}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}; median of {repeats}. JSON: {out}")
    return 0


def cuda_main(args, argv) -> int:
    from gpu_timing import device_label

    explicit = argv or sys.argv[1:]
    rows = run("cuda", args.quick,
               images=args.images if "--images" in explicit else None,
               batches=args.batches if "--batches" in explicit else None,
               dtypes=args.dtypes if "--dtypes" in explicit else None,
               locations=args.locations, repeats=args.repeats)
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cuda", "gpu": device_label(),
            "heads": HEADS, "head_dim": HEAD_DIM, "points": POINTS, "variants": kernel_variants()["ms_deform_attn"]}
    out = args.out or Path(__file__).parent / "results" / f"ms_deform_attn{'-quick' if args.quick else ''}-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['gpu']}, torch {meta['torch']}; wall ms (gpu kernel ms) per call, ratio to native:default. "
          f"JSON: {out}")
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
