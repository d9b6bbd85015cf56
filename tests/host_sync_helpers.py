"""Finding host round trips without a GPU.

On a GPU, reading a tensor's values on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``),
an op whose output size depends on the values (``nonzero``, ``unique``, boolean-mask indexing, ...) and a
copy between the host and the device all wait for the GPU to finish its queue. ``HostSyncCounter`` records
each of these as the code under test runs on the CPU, where they are free, so that a test can say how
many a call makes: none in a model's forward, a number that does not grow with the batch elsewhere.
Host-to-device copies are only visible when the target device is not the CPU (use the meta device).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops that read values on the host or whose output size depends on the values
_VALUE_READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
}


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


class HostSyncCounter(TorchDispatchMode):
    """Counts the host round trips of the code run inside it; ``events`` (a Counter of names) says which."""

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[str] = Counter()
        self._patches = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.events.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS:
            self.events[str(func.overloadpacket.__name__)] += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _is_bool_index(args[1]):
            self.events["boolean-mask indexing"] += 1
        elif func is aten._to_copy.default and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device")
            if target is not None and _device_type(target) != args[0].device.type:
                self.events[f"copy {args[0].device.type} -> {_device_type(target)}"] += 1
        elif func is aten.copy_.default and args[0].device.type != args[1].device.type:
            self.events[f"copy {args[1].device.type} -> {args[0].device.type}"] += 1
        return func(*args, **kwargs)

    def _patch(self, owner, name: str, label: str, when=lambda *a, **k: True) -> None:
        original = getattr(owner, name)
        events = self.events

        def counted(*args, **kwargs):
            if when(*args, **kwargs):
                events[label] += 1
            return original(*args, **kwargs)

        mp = pytest.MonkeyPatch()
        mp.setattr(owner, name, counted)
        self._patches.callback(mp.undo)

    def __enter__(self):
        # these never reach the dispatcher for CPU tensors
        self._patch(torch.Tensor, "tolist", "tolist")
        self._patch(torch.Tensor, "numpy", "numpy")
        off_host = lambda *a, **k: _device_type(k.get("device")) != "cpu"  # noqa: E731
        self._patch(torch, "tensor", "torch.tensor onto a device", off_host)
        self._patch(torch, "as_tensor", "torch.as_tensor onto a device", off_host)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)
