"""The forward as one graph: ``torch.compile(fullgraph=True)`` with no graph break for Mask2Former and
OneFormer on every shipped backbone (Swin, ResNet, ConvNeXt, DiNAT), under autocast and in bfloat16; no
recompile across batch sizes; and no host round trip in the forward (what CUDA graphs need).

Backends: ``"eager"`` proves what Dynamo traces (a graph break or a data-dependent host read fails
``fullgraph=True``), ``"aot_eager"`` adds AOT autograd and the custom ops' fake implementations. Inductor's
code generation takes 95 s for the tiny model on a 2-core CPU (cold cache), too long for CI:
``MASKFORMERS_INDUCTOR_TESTS=1`` runs it here, and ``benchmarks/gpu_suite.py`` compiles the real models with
inductor on a GPU. Host round trips: the forward runs on the meta device (no data at all) under
``HostSyncCounter``, which also sees host-to-device copies."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from compile_helpers import BACKBONES, flat_outputs, model_inputs, tiny_model
from host_sync_helpers import HostSyncCounter

from maskformers.ops import toolchain

pytestmark = pytest.mark.skipif(
    toolchain.cxx_compiler() is None or toolchain.ninja_path() is None,
    reason="no C++ compiler or ninja to build the native kernels",
)

MODELS = ["mask2former", "oneformer"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Graphs:
    """A torch.compile backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        return gm.forward


def _forward(model, x, precision: str):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return model(*model_inputs(model, x))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("kind", MODELS)
def test_fullgraph_compile_matches_eager(kind, backbone):
    model = tiny_model(kind, backbone)
    x = torch.randn(2, 3, 64, 96)
    graphs = _Graphs()
    compiled = torch.compile(model, backend=graphs, fullgraph=True)
    got, expected = flat_outputs(_forward(compiled, x, "float32")), flat_outputs(_forward(model, x, "float32"))
    assert graphs.count == 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["autocast", "bfloat16"])
@pytest.mark.parametrize("kind", MODELS)
def test_fullgraph_compile_in_16_bit(kind, precision):
    model = tiny_model(kind, "swin")
    x = torch.randn(1, 3, 64, 64)
    if precision == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got, expected = flat_outputs(_forward(compiled, x, precision)), flat_outputs(_forward(model, x, precision))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", MODELS)
def test_no_recompile_across_batch_sizes(kind):
    """The documented recipe: static image sizes (``dynamic=False``), the batch marked dynamic. Batch 1 is a
    graph of its own (PyTorch specialises sizes 0 and 1); every batch of 2 or more shares one."""
    model = tiny_model(kind, "swin")
    graphs = _Graphs()
    compiled = torch.compile(model, backend=graphs, fullgraph=True, dynamic=False)

    def run(batch, size=64):
        inputs = model_inputs(model, torch.randn(batch, 3, size, size))
        for t in inputs:  # pixel_values, and OneFormer's task_inputs
            torch._dynamo.mark_dynamic(t, 0)
        with torch.no_grad():
            return compiled(*inputs)

    run(1), run(2)
    assert graphs.count == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (4, 3, 1, 2):
            out = run(batch)
            assert out.class_logits.shape[0] == batch
    run(2, size=96)  # a new image size is a new graph (the level shapes are static)
    assert graphs.count == 3


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("kind", MODELS)
def test_forward_makes_no_host_round_trip(kind, backbone):
    """On the meta device nothing has values: a read (item, bool, tolist, nonzero, ...) fails or is
    counted, and so is every host-to-device copy (``torch.tensor(..., device=...)``, ``.to(device)``)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(kind, backbone)
    inputs = model_inputs(model, torch.empty(2, 3, 64, 96, device="meta"))
    with HostSyncCounter() as counter, torch.no_grad():
        out = model(*inputs)
    assert out.mask_logits.shape == (2, 6, 16, 24)
    assert dict(counter.events) == {}


def test_token_ids_are_checked_without_a_host_read_when_compiled():
    """Eager on the CPU reads the ids and names their range; compiled (or on a GPU) a device-side assertion
    checks them instead of reading them, so a bad id is still an error."""
    from maskformers.models.task_encoder import TaskEncoder

    encoder = TaskEncoder(task_seq_len=8, hidden_dim=16)
    compiled = torch.compile(encoder, backend="aot_eager", fullgraph=True)
    good = torch.arange(8)[None]
    torch.testing.assert_close(compiled(good), encoder(good))
    bad = torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]])
    with pytest.raises(ValueError, match=r"got values in \[-1, 6\]"):
        encoder(bad)
    with pytest.raises(RuntimeError, match=r"task_inputs must be token ids in \[0, 2\*\*24\)"):
        compiled(bad)


@pytest.mark.skipif(os.environ.get("MASKFORMERS_INDUCTOR_TESTS", "") in ("", "0"),
                    reason="inductor code generation takes ~95 s on a 2-core CPU; MASKFORMERS_INDUCTOR_TESTS=1 runs it")
def test_inductor_compile_matches_eager():
    model = tiny_model("mask2former", "swin")
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    got, expected = flat_outputs(_forward(compiled, x, "float32")), flat_outputs(_forward(model, x, "float32"))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
