"""The run's log: ``log.jsonl`` records and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["JsonlLog"]


class JsonlLog:
    """``log.jsonl`` (one JSON record per line) and, when installed, TensorBoard scalars beside it; a resumed run
    first drops the records past its checkpoint's step. ``path`` None writes nothing (ranks > 0, no output)."""

    def __init__(self, path: Path | None, resume_step: int) -> None:
        self.path = path
        self.tb = None
        if path is None:
            return
        if path.exists():  # drop records the resumed run will write again
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
