"""``maskformers convert``: any supported checkpoint -> our layout (``model.safetensors`` +
``maskformers_config.json``), never over its own source.

Sources: a hub id or folder (transformers or our layout, read by :func:`maskformers.hub.from_pretrained`),
or an original-repository file: a Mask2Former ``.pkl`` model-zoo file or ``.pth``, or a OneFormer ``.pth``
(which of the two is read from its keys; ``weights_convert.d2_mask2former`` / ``d2_oneformer``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub import (
    CheckpointError,
    ModelTypeAPI,
    from_pretrained,
    load_state_dict_strict,
    model_type_api,
    save_pretrained,
)

__all__ = ["check_destination", "convert", "load_source"]


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def convert(src: str | Path, dst: str | Path, *, config: Any = None, force: bool = False) -> Path:
    """Convert ``src`` to our layout in folder ``dst`` (the ``maskformers convert SRC DST`` command).

    src: a hub id or folder (transformers or our layout), or an original-repository checkpoint file: a
    Mask2Former ``.pkl`` model-zoo file or ``.pth``, or a OneFormer ``.pth`` (which of the two is read
    from its keys). For those files the architecture is read from the weights, with what the weights
    do not show (8 attention heads, 4 sampling points follow; OneFormer's dropout and task norm) taken
    from the published models. ``config`` replaces that: a ``Mask2FormerConfig`` / ``OneFormerConfig``
    used as is, or a dict of fields that override the inferred ones (``{"num_heads": 16}``).

    ``dst`` must not be ``src`` nor lie inside it, and must be missing or empty unless ``force`` (then
    our files in it are replaced); the result is written into a temporary folder and moved at the end.
    """
    dst = check_destination(src, dst, force=force)
    return save_pretrained(load_source(src, config=config), dst)


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False) -> Path:
    """``dst`` as a Path, after checking that writing there cannot harm ``src`` or other files: not ``src``
    nor inside it, not a file, and missing or empty unless ``force``; raises ``ValueError`` otherwise."""
    src_path, dst = Path(src).expanduser(), Path(dst).expanduser()
    if src_path.exists() and (_same_place(src_path, dst) or src_path.resolve() in dst.resolve().parents):
        raise ValueError(f"dst {str(dst)!r} is the source {str(src)!r} or inside it; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"dst {str(dst)!r} is a file, not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ValueError(f"dst {str(dst)!r} is not empty; pass force=True (--force) to replace our files in it")
    return dst


def load_source(src: str | os.PathLike, *, config: Any = None) -> nn.Module:
    """The model of any supported source: an original-repository file (``config`` as in :func:`convert`), else a
    hub id or folder in either layout (:func:`maskformers.hub.from_pretrained`)."""
    path = Path(src).expanduser()
    if path.is_file():
        return _convert_original_file(path, config)
    if config is not None:
        raise ValueError("config is only used for original checkpoint files; folders and hub ids carry their own")
    return from_pretrained(src)


def _original_config(api: ModelTypeAPI, converter: Any, raw: Mapping[str, torch.Tensor], config: Any, model_type: str):
    """The architecture of an original checkpoint: inferred from ``raw``, or ``config`` (instance / overrides)."""
    if isinstance(config, api.config_class):
        return config
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(
            f"this file holds a {model_type} checkpoint: config must be a {api.config_class.__name__} or a dict of "
            f"its fields, got {type(config).__name__}"
        )
    overrides = dict(config or {})
    heads = {"num_heads": overrides["num_heads"]} if "num_heads" in overrides else {}  # the sampling points follow
    fields = {**converter.infer_architecture(raw, **heads), **overrides}
    return api.config_class.from_dict(fields)


def _convert_original_file(path: Path, config: Any) -> nn.Module:
    """A Mask2Former or OneFormer (which one: read from the keys) from an original-repository file."""
    import pickle

    from weights_convert import ConversionError, d2_mask2former, d2_oneformer
    from weights_convert.checkpoint_io import load_d2_checkpoint

    try:
        raw = load_d2_checkpoint(path)
        model_type = d2_oneformer.original_model_type(raw, source=str(path))
        converter = d2_oneformer if model_type == "oneformer" else d2_mask2former
        api = model_type_api(model_type)
        config = _original_config(api, converter, raw, config, model_type)
        state = converter.convert_state_dict(raw, backbone_type=config.backbone["name"], source=str(path))
    except (ConversionError, pickle.UnpicklingError) as exc:
        raise CheckpointError(str(exc)) from exc
    except (ValueError, TypeError) as exc:  # unreadable file, invalid config fields
        raise CheckpointError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    model = api.build(config)
    load_state_dict_strict(model, state, source=str(path))
    return model
