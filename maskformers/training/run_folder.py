"""A training run's output folder: one run per folder, its settings and versions in ``run_config.json``.

A folder holding anything is refused unless the run continues it (``resume``: the run that wrote its
``run_config.json``) or starts over (``overwrite``: the old contents are first moved aside to
``{out}.old-{n}``, nothing is deleted), so two runs never mix their logs, checkpoints or ``best/``.
The check (:func:`check_run_folder`) changes nothing and runs on every process before any of them writes;
:func:`claim_run_folder` (rank 0) then moves an old run aside.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RUN_CONFIG", "RunFolderError", "check_run_folder", "claim_run_folder", "read_run_config",
           "write_run_config", "versions"]

RUN_CONFIG = "run_config.json"


class RunFolderError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to pass instead."""


def _contents(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def check_run_folder(out: str | Path, *, resume: bool, overwrite: bool) -> str:
    """"new", "resume" or "overwrite": what a run may do with ``out``; :class:`RunFolderError` otherwise."""
    out = Path(out)
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --out, --overwrite starts a new one there: pass one")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder")
    contents = _contents(out)
    if resume:
        if not (out / RUN_CONFIG).is_file():
            what = f"holds no {RUN_CONFIG}" if contents else "is empty or missing"
            raise RunFolderError(f"--resume: --out {out} {what}, so there is no run to continue")
        return "resume"
    if not contents:
        return "new"
    if overwrite:
        return "overwrite"
    shown = ", ".join(contents[:5]) + (f" and {len(contents) - 5} more" if len(contents) > 5 else "")
    raise RunFolderError(f"--out {out} is not empty ({shown}); pass --resume to continue the run there, "
                         f"--overwrite to start a new one (the old contents move to {_aside(out).name}), "
                         "or another --out")


def _aside(out: Path) -> Path:
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}.old-{n}")


def claim_run_folder(out: str | Path, mode: str) -> Path | None:
    """Create ``out``; for ``mode`` "overwrite" first move its contents aside. Returns where they went."""
    out = Path(out)
    moved = None
    if mode == "overwrite" and _contents(out):
        moved = _aside(out)
        out.rename(moved)
    out.mkdir(parents=True, exist_ok=True)
    return moved


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a run depends on (those installed)."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    import torch

    found["torch"], found["torch_cuda"] = torch.__version__, str(torch.version.cuda)
    for name in ("maskformers", "torchvision", "timm", "numpy", "pycocotools", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_run_config(out: str | Path) -> dict[str, Any]:
    path = Path(out) / RUN_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_run_config(out: str | Path, settings: dict[str, Any], *, resumed: dict[str, Any] | None = None) -> Path:
    """Write ``settings`` + the versions in use to ``out/run_config.json``. ``resumed`` (a resumed run: what
    changed) is appended to the file's ``resumes`` history; the first start's ``started`` time is kept."""
    path = Path(out) / RUN_CONFIG
    now = datetime.datetime.now().isoformat(timespec="seconds")
    previous = read_run_config(out) if resumed is not None and path.is_file() else {}
    record = {**settings, "versions": versions(), "started": previous.get("started", now)}
    if resumed is not None:
        record["resumes"] = [*previous.get("resumes", []), {"time": now, **resumed}]
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
