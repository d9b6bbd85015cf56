"""The one command to run on a GPU machine: build, check and time everything GPU-related, in one go.

    python benchmarks/gpu_suite.py                      # everything, within --budget (450 s by default)
    python benchmarks/gpu_suite.py --quick              # without the 1024x1024 batch-8 rows and the extras
    python benchmarks/gpu_suite.py --only ops training  # some sections again
    python benchmarks/gpu_suite.py --device cpu --smoke # tiny models and shapes on the CPU, seconds (a test runs it)

Sections, in priority order (each in its own try/except: an error is recorded in the JSON and the suite goes
on; a section that would not fit the time budget, ``--budget`` seconds, is skipped and says so):

1. environment: versions, the GPU, its compute capability.
2. build: both native ops (ms_deform_attn, neighborhood_attention) compiled for the visible GPU, timed.
3. correctness: each op in every dtype against its float64 reference, gradcheck in float64, NaN
   propagation as in the reference; the whole forward of both models under
   ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation) and captured in a CUDA graph.
4. models: Mask2Former swin-tiny (COCO panoptic, 133 classes, 100 queries) and OneFormer swin-tiny (ADE20K,
   150 classes, 150 queries), batch 1 at 640x640 and batch 8 at 1024x1024 (not with --quick): ours in
   bfloat16 eager, under bfloat16 autocast, compiled (inductor, fullgraph), compiled and replayed as a CUDA
   graph, eager replayed as a CUDA graph, ``mode="reduce-overhead"`` (not with --quick); transformers under
   bfloat16 autocast and in bfloat16 (and compiled, not with --quick). Same weights (a transformers
   checkpoint loaded by both); max difference to transformers' float32 output at 640.
5. ops: ms_deform_attn at the Mask2Former encoder shapes and neighborhood attention at DiNAT-L shapes,
   forward and forward+backward, the default native kernel against the reference. (The correctness section
   also checks every kernel variant of ``maskformers.ops.kernel_variants()``, forward and gradients.)
6. training: one step (forward, matching, losses, backward, AdamW) under bfloat16 autocast, Mask2Former
   swin-tiny, 2 crops of 640 and 8 of 384, ours against transformers' own loss: time and peak memory.
7. post-processing: panoptic, instance and semantic on the GPU for a batch of 8 at 1024, time and the
   number of host synchronisations per call.
8. kernels: every CUDA kernel variant beside the default kernel, FlexAttention (neighborhood attention) and
   the original Deformable-DETR op (when ``python benchmarks/original_msda.py fetch`` has put its source in the
   git-ignored benchmarks/_original: carry that folder to the GPU machine), the op benchmarks' ``run()``.

Prints one markdown table and writes JSON (``--out``, default benchmarks/results/gpu_suite.json) after
every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402

# Kernel variants behind flags (maskformers.ops.kernel_variants()): (op, variant name, the environment variable
# that selects it). Each is checked against the float64 reference (forward and every gradient, in the dtypes it
# runs); the "kernels" section times them all beside the default kernel, FlexAttention and the original
# Deformable-DETR op (the run() of benchmarks/ms_deform_attn.py and neighborhood_attention.py).
VARIANT_ENV = {"ms_deform_attn": "MASKFORMERS_MSDA_VARIANT", "neighborhood_attention": "MASKFORMERS_NA_VARIANT"}
# the tensor-core kernels run bfloat16 / float16 only (other dtypes fall back, an error under strict ops)
VARIANT_DTYPES = {"neighborhood_attention": ("bfloat16", "float16")}


def op_variants() -> list[tuple[str, str, dict[str, str]]]:
    from maskformers.ops import kernel_variants

    return [(op, name, {VARIANT_ENV[op]: name}) for op, names in kernel_variants().items() for name in names
            if name != "default"]


OP_VARIANTS: list[tuple[str, str, dict[str, str]]] = op_variants()

OPS = ("ms_deform_attn", "neighborhood_attention")
# "the task is panoptic" as CLIP ids, zero-padded to 77 (OneFormer's processor)
PANOPTIC_TASK = [49406, 518, 2246, 533, 26765, 49407] + [0] * 71


# ------------------------------------------------------------------------------------------ plumbing
class Suite:
    """Sections with a time budget; results written to JSON after every row."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.out: Path = args.out
        self.data: dict = {"meta": {}, "sections": {}, "rows": []}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)

    def section(self, name: str, fn: Callable[[], None], *, needs_s: float = 0.0, cuda_only: bool = False) -> None:
        record: dict = {"status": "running"}
        self.data["sections"][name] = record
        if cuda_only and not self.cuda:
            record["status"] = "skipped: needs CUDA"
        elif self.left() < needs_s:
            record["status"] = f"skipped: {self.left():.0f} s of the budget left, needs about {needs_s:.0f} s"
        else:
            t0 = time.perf_counter()
            try:
                fn()
                record["status"] = "ok"
            except Exception as exc:  # the suite must go on: record and continue
                record["status"] = "error"
                record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                record["traceback"] = traceback.format_exc()[-4000:]
                print(f"[{name}] ERROR {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
            record["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {record['status']} ({record.get('seconds', 0)} s, {self.left():.0f} s left)", flush=True)
        self.save()

    def row(self, section: str, case: str, mode: str, ms: float | None = None, **extra) -> None:
        row = {"section": section, "case": case, "mode": mode, "ms": ms, **extra}
        self.data["rows"].append(row)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
        print(f"  {section} | {case} | {mode} | {_fmt(ms)} ms | {shown}", flush=True)
        self.save()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], repeats: int | None = None, warmup: int = 2) -> float:
        """Median milliseconds of ``fn`` (CUDA events on the GPU)."""
        repeats = repeats or self.args.repeats
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_mb(self, fn: Callable[[], object]) -> float | None:
        """Peak device memory allocated during ``fn`` beyond what was allocated before (CUDA only)."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], object]:
    """``fn`` captured once in a ``torch.cuda.CUDAGraph`` (fails if it synchronises with the host); returns
    the replay. Inputs must be static tensors that ``fn`` closes over."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ------------------------------------------------------------------------------------------ sections
def section_environment(s: Suite) -> None:
    meta = s.data["meta"]
    meta.update({"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                 "cpu_model": cpu_model(), "device": str(s.device), "smoke": s.args.smoke, "quick": s.args.quick,
                 "budget_s": s.args.budget})
    if s.cuda:
        props = torch.cuda.get_device_properties(s.device)
        meta.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gb": round(props.total_memory / 2**30, 1)})
    for name in ("transformers", "timm"):
        try:
            meta[name] = __import__(name).__version__
        except ImportError:
            meta[name] = None
    s.save()


def section_build(s: Suite) -> None:
    from maskformers.ops import build

    for op in OPS:
        t0 = time.perf_counter()
        build.load_extension(s.device.type, op)
        s.row("build", op, "native", build_s=round(time.perf_counter() - t0, 1))


# --- the ops' inputs
def msda_inputs(levels, batch, queries, heads=8, dim=32, points=4, *, dtype, device, seed=0, grad=False):
    from maskformers.ops.validation import coord_dtype

    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in levels)
    value = torch.randn(batch, S, heads, dim, generator=g).to(device, dtype)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g).to(device, coord_dtype(dtype))
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=g).to(device, coord_dtype(dtype))
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return [t.requires_grad_(grad) for t in (value, loc, weights)]


def msda(backend: str, levels, value, loc, weights):
    from maskformers.ops import ms_deform_attn

    return ms_deform_attn(value, list(levels), None, loc, weights, backend=backend)


def na_inputs(shape, heads, dim=32, kernel=7, *, dtype, device, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, *shape, heads, dim, generator=g).to(device, dtype).requires_grad_(grad)
               for _ in range(3))
    rpb = (torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g) * 0.1).to(device, dtype).requires_grad_(grad)
    return q, k, v, rpb


