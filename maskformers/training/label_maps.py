"""Reading class ids out of semantic label images: index masks, colour masks through a palette, and the
dataset-level check for binary 0/255 masks.

A label image holds one class id per pixel. Index masks ("L", "I", "P" PNGs, or RGB files whose three
channels agree) are read as they are; a "P" PNG gives its palette indices, which are the ids. A colour
mask (R, G, B differ somewhere) is refused unless a *palette* maps each colour to an id, as
mmsegmentation's class palettes and Hugging Face ``id2color`` files describe them; a colour the palette
does not list is an error naming the file and the colour. With a palette every label image is read as
colours (a "P" PNG through its own colour table, a grey one as (v, v, v)), so ``{0: [0, 0, 0], 1: [255,
255, 255]}`` also maps binary 0/255 masks.

:func:`check_label_values` looks at a few label maps of a dataset when its reader is opened: when they
hold nothing but 0 and ``ignore_index`` (binary masks saved as 0/255 with ``ignore_index`` 255), every
object pixel would be ignored and the model would learn "background" only, so it raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import SampleError

__all__ = ["load_palette", "label_to_classes", "check_label_values", "other_classes", "BINARY_MASK_HINT"]

BINARY_MASK_HINT = ('binary masks saved as 0/255? map 255 to class 1 with a palette (--palette FILE holding '
                    '{"0": [0, 0, 0], "1": [255, 255, 255]}) or save the masks with 1 for objects')


def _colour(value: Any, where: str) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        value = [int(value[i:i + 2], 16) for i in (1, 3, 5)]
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{where}: expected a colour [r, g, b] of ints 0..255 or '#rrggbb', got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def load_palette(source: str | os.PathLike | Mapping[Any, Any] | Sequence[Any]) -> dict[tuple[int, int, int], int]:
    """``{(r, g, b): class id}`` from a JSON file or an object: ``{id: [r, g, b]}`` (an ``id2color``; also
    wrapped as ``{"id2color": {...}}``), or a list of colours whose position is the id (mmsegmentation's
    ``PALETTE``). Colours may be written ``"#rrggbb"``. Two ids of one colour raise."""
    where = "palette"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            source = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read palette {where}: {exc}") from exc
    if isinstance(source, Mapping) and isinstance(source.get("id2color"), Mapping):
        source = source["id2color"]
    if isinstance(source, Mapping):
        items = list(source.items())
    elif isinstance(source, Sequence) and not isinstance(source, str):
        items = list(enumerate(source))
    else:
        raise ValueError(f"{where}: expected {{id: [r, g, b]}} or a list of colours, got {type(source).__name__}")
    palette: dict[tuple[int, int, int], int] = {}
    for key, value in items:
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: class ids must be integers, got {key!r}") from None
        colour = _colour(value, f"{where}, id {class_id}")
        if colour in palette and palette[colour] != class_id:
            raise ValueError(f"{where}: colour {list(colour)} is given to ids {palette[colour]} and {class_id}")
        palette[colour] = class_id
    if not palette:
        raise ValueError(f"{where}: the palette is empty")
    return palette


def _codes(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int32 colour codes r * 65536 + g * 256 + b."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _describe(codes: np.ndarray, counts: np.ndarray, shown: int = 5) -> str:
    order = np.argsort(-counts, kind="stable")[:shown]
    text = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) {n} px" for c, n in zip(codes[order].tolist(),
                                                                                         counts[order].tolist()))
    return text + (f" and {len(codes) - shown} more" if len(codes) > shown else "")


def label_to_classes(label: np.ndarray, *, source: str,
                     palette: Mapping[tuple[int, int, int], int] | None = None) -> np.ndarray:
    """(H, W) class ids of a label array: (H, W) index values, (H, W, C) with agreeing colour channels
    (alpha ignored), or colours mapped through ``palette``. :class:`SampleError` naming ``source`` for a
    colour mask without a palette, or a colour the palette does not list."""
    if label.ndim == 3 and label.shape[-1] in (1, 2):  # "LA": grey + alpha
        label = label[..., 0]
    if label.ndim not in (2, 3) or (label.ndim == 3 and label.shape[-1] not in (3, 4)):
        raise SampleError(f"{source}: expected a label image (H, W) or (H, W, 3), got shape {label.shape}")
    if palette is None:
        if label.ndim == 2:
            return label
        rgb = label[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]
        codes, counts = np.unique(_codes(rgb), return_counts=True)
        raise SampleError(f"{source}: a colour mask (its R, G and B channels differ), not one class id per pixel; "
                          f"colours: {_describe(codes, counts)}. Pass a palette mapping colours to class ids "
                          "(--palette FILE, JSON {id: [r, g, b]}) or save index masks ('L' or 'P' PNGs)")
    if label.ndim == 2:  # a grey image: value v is the colour (v, v, v)
        label = np.repeat(label[..., None], 3, axis=-1)
    if label.dtype != np.uint8 and int(label.max(initial=0)) > 255:
        raise SampleError(f"{source}: a palette maps 8-bit colours, but this label image holds values up to "
                          f"{int(label.max())}")
    codes, inverse = np.unique(_codes(label[..., :3]), return_inverse=True)
    table = np.array([palette.get((c >> 16, (c >> 8) & 255, c & 255), -1) for c in codes.tolist()], dtype=np.int64)
    unknown = table < 0
    if unknown.any():
        counts = np.bincount(inverse.ravel(), minlength=len(codes))
        raise SampleError(f"{source}: colour(s) not in the palette: {_describe(codes[unknown], counts[unknown])}")
    return table[inverse.reshape(label.shape[:2])]


def check_label_values(read: Callable[[int], tuple[str, np.ndarray]], count: int, *, num_classes: int,
                       ignore_index: int, where: str, names: Mapping[int, str], samples: int = 16) -> None:
    """Raise ValueError when the label maps of a dataset hold only class 0 and ``ignore_index``.

    read(i): the name and (H, W) class ids of label map i, or :class:`SampleError` (such maps are left out here; reading
    them fails later, naming them). Up to ``samples`` maps spread over the dataset are read; the check fires
    when none holds any other value and at least half hold ignored pixels: a dataset of binary 0/255 masks
    with ``ignore_index`` 255, where every object pixel would be ignored."""
    if num_classes < 2 or count == 0:
        return
    k = min(samples, count)
    picked = sorted({round(i * (count - 1) / max(k - 1, 1)) for i in range(k)})
    read_ok, with_ignore, example = 0, 0, None
    for i in picked:
        try:
            source, classes = read(i)
        except SampleError:
            continue
        values = set(np.unique(classes).tolist())
        if values - {0, ignore_index}:
            return
        read_ok += 1
        if ignore_index in values:
            with_ignore += 1
            example = example if example is not None else source
    if read_ok and 2 * with_ignore >= read_ok:
        raise ValueError(f"{where}: the label maps hold only 0 ({names.get(0, 'class 0')}) and {ignore_index} "
                         f"(ignore_index) in all {read_ok} checked, e.g. {example}: every other pixel would be "
                         f"ignored and {other_classes(names, num_classes)} never learned; {BINARY_MASK_HINT}")


def other_classes(names: Mapping[int, str], num_classes: int) -> str:
    """ "class 1 (car)" or "classes 1..9 (car, bus, ...)": the classes besides 0, for messages."""
    shown = ", ".join(names.get(c, str(c)) for c in range(1, min(num_classes, 4)))
    shown += ", ..." if num_classes > 4 else ""
    span = "class 1" if num_classes == 2 else f"classes 1..{num_classes - 1}"
    return f"{span} ({shown})"
