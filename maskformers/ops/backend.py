"""One switch for the op backend of a whole model.

Every layer that calls a maskformers op (``MSDeformAttn``, and any layer of ours built on a native op)
keeps the backend it passes to the op in its ``op_backend`` attribute: ``None`` (the native kernel when
it is available for the tensors' device, else the reference with one warning), ``"native"`` or
``"reference"``. Instead of threading that choice through every constructor:

    from maskformers.ops import set_backend, use_backend

    set_backend(model, "reference")      # every op-calling layer inside model, for good
    with use_backend("reference"):       # every op call in this thread whose layer says None
        model(x)

A layer's own ``op_backend`` wins over ``use_backend``; ``use_backend(None)`` restores the automatic choice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

__all__ = ["BACKENDS", "OP_BACKEND_ATTR", "check_backend", "default_backend", "set_backend", "use_backend"]

BACKENDS = ("native", "reference")
OP_BACKEND_ATTR = "op_backend"

_state = threading.local()
M = TypeVar("M", bound=nn.Module)


def check_backend(backend: str | None, *, name: str = "backend") -> str | None:
    """``backend`` if it is None, "native" or "reference"; else a ValueError naming ``name``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name} must be None, 'native' or 'reference', got {backend!r}")
    return backend


def set_backend(model: M, backend: str | None) -> M:
    """Set ``op_backend`` on every submodule of ``model`` (itself included) that has one and return
    ``model``. A model with no op-calling layer raises, so a wrong target does not pass silently."""
    check_backend(backend)
    count = 0
    for module in model.modules():
        if hasattr(module, OP_BACKEND_ATTR):
            setattr(module, OP_BACKEND_ATTR, backend)
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no layer that calls a maskformers op (no .{OP_BACKEND_ATTR})")
    return model


def default_backend() -> str | None:
    """The backend of op calls that ask for None in this thread (set by :func:`use_backend`)."""
    return getattr(_state, "backend", None)


@contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Within the block, op calls in this thread that ask for backend None use ``backend`` instead."""
    check_backend(backend)
    previous = default_backend()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous
