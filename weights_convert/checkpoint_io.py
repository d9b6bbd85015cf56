"""Reading checkpoint files without running code from them.

* ``.pkl`` (detectron2 model-zoo files): a restricted unpickler that can only rebuild numpy arrays,
  dicts and strings; a pickle that asks for anything else is refused, so no code runs.
* ``.pth`` / ``.bin`` (torch files): ``torch.load(weights_only=True)``. A file that needs arbitrary
  objects is refused for safety with :class:`UnsafePickleError`, whose message says so (and does not
  pass on torch's advice to disable the check).
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rules import ConversionError

__all__ = ["UnsafePickleError", "load_d2_checkpoint", "torch_load_weights_only"]


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint asks to rebuild a Python object outside the allow list (arrays, tensors, dicts)."""


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct, wherever this numpy keeps it
    scalar = np.float32(1).__reduce__()[0]  # multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "dict"): dict,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    _allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a detectron2 checkpoint only needs numpy arrays and dicts"
            ) from None


def torch_load_weights_only(data: bytes | Path, *, name: str) -> Any:
    """``torch.load(weights_only=True)`` of a file or its bytes; a refused pickle raises
    :class:`UnsafePickleError` naming ``name``; other failures propagate (truncated, corrupt files)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it references {found[1]}" if found else "it is not a plain dict of tensors"
        raise UnsafePickleError(
            f"{name}: refused for safety: the pickle asks to rebuild Python objects beyond tensors and dicts "
            f"({what}), and maskformers never runs code from a checkpoint. If you trust the file, load it in "
            "an environment of your own and save its state dict (a dict of tensors) with safetensors."
        ) from None


def _to_tensor(key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ConversionError(f"checkpoint entry {key!r} is a {type(value).__name__}, not an array")


def load_d2_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an original (detectron2) checkpoint file: ``{"model": {...}, ...}`` or a
    bare dict, as a ``.pkl`` model-zoo file or a torch ``.pth``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        if raw[:2] == b"PK" or path.suffix != ".pkl":  # torch zip (or legacy torch) format
            data = torch_load_weights_only(raw, name=str(path))
        else:
            data = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    except Exception as exc:  # truncated or corrupt files
        raise ValueError(f"cannot read checkpoint {path} (truncated, corrupt or not a checkpoint?): {exc}") from exc
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a dict of arrays (optionally under 'model')")
    return {str(k): _to_tensor(str(k), v) for k, v in data.items()}