def na(backend: str, kernel, dilation, q, k, v, rpb):
    from maskformers.ops import neighborhood_attention_2d

    return neighborhood_attention_2d(q, k, v, rpb, kernel_size=kernel, dilation=dilation, backend=backend)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |native - float64 reference| allowed per dtype, relative to the output's scale (O(1) here)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def _check_op(s: Suite, op: str, variant: str = "native") -> None:
    """Every dtype against the float64 reference, gradcheck in float64, NaN propagation."""
    levels, kernel, dilation = [(5, 7), (3, 4)], 3, 2
    for name, dtype in DTYPES.items():
        if op == "ms_deform_attn":
            args = msda_inputs(levels, 2, 9, heads=2, dim=8, dtype=dtype, device=s.device)
            got = msda("native", levels, *args).double()
            want = msda("reference", levels, *[t.double() for t in args])
        else:
            args = na_inputs((9, 11), 2, dim=8, kernel=kernel, dtype=dtype, device=s.device)
            got = na("native", kernel, dilation, *args).double()
            want = na("reference", kernel, dilation, *[t.double() for t in args])
        err = (got - want).abs().max().item()
        s.row("correctness", f"{op} vs float64 reference", f"{variant} {name}", max_abs_err=err,
              ok=err <= TOLERANCE[name])
    if op == "ms_deform_attn":
        args = msda_inputs([(3, 4), (2, 2)], 1, 3, heads=2, dim=4, dtype=torch.float64, device=s.device, grad=True)
        ok = torch.autograd.gradcheck(lambda *a: msda("native", [(3, 4), (2, 2)], *a), args, atol=1e-6)
        s.row("correctness", f"{op} gradcheck float64", variant, ok=bool(ok))
        value, loc, weights = msda_inputs(levels, 1, 4, heads=2, dim=4, dtype=torch.float32, device=s.device)
        loc = loc.clone()
        loc[0, 1, 0, 0, 0, 0] = float("nan")
        loc[0, 2, 1, 1, 2, 1] = float("inf")
        got = msda("native", levels, value, loc, weights).isnan()
        want = msda("reference", levels, value, loc, weights).isnan()
        s.row("correctness", f"{op} NaN/Inf locations", variant, ok=bool(torch.equal(got, want)),
              nan_outputs=int(want.sum()))
    else:
        args = na_inputs((7, 8), 1, dim=4, kernel=3, dtype=torch.float64, device=s.device, grad=True)
        ok = torch.autograd.gradcheck(lambda *a: na("native", 3, 2, *a), args, atol=1e-6)
        s.row("correctness", f"{op} gradcheck float64", variant, ok=bool(ok))
        q, k, v, rpb = na_inputs((9, 11), 2, dim=8, kernel=3, dtype=torch.float32, device=s.device)
        k = k.clone()
        k[0, 4, 5, 1, 0] = float("nan")
        got, want = (na(b, 3, 2, q, k, v, rpb).isnan() for b in ("native", "reference"))
        s.row("correctness", f"{op} NaN key", variant, ok=bool(torch.equal(got, want)), nan_outputs=int(want.sum()))


def _check_variant(s: Suite, op: str, variant: str) -> None:
    """A kernel variant (its environment already set) against the float64 reference: output and every input's
    gradient, in each dtype it runs, at the bound of the default kernel's check; NaN/Inf propagation."""
    for name in VARIANT_DTYPES.get(op, tuple(DTYPES)):
        dtype = DTYPES[name]
        if op == "ms_deform_attn":
            levels = [(5, 7), (3, 4)]
            args = msda_inputs(levels, 2, 9, heads=2, dim=8, dtype=dtype, device=s.device, grad=True)
            run = lambda backend, *a: msda(backend, levels, *a)  # noqa: E731
        else:
            args = na_inputs((9, 11), 2, dim=16, kernel=3, dtype=dtype, device=s.device, grad=True)
            run = lambda backend, *a: na(backend, 3, 2, *a)  # noqa: E731
        got = run("native", *args)
        grad = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, args, grad)
        exact = [t.detach().double().requires_grad_(True) for t in args]
        want = run("reference", *exact)
        want_grads = torch.autograd.grad(want, exact, grad.double())
        errors = [(got.double() - want).abs().max().item()] + [
            ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
            for g, w in zip(got_grads, want_grads)]
        s.row("correctness", f"{op} variant vs float64 reference (fwd, grads)", f"{variant} {name}",
              max_abs_err=errors[0], max_rel_grad_err=max(errors[1:]), ok=max(errors) <= 2 * TOLERANCE[name])


def section_correctness(s: Suite) -> None:
    for op in OPS:
        _check_op(s, op)
    for op, variant, env in OP_VARIANTS:
        with environment(env):
            _check_variant(s, op, variant)


def section_kernels(s: Suite) -> None:
    """Every CUDA kernel variant with FlexAttention (neighborhood attention) and the original Deformable-DETR op
    (when ``benchmarks/_original`` holds it: ``python benchmarks/original_msda.py fetch``), the op benchmarks'
    own tables (``run()`` of benchmarks/ms_deform_attn.py and neighborhood_attention.py)."""
    import ms_deform_attn as msda_bench
    import neighborhood_attention as na_bench

    quick = s.args.quick
    for module in (msda_bench, na_bench):
        for row in module.run(device="cuda", quick=quick):
            case = " ".join(f"{k}={row[k]}" for k in ("image", "levels", "stage", "map", "heads", "dilation", "batch",
                                                      "dtype", "locations", "pass") if k in row)
            s.row("kernels", f"{row['op']} {case}", "every implementation", ms_by_impl=row["ms"],
                  kernel_ms=row["kernel_ms"], skipped=row["skipped"],
                  **{k: row[k] for k in ("floor_ms", "vs_default", "vs_flex") if k in row})


# --- whole models
def model_configs(smoke: bool):
    """(kind, transformers config) of the benchmarked models."""
    from transformers import Mask2FormerConfig, OneFormerConfig, SwinConfig

    if smoke:
        swin = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7)
        heads = dict(hidden_dim=32, num_attention_heads=2, dim_feedforward=32, num_queries=6, decoder_layers=3)
        return [
            ("mask2former", Mask2FormerConfig(backbone_config=SwinConfig(**swin, out_features=[
                "stage1", "stage2", "stage3", "stage4"]), feature_size=32, mask_feature_size=32,
                encoder_feedforward_dim=32, encoder_layers=1, num_labels=4, **heads)),
            ("oneformer", OneFormerConfig(backbone_config=SwinConfig(**swin, out_features=[
                "stage1", "stage2", "stage3", "stage4"]), conv_dim=32, mask_dim=32, encoder_feedforward_dim=32,
                encoder_layers=1, num_labels=4, query_dec_layers=1, text_encoder_width=32, text_encoder_num_layers=1,
                **heads)),
        ]
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    return [("mask2former", Mask2FormerConfig(backbone_config=swin, num_labels=133, num_queries=100)),
            ("oneformer", OneFormerConfig(backbone_config=swin, num_labels=150, num_queries=150))]


def load_pair(kind: str, config, folder: Path, device):
    import transformers

    import maskformers

    name = {"mask2former": "Mask2Former", "oneformer": "OneFormer"}[kind]
    cls = getattr(transformers, f"{name}ForUniversalSegmentation")
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():  # values for the zero-initialised parameters, as a trained model has
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(folder)
    ours = maskformers.from_pretrained(folder).eval()
    return ours.to(device), hf.to(device)


def model_inputs(kind: str, batch: int, size: int, device, dtype=torch.float32):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device, dtype)
    if kind == "oneformer":
        return x, torch.tensor([PANOPTIC_TASK] * batch, device=device)
    return (x,)


def logits(out, library: str) -> tuple[torch.Tensor, torch.Tensor]:
    if library == "transformers":
        return out.class_queries_logits, out.masks_queries_logits
    return out.class_logits, out.mask_logits


def _compile_backend(s: Suite) -> str:
    return "inductor" if s.cuda else "eager"  # inductor on a CPU takes minutes: the smoke run checks the path


