"""Build and load the native ms_deform_attn kernels (placeholder: filled in by the kernel work)."""

from __future__ import annotations

from types import ModuleType

__all__ = ["NativeOpUnavailable", "load_extension"]


class NativeOpUnavailable(RuntimeError):
    """The native kernel for a device type cannot be built or loaded; the message says why."""


def load_extension(device_type: str) -> ModuleType:
    raise NativeOpUnavailable("the native kernels are not written yet")
