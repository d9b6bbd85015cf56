"""Peak memory of one call on the CPU: how far the process's resident set rose above where it started.

Linux keeps a high-water mark of the resident set (VmHWM) that writing "5" to /proc/self/clear_refs resets
to the current size, so the peak of a call is VmHWM after it minus VmRSS before it, however high earlier
work (model loading, a previous call) pushed the mark. Where that file cannot be written, the growth of
ru_maxrss is used instead, which reads 0 when the call stays below an earlier peak.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["PeakRSS"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(field)


class PeakRSS:
    """``with PeakRSS() as m: work()`` then ``m.mb`` = peak resident memory added during ``work``."""

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
            self._base = _status_mb("VmRSS")
        except OSError:
            self.exact = False
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_mb("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.mb = max(peak - self._base, 0.0)
