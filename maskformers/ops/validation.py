"""Input checks of the native ops: multi-scale deformable attention and 2-D neighborhood attention.

For ms_deform_attn two kinds: ``check_inputs`` looks only at metadata (ranks, sizes, dtypes, devices) and
is safe to run while tracing; ``check_level_values`` reads the level table (h, w per level and the start
offsets) and runs inside the real implementations, where the values are concrete. ``check_na_inputs``
(neighborhood attention) needs metadata only. Every error names the argument and the values it got.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_VALUE_DTYPES",
    "check_inputs",
    "check_level_shapes",
    "check_level_values",
    "check_na_inputs",
    "coord_dtype",
]

SUPPORTED_VALUE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def coord_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype of sampling locations, weights and accumulation for a given value dtype."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ``ValueError``/``TypeError`` unless the five inputs describe one consistent problem."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    for name, t in zip(names, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

    if value.dim() != 4:
        raise ValueError(f"expected value (B, S, H, D), got shape {_shape(value)}")
    if value.dtype not in SUPPORTED_VALUE_DTYPES:
        raise TypeError(
            f"value must be float32, float64, bfloat16 or float16, got {value.dtype}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"expected spatial_shapes (L, 2) rows (h, w), got shape {_shape(spatial_shapes)}")
    if spatial_shapes.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"spatial_shapes must be int64 (or int32), got {spatial_shapes.dtype}")
    num_levels = spatial_shapes.shape[0]
    if num_levels < 1:
        raise ValueError("spatial_shapes must have at least one level, got shape (0, 2)")
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"expected level_start_index ({num_levels},) to match spatial_shapes with L={num_levels}, "
            f"got shape {_shape(level_start_index)}"
        )
    if level_start_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"level_start_index must be int64 (or int32), got {level_start_index.dtype}")

    B, S, H, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"expected sampling_locations (B, Q, H, L, P, 2), got shape {_shape(sampling_locations)}"
        )
    b, q, h, l, p, _ = sampling_locations.shape
    if (b, h, l) != (B, H, num_levels):
        raise ValueError(
            "sampling_locations (B, Q, H, L, P, 2) disagrees with value (B, S, H, D) and spatial_shapes (L, 2): "
            f"got B={b}, H={h}, L={l} from sampling_locations {_shape(sampling_locations)}, expected "
            f"B={B}, H={H} from value {_shape(value)} and L={num_levels} from spatial_shapes"
        )
    if p < 1:
        raise ValueError(f"sampling_locations must have at least one point (P >= 1), got shape {_shape(sampling_locations)}")
    if _shape(attention_weights) != (b, q, h, l, p):
        raise ValueError(
            f"expected attention_weights (B, Q, H, L, P) = {(b, q, h, l, p)} to match sampling_locations, "
            f"got {_shape(attention_weights)}"
        )
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")

    device = value.device
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but value is on {device}; move them to one device")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != device and t.device.type != "cpu":
            raise ValueError(
                f"{name} is on {t.device} but value is on {device}; it must be on value's device or on the CPU"
            )


def check_level_values(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_values: int
) -> list[tuple[int, int]]:
    """Check the level table against S = value.shape[1]; return [(h, w), ...] as Python ints."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    for level, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{level}] = ({h}, {w}): every level needs h >= 1 and w >= 1")
    expected_starts, offset = [], 0
    for h, w in shapes:
        expected_starts.append(offset)
        offset += h * w
    if offset != num_values:
        raise ValueError(
            f"spatial_shapes {shapes} cover sum(h*w) = {offset} positions but value has S = {num_values}"
        )
    if starts != expected_starts:
        raise ValueError(
            f"level_start_index {starts} is inconsistent with spatial_shapes {shapes}: expected {expected_starts}"
        )
    return shapes


def check_level_shapes(shapes: object, num_values: int) -> list[tuple[int, int]]:
    """Level sizes given as Python ints, ``[(h, w), ...]``: checked without reading any tensor (so the
    caller stays traceable by torch.export); returns them as a list of int pairs."""
    try:
        pairs = [(int(h), int(w)) for h, w in shapes]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"spatial_shapes must be an (L, 2) int64 tensor or a list of (h, w) pairs, got {shapes!r}") from None
    if not pairs:
        raise ValueError("spatial_shapes must have at least one level, got []")
    for level, (h, w) in enumerate(pairs):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{level}] = ({h}, {w}): every level needs h >= 1 and w >= 1")
    total = sum(h * w for h, w in pairs)
    if total != num_values:
        raise ValueError(f"spatial_shapes {pairs} cover sum(h*w) = {total} positions but value has S = {num_values}")
    return pairs


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_na_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: int,
    dilation: int,
) -> None:
    """Raise ``ValueError``/``TypeError`` unless query, key, value (B, H, W, heads, D), the optional relative
    position bias (heads, 2K-1, 2K-1), kernel_size and dilation describe one neighborhood-attention problem."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 5:
        raise ValueError(f"expected query (B, H, W, heads, D), got shape {_shape(query)}")
    if query.dtype not in SUPPORTED_VALUE_DTYPES:
        raise TypeError(f"query must be float32, float64, bfloat16 or float16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.shape != query.shape:
            raise ValueError(
                f"expected {name} of the query's shape {_shape(query)} (B, H, W, heads, D), got {_shape(t)}"
            )
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must be {query.dtype} like query, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; move them to one device")
    kernel_size = _positive_int("kernel_size", kernel_size)
    dilation = _positive_int("dilation", dilation)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (a window centred on its query), got {kernel_size}")
    _, H, W, heads, _ = query.shape
    if H < kernel_size * dilation or W < kernel_size * dilation:
        raise ValueError(
            f"the map (H, W) = ({H}, {W}) of query {_shape(query)} must be at least kernel_size * dilation = "
            f"{kernel_size} * {dilation} = {kernel_size * dilation} on both sides (pad it first)"
        )
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        side = 2 * kernel_size - 1
        if _shape(rpb) != (heads, side, side):
            raise ValueError(f"expected rpb (heads, 2K-1, 2K-1) = {(heads, side, side)}, got {_shape(rpb)}")
        if rpb.dtype != query.dtype:
            raise TypeError(f"rpb must be {query.dtype} like query, got {rpb.dtype}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}; move them to one device")
