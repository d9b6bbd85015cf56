"""The samples a run could not use (``on_error="skip"``): each listed once with its reason, and a limit.

:class:`SkippedSamples` keeps dataset index -> reason of every bad sample seen (a sample that is bad once is
bad in every epoch, so the count of distinct bad samples only grows), says the first ten on the console,
writes each new one to ``log.jsonl`` (``{"step", "skipped": [{"index", "reason"}]}``) and raises
:class:`TooManySkipped` as soon as more than ``max_rate`` of the dataset has proved unusable: at that point the
rate can only stay above the limit, so the run stops instead of training on what is left and exiting 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["SkippedSamples", "TooManySkipped"]

_SAID = 10  # bad samples named on the console; the rest are in log.jsonl


class TooManySkipped(RuntimeError):
    """More than ``max_skip_rate`` of the dataset could not be used; the message names some of them."""


class SkippedSamples:
    """Bad samples of a dataset of ``size`` samples; ``reasons`` maps index -> reason (``known``: a resumed run's)."""

    def __init__(self, size: int, max_rate: float, *, known: Mapping[int, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.size, self.max_rate, self.log_path = size, max_rate, log_path
        self.reasons: dict[int, str] = dict(known or {})

    def add(self, bad: list[tuple[int, str]], step: int, write: Callable[[dict[str, Any]], None],
            say: Callable[[str], None]) -> None:
        """Record ``[(index, reason)]`` met at ``step``; :class:`TooManySkipped` past the limit."""
        new = {i: r for i, r in bad if i not in self.reasons}
        if new:
            write({"step": step, "skipped": [{"index": i, "reason": r} for i, r in new.items()]})
        for i, reason in new.items():
            if len(self.reasons) < _SAID:
                say(f"skipped sample #{i}: {reason}")
            self.reasons[i] = reason
        if len(self.reasons) > self.max_rate * self.size:
            raise TooManySkipped(
                f"{len(self.reasons)} of the {self.size} samples ({100 * len(self.reasons) / self.size:.1f}%) could "
                f"not be used, more than max_skip_rate {self.max_rate:g} ({100 * self.max_rate:g}%): "
                f"{self._shown(3)}{self._where()}. Fix the data (`maskformers check-data` lists every problem) or "
                "raise the limit (--max-skip-rate)")

    def summary(self, draws: int) -> str:
        """One line: how many draws were skipped, which samples, where the full list is."""
        more = " ..." if len(self.reasons) > 5 else ""
        return (f"skipped {draws} sample draw(s), {len(self.reasons)} distinct sample(s) of {self.size}: "
                f"{self._shown(5)}{more}{self._where()}")

    def _shown(self, n: int) -> str:
        return "; ".join(f"#{i} {r}" for i, r in list(self.reasons.items())[:n])

    def _where(self) -> str:
        return f" (every one in {self.log_path})" if self.log_path is not None else ""
