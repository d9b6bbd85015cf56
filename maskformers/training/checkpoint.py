"""Training checkpoints: written atomically, read back with a fallback to the previous one.

A checkpoint is one ``torch.save`` file ``checkpoint-{step:08d}.pt`` holding everything a run needs to
continue exactly: model, optimizer, scheduler and grad-scaler states, RNG states (torch CPU and CUDA,
numpy, Python), the step (which fixes the data position: epoch and offset follow from it) and the
training config. Writing goes to a temporary file in the same folder, which is flushed, fsync'ed and
renamed over the final name (then the folder is fsync'ed), so a crash leaves either the old file or the
new one, never half of one. :func:`load_latest` tries the newest checkpoint first and, when it cannot be
read (truncated, corrupt, missing keys), warns and falls back to the previous one.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_save", "save_checkpoint", "list_checkpoints", "load_latest", "check_fits", "rng_state",
           "set_rng_state", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "rng")
_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` via a temporary file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``checkpoint-{state['step']:08d}.pt`` atomically, then delete all but the newest ``keep``."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_save(state, folder / f"checkpoint-{int(state['step']):08d}.pt")
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_latest(folder: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` and its path, or None when there is none.

    An unreadable newer checkpoint is reported with a warning naming it and the one used instead.
    """
    failures = []
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            missing = [k for k in REQUIRED_KEYS if k not in state]
            if missing:
                raise ValueError(f"missing {missing}")
        except Exception as exc:  # noqa: BLE001 - any failure to read means: try the previous one
            failures.append(f"{path.name} ({type(exc).__name__}: {exc})")
            continue
        if failures:
            warnings.warn(f"could not read checkpoint(s) {'; '.join(failures)}; resuming from {path.name}",
                          RuntimeWarning, stacklevel=2)
        return state, path
    if failures:
        raise RuntimeError(f"no readable checkpoint in {folder}: {'; '.join(failures)}")
    return None


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """A clear error when a checkpoint's weights do not fit ``model`` (another class count, another model)."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if shapes or missing or unexpected:
        detail = "; ".join(part for part in (
            f"shapes differ: {', '.join(shapes[:3])}" if shapes else "",
            f"{len(missing)} weight(s) missing, e.g. {missing[:2]}" if missing else "",
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}" if unexpected else "") if part)
        raise ValueError(f"cannot resume from {path}: it was written by another model or for other data ({detail}); "
                         "resume with the run's own model and data options")