def run_model_case(s: Suite, kind: str, config, batch: int, size: int, *, extras: bool = False) -> None:
    """Time one model at one shape in every mode. ``extras``: only the slow-to-compile rows (transformers
    compiled, ours with ``mode="reduce-overhead"``)."""
    case = f"{kind} {size}x{size} b{batch}"
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = load_pair(kind, config, Path(tmp), s.device)
    f32_inputs = model_inputs(kind, batch, size, s.device)
    bf16_inputs = model_inputs(kind, batch, size, s.device, torch.bfloat16)
    with torch.inference_mode():
        truth = logits(hf(*f32_inputs), "transformers") if size <= 640 else None

    def record(library, mode, fn, autocast_on=False):
        def call():
            with torch.inference_mode(), (autocast if autocast_on else contextlib.nullcontext()):
                return fn()

        out = call()
        diff = None
        if truth is not None:
            diff = max((a.float() - b).abs().max().item() for a, b in zip(logits(out, library), truth))
        s.row("model", case, f"{library} {mode}", s.time_ms(call), max_diff_vs_transformers_f32=diff,
              peak_mb=s.peak_mb(call))

    def compiled(model, **kwargs):
        t0 = time.perf_counter()
        fn = torch.compile(model, backend=_compile_backend(s), dynamic=False, **kwargs)
        with torch.inference_mode():
            fn(*bf16_inputs)
        return fn, round(time.perf_counter() - t0, 1)

    if extras:
        hf.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        fn, seconds = compiled(hf)
        record("transformers", f"bf16 compiled (compile {seconds} s)", lambda: fn(*bf16_inputs))
        if s.cuda:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
            fn, seconds = compiled(ours, mode="reduce-overhead", fullgraph=True)
            # a graph inductor could not put in a CUDA graph runs without one: say how many
            skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
            record("maskformers", f"bf16 reduce-overhead (compile {seconds} s, cudagraph skips {skips})",
                   lambda: fn(*bf16_inputs))
        torch._dynamo.reset()
        return
    record("transformers", "bf16 autocast", lambda: hf(*f32_inputs), autocast_on=True)
    record("maskformers", "bf16 autocast", lambda: ours(*f32_inputs), autocast_on=True)
    hf.to(torch.bfloat16)
    record("transformers", "bf16", lambda: hf(*bf16_inputs))
    hf.cpu()  # out of the way of ours
    ours.to(torch.bfloat16)
    record("maskformers", "bf16", lambda: ours(*bf16_inputs))
    if s.cuda:
        graph_row(s, case, "maskformers bf16 eager, CUDA graph", lambda: ours(*bf16_inputs))
    fn, seconds = compiled(ours, fullgraph=True)
    record("maskformers", f"bf16 compiled (compile {seconds} s)", lambda: fn(*bf16_inputs))
    if s.cuda:
        graph_row(s, case, "maskformers bf16 compiled, CUDA graph", lambda: fn(*bf16_inputs))
    torch._dynamo.reset()


def graph_row(s: Suite, case: str, mode: str, fn: Callable[[], object]) -> None:
    """Capture ``fn`` in a CUDA graph and time its replay; a failed capture is a row that says why."""
    try:
        with torch.inference_mode():
            replay = cuda_graph(fn)
    except RuntimeError as exc:
        torch.cuda.synchronize()
        s.row("model", case, mode, None, capture_error=str(exc)[:1000])
        return
    s.row("model", case, mode, s.time_ms(replay))


def section_no_host_sync(s: Suite) -> None:
    """The eager forward under set_sync_debug_mode("error"): any synchronising CUDA call raises."""
    for kind, config in model_configs(s.args.smoke):
        with tempfile.TemporaryDirectory() as tmp:
            ours, _ = load_pair(kind, config, Path(tmp), s.device)
        inputs = model_inputs(kind, 2, 256 if not s.args.smoke else 64, s.device)
        with torch.inference_mode():
            ours(*inputs)  # kernels loaded, caches warm
            s.sync()
            torch.cuda.set_sync_debug_mode("error")
            error = None
            try:
                ours(*inputs)
            except RuntimeError as exc:  # the message names the synchronising call
                error = str(exc)[:1000]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        s.row("correctness", f"{kind} forward without host sync", "eager", ok=error is None, error=error)


