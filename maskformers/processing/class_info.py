"""Class metadata of a OneFormer checkpoint: the class names and which classes are "things".

OneFormer needs it twice: its training text inputs name the classes present in an image ("a photo with a
{name}"), and instance post-processing of a panoptic prediction keeps only thing classes. The hub checkpoints
do not carry it in their weights or ``config.json``: their ``preprocessor_config.json`` names a
``class_info_file`` (``ade20k_panoptic.json``, ``coco_panoptic.json``, ``cityscapes_panoptic.json``) in the
hub dataset repo ``shi-labs/oneformer_demo`` (its ``repo_path``), which transformers downloads at load time.
We never download it: pass the file (or its dict), e.g. after ``huggingface_hub.hf_hub_download(
"shi-labs/oneformer_demo", "ade20k_panoptic.json", repo_type="dataset")`` on a machine with network access.
The same tables are in the original code (SHI-Labs/OneFormer ``oneformer/data/datasets/register_*.py``).

Accepted layouts:

- the ``class_info_file`` layout: ``{"0": {"name": "wall", "isthing": 0}, "1": ...}`` (other keys ignored);
- transformers' prepared ``metadata``: ``{"0": "wall", ..., "thing_ids": [...], "class_names": [...]}``.

Label ids must be 0..K-1 (the model's class indices), each once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ClassInfo", "load_class_info"]


@dataclass(frozen=True)
class ClassInfo:
    """``names[i]`` is the name of label id ``i``; ``thing_ids`` the label ids of countable classes."""

    names: tuple[str, ...]
    thing_ids: frozenset[int]

    def __post_init__(self) -> None:
        bad = sorted(i for i in self.thing_ids if not 0 <= i < len(self.names))
        if bad:
            raise ValueError(f"thing_ids {bad} are not label ids of the {len(self.names)} classes")

    @property
    def stuff_ids(self) -> frozenset[int]:
        """Label ids that are not things (the labels to fuse in panoptic post-processing)."""
        return frozenset(range(len(self.names))) - self.thing_ids

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The ``class_info_file`` layout (``load_class_info(info.to_dict()) == info``)."""
        return {str(i): {"name": n, "isthing": int(i in self.thing_ids)} for i, n in enumerate(self.names)}


def _label_ids(keys: list[str], where: str) -> list[int]:
    try:
        ids = sorted(int(k) for k in keys)
    except ValueError:
        raise ValueError(f"{where}: keys must be label ids (integers), got {sorted(keys)[:5]}") from None
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids, default=-1) + 1)) - set(ids))
        raise ValueError(f"{where}: label ids must be 0..{len(ids) - 1} each once; missing {missing[:10]}")
    return ids


def load_class_info(source: ClassInfo | Mapping[str, Any] | str | os.PathLike) -> ClassInfo:
    """A ``ClassInfo`` from itself, a dict in one of the layouts above, or a JSON file holding one."""
    if isinstance(source, ClassInfo):
        return source
    where = "class info"
    if not isinstance(source, Mapping):
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"class info file not found: {where!r}")
        with open(where, encoding="utf-8") as f:
            try:
                source = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"could not parse {where!r} as JSON: {error}") from error
        if not isinstance(source, Mapping):
            raise ValueError(f"{where!r}: expected a JSON object of label id -> class, got {type(source).__name__}")
    if "thing_ids" in source:  # transformers' prepared metadata
        keys = [k for k in source if k not in ("thing_ids", "class_names")]
        ids = _label_ids(keys, where)
        names = tuple(str(source[str(i)]) for i in ids)
        return ClassInfo(names=names, thing_ids=frozenset(int(i) for i in source["thing_ids"]))
    ids = _label_ids(list(source), where)
    entries = [source[str(i)] for i in ids]
    bad = [i for i, e in zip(ids, entries) if not isinstance(e, Mapping) or "name" not in e or "isthing" not in e]
    if bad:
        raise ValueError(
            f"{where}: classes {bad[:10]} lack 'name' or 'isthing' (expected {{'name': str, 'isthing': 0|1}})"
        )
    return ClassInfo(
        names=tuple(str(e["name"]) for e in entries),
        thing_ids=frozenset(i for i, e in zip(ids, entries) if e["isthing"]),
    )
