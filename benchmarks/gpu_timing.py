"""GPU timing shared by the op benchmarks: wall time per call from CUDA events, kernel time per call from
torch.profiler, and the memory bandwidth that turns a byte count into a floor.

Wall time (``cuda_ms``) is what a caller sees: ``inner`` calls queued back to back between two events,
median over ``repeats``; it includes the Python and launch overhead whenever the GPU outruns the host.
Kernel time (``kernel_ms``) is the summed duration of every GPU kernel and memset/copy a call launches
(profiler), i.e. what the device itself spends; the two together say whether a row is GPU- or host-bound.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

__all__ = ["cuda_ms", "kernel_ms", "peak_bandwidth_tbs", "device_label"]

# HBM bandwidth (TB/s) by the names torch reports; a floor is bytes / bandwidth
_BANDWIDTH = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04), ("A100", 1.56),
              ("L40S", 0.864), ("RTX 4090", 1.008), ("RTX 3090", 0.936))


def device_label() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"


def peak_bandwidth_tbs() -> float | None:
    """Nominal DRAM bandwidth of the current GPU, None when unknown."""
    name = torch.cuda.get_device_name()
    return next((tbs for key, tbs in _BANDWIDTH if key in name), None)


def cuda_ms(fn: Callable[[], object], repeats: int, inner: int = 10, warmup: int = 2) -> float:
    """Median wall milliseconds per call of ``fn`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object], iters: int = 5) -> float | None:
    """Milliseconds per call that GPU kernels, memsets and copies run (torch.profiler), None if unavailable."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    except (RuntimeError, AttributeError):
        return None
    return total_us / 1e3 / iters