def section_models(s: Suite, cases: list[tuple[int, int]], *, extras: bool = False) -> None:
    for kind, config in model_configs(s.args.smoke):
        for batch, size in cases:
            if s.left() < 60:
                s.row("model", f"{kind} {size}x{size} b{batch}", "skipped", note="time budget")
                continue
            run_model_case(s, kind, config, batch, size, extras=extras)


# --- ops
def section_ops(s: Suite) -> None:
    smoke = s.args.smoke
    msda_cases = [((5, 7), 1)] if smoke else [(640, 1), (1024, 8)]
    na_cases = [((12, 14), 2, 1, 3)] if smoke else [  # DiNAT-L at 512x512: stages 1 and 2, kernel 11
        ((128, 128), 6, 1, 11), ((128, 128), 6, 10, 11), ((64, 64), 12, 5, 11)]

    def impls(op):  # the reference and the default native kernel (the variants: section "kernels")
        return [("reference", "reference", {}), ("native", "native", {})]

    for image, batch in msda_cases:
        levels = [image] if smoke else [(image // d, image // d) for d in (32, 16, 8)]
        queries = sum(h * w for h, w in levels)
        for dtype_name in ("float32", "bfloat16"):
            case = f"ms_deform_attn {levels} b{batch} {dtype_name}"
            args = msda_inputs(levels, batch, queries, dtype=DTYPES[dtype_name], device=s.device, grad=True)
            grad = torch.randn(batch, queries, 256, device=s.device, dtype=DTYPES[dtype_name])
            for impl, backend, env in impls("ms_deform_attn"):
                with environment(env):
                    fwd = s.time_ms(lambda: msda(backend, levels, *args))
                    both = s.time_ms(lambda: msda(backend, levels, *args).backward(grad))
                s.row("op", case, impl, fwd, fwd_bwd_ms=both)
    for shape, heads, dilation, kernel in na_cases:
        for dtype_name in ("float32", "bfloat16"):
            case = f"neighborhood_attention {shape} heads {heads} k{kernel} d{dilation} {dtype_name}"
            q, k, v, rpb = na_inputs(shape, heads, kernel=kernel, dtype=DTYPES[dtype_name], device=s.device, grad=True)
            grad = torch.randn_like(q)
            for impl, backend, env in impls("neighborhood_attention"):
                with environment(env):
                    fwd = s.time_ms(lambda: na(backend, kernel, dilation, q, k, v, rpb))
                    both = s.time_ms(lambda: na(backend, kernel, dilation, q, k, v, rpb).backward(grad))
                s.row("op", case, impl, fwd, fwd_bwd_ms=both)


# --- training step
def section_training(s: Suite) -> None:
    from train_step import Step, make_batch, write_checkpoint

    cases = [(128, 2)] if s.args.smoke else [(640, 2), (384, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, s.args.smoke)
        for image, batch in cases:
            data = make_batch(image, batch)
            for library in ("transformers", "maskformers"):
                step = Step(library, folder, s.device, s.args.smoke)
                step(data, True)  # warm-up: optimizer state, kernels
                ms = s.time_ms(lambda: step(data, True), repeats=max(2, s.args.repeats // 4), warmup=0)
                s.row("training", f"mask2former step {batch}x{image} bf16 autocast", library, ms,
                      peak_mb=s.peak_mb(lambda: step(data, True)))


# --- post-processing
def section_postprocess(s: Suite) -> None:
    from maskformers.processing import post_process_instance, post_process_panoptic, post_process_semantic

    batch, size, queries, classes = (2, 64, 6, 4) if s.args.smoke else (8, 1024, 100, 133)
    g = torch.Generator().manual_seed(0)
    class_logits = (torch.randn(batch, queries, classes + 1, generator=g) * 4).to(s.device)
    mask_logits = (torch.randn(batch, queries, size // 4, size // 4, generator=g) * 4).to(s.device)
    calls = {"panoptic": post_process_panoptic, "instance": post_process_instance, "semantic": post_process_semantic}
    for task, fn in calls.items():
        def call():
            return fn(class_logits, mask_logits, input_size=(size, size))

        syncs = None
        if s.cuda:
            call()
            s.sync()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        s.row("postprocess", f"{task} b{batch} {size}x{size}, {queries} queries", "maskformers",
              s.time_ms(call, repeats=max(2, s.args.repeats // 4)), host_syncs_per_call=syncs)


# ------------------------------------------------------------------------------------------ main
def print_table(s: Suite) -> None:
    print("\n| section | case | mode | ms | more |")
    print("|---|---|---|---|---|")
    for r in s.data["rows"]:
        more = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("section", "case", "mode", "ms"))
        ms = _fmt(r["ms"]) if r["ms"] is not None else "-"
        print(f"| {r['section']} | {r['case']} | {r['mode']} | {ms} | {more} |")
    failed = {n: r for n, r in s.data["sections"].items() if r["status"] != "ok"}
    for name, record in failed.items():
        print(f"section {name}: {record['status']} {record.get('error', '')}")
    meta = s.data["meta"]
    print(f"\n{meta.get('gpu', meta.get('cpu_model'))}, torch {meta.get('torch')}, transformers "
          f"{meta.get('transformers')}; {time.perf_counter() - s.start:.0f} s. JSON: {s.out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the 640x640 batch-1 rows and the ops; no extras")
    parser.add_argument("--smoke", action="store_true", help="tiny models and shapes (for the CPU test)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, metavar="SECTION",
                        help="run only these sections (names as printed, e.g. 'models 640 b1' ops); the build runs "
                             "whenever a section needs a kernel")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (use --device cpu --smoke)", file=sys.stderr)
        return 2
    if torch.device(args.device).type != "cuda" and not args.smoke:
        print("without a GPU only --smoke runs (the full shapes take hours on a CPU)", file=sys.stderr)
        return 2
    args.repeats = args.repeats or (2 if args.smoke else 20)
    args.out = args.out or HERE / "results" / f"gpu_suite{'-smoke' if args.smoke else ''}.json"
    os.environ.setdefault("MASKFORMERS_STRICT_OPS", "1")  # no silent fallback to the reference op
    if torch.device(args.device).type == "cuda":
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # parallel kernel builds
    s = Suite(args)
    small, large = ([(1, 64)], [(2, 96)]) if args.smoke else ([(1, 640)], [(8, 1024)])
    sections = [  # name, run, seconds it needs at least, CUDA only
        ("environment", lambda: section_environment(s), 0, False),
        ("build", lambda: section_build(s), 0, False),
        ("correctness", lambda: section_correctness(s), 20, False),
        ("no host sync", lambda: section_no_host_sync(s), 20, True),
        ("models 640 b1", lambda: section_models(s, small), 60, False),
        ("ops", lambda: section_ops(s), 30, False),
        ("training", lambda: section_training(s), 60, False),
        ("models 1024 b8", lambda: section_models(s, large), 90, False),
        ("postprocess", lambda: section_postprocess(s), 20, False),
        ("kernels", lambda: section_kernels(s), 60, True),
        ("extras", lambda: section_models(s, small + large, extras=True), 120, False),
    ]
    skip = set() if args.only is None else {name for name, *_ in sections} - set(args.only) - {"environment"}
    if (args.quick or args.smoke) and args.only is None:
        skip |= {"models 1024 b8", "extras"} | ({"kernels"} if args.smoke else set())
    for name, run, needs_s, cuda_only in sections:
        if name in skip:
            s.data["sections"][name] = {"status": "skipped: not asked for"}
            continue
        s.section(name, run, needs_s=needs_s, cuda_only=cuda_only)
    print_table(s)
    statuses = [r["status"] for r in s.data["sections"].values()]
    return 0 if all(st == "ok" or st.startswith("skipped") for st in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
