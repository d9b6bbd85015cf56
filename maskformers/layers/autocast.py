"""Autocast queries that ``torch.compile`` traces without a graph break on every supported torch version.

``torch.amp.is_autocast_available`` calls a C function that Dynamo cannot trace before torch 2.12 (a graph
break in every layer that asks). Whether a device type has autocast at all never changes while a program
runs, so the answer is marked as a constant for Dynamo (what ``torch.compiler.assume_constant_result``
does; set by hand because that decorator imports ``torch._dynamo``, seconds at import time): Dynamo calls
the function once while tracing and bakes the result in. Devices without autocast (``meta``, for shape
inference and deferred initialisation) are never under it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_available", "autocast_enabled", "autocast_disabled"]


def autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda", "meta", ...) has an autocast mode."""
    return torch.amp.is_autocast_available(device_type)


autocast_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (False for devices without autocast)."""
    return autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device_type`` (a no-op context for devices without autocast)."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
