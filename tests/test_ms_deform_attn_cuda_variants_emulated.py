"""The CUDA kernel variants of ms_deform_attn ("coalesced" forward, "tiled" backward), run on the CPU.

No GPU runs these kernels in CI: this test compiles csrc/ms_deform_attn_cuda_variants.cu for the
cuda_on_cpu emulator (see cuda_emu_helpers.py; the default kernels are checked by the emulator's own
run.sh) for sm_90 (float4 atomics in the tile flush) and sm_80 (scalar atomics), and compares the
forward and all three gradients with a float64 reference on the same (rounded) inputs, in every dtype:
head dims with partial pieces and several passes, aligned and misaligned rows, levels cut into many tiles
and tiles whose sample lists are split over several blocks, border / outside / non-finite locations,
empty problems. Every case must leave the emulator's fault count unchanged, and selected cases are rerun
with reversed and random thread and block orders (a missing barrier or a race between threads of a block
changes the result there).
"""

from __future__ import annotations

import pytest
import torch
from cuda_emu_helpers import build_emulated, relative_error, requires_emulator

from maskformers.ops import ms_deform_attn_reference

pytestmark = requires_emulator

# bound on max|kernel - truth| / max|truth|: accumulation rounding for float32/float64, one rounding of the
# result for 16-bit outputs (grad_locations / grad_weights of 16-bit values are float32)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
COORD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

# (name, B, Q, H, D, P, levels): pieces per lane, partial pieces, > 32 lanes' worth of channels (several
# passes), tiles cut small (large D), many tiles, split tile lists (many samples per tile)
CASES = [
    ("d1", 2, 7, 3, 1, 2, [(1, 1), (7, 5)]),
    ("d3-odd-levels", 1, 9, 2, 3, 4, [(3, 11), (1, 13), (13, 1)]),
    ("d12", 2, 5, 2, 12, 3, [(7, 5), (3, 11)]),
    ("d17", 1, 31, 1, 17, 1, [(8, 8), (4, 4), (2, 2), (1, 1)]),
    ("d32-many-tiles", 1, 33, 2, 32, 4, [(40, 37), (20, 19), (10, 9)]),
    ("d33", 3, 4, 1, 33, 2, [(7, 5)]),
    ("d64", 1, 20, 2, 64, 2, [(25, 24), (3, 11)]),
    ("d264-passes", 1, 6, 1, 264, 3, [(13, 11), (5, 5)]),
    ("d32-split-lists", 1, 1100, 1, 32, 8, [(20, 20)]),
]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", params=[900, 800], ids=["sm90", "sm80"])
def emulated(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"msda_variants_{request.param}")
    return build_emulated(out, "msda_variants_emu", "ms_deform_attn_cuda_variants.cu",
                          "ms_deform_attn_cuda_variants_bind.cpp", launches=4, arch=request.param)


def level_table(levels):
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes.prod(1)
    return shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]), int(areas.sum())


def away_from_cell_borders(u: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Locations in [-0.15, 1.15] whose pixel coordinate x * side - 0.5 is at least 0.02 from an integer, so
    that float32 and float64 coordinates pick the same bilinear cell (the location gradient jumps there)."""
    pixel = (u * 1.3 - 0.15) * sides
    cell = torch.floor(pixel - 0.5)
    frac = (pixel - 0.5 - cell).clamp(0.02, 0.98)
    return (cell + frac + 0.5) / sides


def make_problem(case, dtype, seed=0, misalign=False):
    _, B, Q, H, D, P, levels = case
    g = torch.Generator().manual_seed(seed + D)
    shapes, starts, S = level_table(levels)
    L = len(levels)
    value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).to(dtype)
    if misalign:  # one element off a 16-byte boundary: the scalar (unvectorised) path
        value = torch.cat([value.new_zeros(1), value.flatten()])[1:].view(B, S, H, D)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64)
    sides = shapes.flip(1).to(torch.float64).view(1, 1, 1, L, 1, 2)  # (w, h) per level for (x, y)
    loc = away_from_cell_borders(u, sides).to(coord)
    weights = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64).to(coord)
    grad_out = torch.randn(B, Q, H * D, generator=g, dtype=torch.float64).to(dtype)
    return value, shapes, starts, loc, weights, grad_out


def truth(value, shapes, starts, loc, weights, grad_out):
    """float64 output and gradients of the inputs as the kernel sees them."""
    leaves = [t.detach().double().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out.detach(), *grads


def run_variants(emulated, value, shapes, starts, loc, weights, grad_out):
    before = emulated.fault_count()
    out = emulated.module.forward_coalesced(value, shapes, starts, loc, weights)
    grads = emulated.module.backward_tiled(value, shapes, starts, loc, weights, grad_out)
    assert emulated.fault_count() == before, "the emulator recorded a device fault"
    return out, *grads


def check(results, truths, dtype):
    names = ("out", "grad_value", "grad_locations", "grad_weights")
    bounds = (TOLERANCE[dtype], TOLERANCE[dtype], COORD_TOLERANCE[dtype], COORD_TOLERANCE[dtype])
    for name, got, want, bound in zip(names, results, truths, bounds):
        assert got.shape == want.shape, name
        error = relative_error(got, want)
        assert error <= bound, f"{name}: error {error:.3g} > {bound:.1g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_variants_match_float64_truth(emulated, case, dtype):
    problem = make_problem(case, dtype)
    results = run_variants(emulated, *problem)
    assert results[0].dtype == dtype and results[1].dtype == dtype
    check(results, truth(*problem), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_rows_take_the_scalar_path(emulated, dtype):
    problem = make_problem(CASES[4], dtype, misalign=True)
    assert problem[0].data_ptr() % 16 != 0
    check(run_variants(emulated, *problem), truth(*problem), dtype)


@pytest.mark.parametrize("case", [CASES[4], CASES[7], CASES[8]], ids=["many-tiles", "passes", "split-lists"])
@pytest.mark.parametrize("order", [("reverse", "reverse", 1), ("random", "random", 7), ("forward", "random", 3)])
def test_results_do_not_depend_on_thread_order(emulated, case, order):
    """Thread and block orders change only the order of float additions in grad_value."""
    problem = make_problem(case, torch.float32)
    reference = run_variants(emulated, *problem)
    blocks, lanes, seed = order
    emulated.schedule(workers=2, blocks=blocks, lanes=lanes, seed=seed)
    try:
        again = run_variants(emulated, *problem)
    finally:
        emulated.schedule()
    for name, a, b in zip(("out", "grad_value", "grad_locations", "grad_weights"), reference, again):
        if name == "grad_value":
            assert relative_error(b, a) <= 1e-6, name
        else:
            assert torch.equal(a, b), name


def test_special_locations_float64(emulated):
    """Exact pixel centres, cell borders, level borders, far outside locations. Level sides are powers of
    two, so that every special coordinate maps to its pixel coordinate exactly in both implementations."""
    case = ("special", 1, 12, 2, 8, 4, [(8, 4), (4, 16)])
    value, shapes, starts, loc, weights, grad_out = make_problem(case, torch.float64)
    specials = torch.tensor([0.0, 1.0, 0.5, -1 / 16, 1 + 1 / 16, 1 / 8, 3 / 8, 5 / 32, -1e-7, 1 + 1e-7, 1e30, -3e9,
                             2.0, -1.0, -1 / 32], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    flat = loc.view(-1)
    pick = torch.randperm(flat.numel(), generator=g)[: flat.numel() // 2]
    flat[pick] = specials[torch.randint(0, len(specials), (len(pick),), generator=g)]
    check(run_variants(emulated, value, shapes, starts, loc, weights, grad_out),
          truth(value, shapes, starts, loc, weights, grad_out), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_locations_propagate_like_grid_sample(emulated, dtype):
    case = ("nan", 1, 6, 2, 8, 2, [(5, 6), (3, 3)])
    value, shapes, starts, loc, weights, grad_out = make_problem(case, dtype)
    loc[0, 1, 0, 0, 1, 0] = float("nan")
    loc[0, 2, 1, 1, 0, 1] = float("inf")
    loc[0, 4, 0, 1, 1, 0] = -float("inf")
    check(run_variants(emulated, value, shapes, starts, loc, weights, grad_out),
          truth(value, shapes, starts, loc, weights, grad_out), dtype)


@pytest.mark.parametrize("empty", ["B", "Q", "P", "D"])
def test_empty_problems(emulated, empty):
    sizes = dict(B=1, Q=3, H=2, D=4, P=2)
    sizes[empty] = 0
    case = ("empty", sizes["B"], sizes["Q"], sizes["H"], sizes["D"], sizes["P"], [(3, 4)])
    value, shapes, starts, loc, weights, grad_out = make_problem(case, torch.float32)
    results = run_variants(emulated, value, shapes, starts, loc, weights, grad_out)
    B, S, H, D = value.shape
    for got, shape in zip(results, [(B, loc.shape[1], H * D), value.shape, loc.shape, weights.shape]):
        assert got.shape == shape and (got == 0).all()


def test_head_dim_too_large_for_a_tile_is_refused(emulated):
    reason = emulated.module.tiled_unsupported(4000, False, 10)
    assert "head dim D = 4000" in reason and emulated.module.tiled_unsupported(32, False, 10) == ""
    assert "int32" in emulated.module.tiled_unsupported(32, False, 2**31)
    problem = make_problem(("big-d", 1, 2, 1, 3000, 1, [(2, 2)]), torch.float32)
    with pytest.raises(RuntimeError, match="the tiled backward does not apply: head dim D = 3000"):
        emulated.module.backward_tiled(*problem)
