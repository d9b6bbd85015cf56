"""Options and loaders shared by ``maskformers train``, ``evaluate`` and ``check-data``: the data options and the
sample reader they describe, the model a command starts from, a OneFormer's CLIP tokenizer."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

__all__ = ["DATA_KINDS", "UsageError", "add_data_arguments", "add_common_data", "add_tokenizer_argument",
           "build_reader", "has_val", "load_model", "new_model", "load_tokenizer", "read_id2label"]

DATA_KINDS = ("synthetic", "coco-panoptic", "coco-instance", "semantic-folder", "hf")


class UsageError(SystemExit):
    """A bad option or input named by the message: ``maskformers.cli.main`` prints it on one line and exits 2.
    (A SystemExit, so that code that does not catch it still stops; ``str()`` is the message.)"""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def add_data_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}images", help="image folder (COCO, semantic folders)")
    p.add_argument(f"--{prefix}annotations", help="COCO JSON (panoptic or instances)")
    p.add_argument(f"--{prefix}panoptic-dir", help="COCO panoptic PNG folder")
    p.add_argument(f"--{prefix}labels", help="label PNG folder (semantic folders)")


def add_common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA_KINDS, default="synthetic", help="dataset format (default: synthetic)")
    add_data_arguments(p)
    p.add_argument("--id2label", help="JSON file {id: name} (semantic folders, HF datasets)")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--reduce-labels", action="store_true", help="ADE20K: 0 -> ignore, other ids - 1")
    p.add_argument("--palette", metavar="FILE",
                   help="semantic colour masks: JSON {id: [r, g, b]} (or a list of colours, position = id) mapping "
                        "each colour to a class id; without it a colour mask is an error")
    p.add_argument("--hf-name", help="Hugging Face dataset name (needs `pip install datasets`)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-annotation", choices=["semantic", "instance"], default="semantic")
    p.add_argument("--image-column", default="image")
    p.add_argument("--annotation-column", default="annotation")
    p.add_argument("--scenes", type=int, default=None, help="synthetic: number of scenes")
    p.add_argument("--size", type=int, default=None, help="synthetic scene size / training crop size")


def build_reader(args: argparse.Namespace, *, split: str = "train", id2label: dict[int, str] | None = None,
                 check_labels: bool = True, skip_missing: bool = False) -> Any:
    """The sample reader described by the command-line arguments (``split`` "val" reads --val-* paths).

    id2label: the labels to use when the data gives none and --id2label is not passed (``evaluate`` passes
    the model's). check_labels / skip_missing: see :class:`.readers_semantic.SemanticFolder`. A missing folder
    or file, an unreadable JSON or a dataset refused when opened raise :class:`UsageError`."""
    try:
        return _build_reader(args, split, id2label, check_labels, skip_missing)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _build_reader(args: argparse.Namespace, split: str, fallback_labels: dict[int, str] | None, check_labels: bool,
                  skip_missing: bool) -> Any:
    from .synthetic import SyntheticScenes

    def arg(name: str) -> Any:
        value = getattr(args, f"val_{name}", None) if split == "val" else None
        return value if value is not None else getattr(args, name, None)

    kind = args.data
    palette = getattr(args, "palette", None)
    if palette is not None and kind not in ("semantic-folder", "hf"):
        raise UsageError(f"--palette maps the colours of semantic masks (--data semantic-folder or hf), not --data "
                         f"{kind}")
    if kind == "synthetic":
        from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_VAL_SEED

        size = args.size or BUILTIN_IMAGE_SIZE
        if split == "val":
            return SyntheticScenes(args.val_scenes, size=size, seed=BUILTIN_VAL_SEED)
        return SyntheticScenes(args.scenes or 100_000, size=size, seed=args.seed)
    if kind in ("coco-panoptic", "coco-instance"):
        from .readers_coco import CocoInstances, CocoPanoptic

        if not arg("images") or not arg("annotations"):
            raise UsageError(f"--data {kind} needs --images and --annotations")
        for option in ("images", "annotations", "panoptic_dir"):
            if arg(option) and not Path(arg(option)).exists():
                raise UsageError(f"--{option.replace('_', '-')} {arg(option)}: no such "
                                 f"{'file' if option == 'annotations' else 'folder'}")
        if kind == "coco-instance":
            return CocoInstances(arg("images"), arg("annotations"))
        if not arg("panoptic_dir"):
            raise UsageError("--data coco-panoptic needs --panoptic-dir")
        return CocoPanoptic(arg("images"), arg("panoptic_dir"), arg("annotations"))
    if args.id2label:
        id2label = read_id2label(args.id2label)
    elif fallback_labels:
        id2label = dict(fallback_labels)
    else:
        raise UsageError(f"--data {kind} needs --id2label FILE (JSON {{id: name}})")
    if kind == "semantic-folder":
        from .readers_semantic import SemanticFolder

        if not arg("images") or not arg("labels"):
            raise UsageError("--data semantic-folder needs --images and --labels")
        return SemanticFolder(arg("images"), arg("labels"), id2label=id2label, ignore_index=args.ignore_index,
                              reduce_labels=args.reduce_labels, palette=palette, check_labels=check_labels,
                              skip_missing=skip_missing)
    from .readers_semantic import HFSegmentationDataset, load_hf_dataset

    if not args.hf_name:
        raise UsageError("--data hf needs --hf-name")
    hf_split = getattr(args, "val_split", None) if split == "val" else args.hf_split
    return HFSegmentationDataset(load_hf_dataset(args.hf_name, hf_split), id2label=id2label,
                                 image_column=args.image_column, annotation_column=args.annotation_column,
                                 annotation=args.hf_annotation, ignore_index=args.ignore_index,
                                 reduce_labels=args.reduce_labels, palette=palette, check_labels=check_labels)


def read_id2label(path: str) -> dict[int, str]:
    """``--id2label``: a JSON object ``{"0": "road", ...}`` or a list of names (index = class id), ids 0..K-1."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--id2label {path}: expected a JSON file {{id: name}} ({exc})") from None
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--id2label {path}: expected a JSON object {{id: name}} or a list of names, got "
                         f"{type(data).__name__ if data else 'nothing'}")
    try:
        id2label = {int(k): str(v) for k, v in data.items()}
    except ValueError:
        raise UsageError(f"--id2label {path}: keys must be class ids (integers), got {sorted(data)[:5]}") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise UsageError(f"--id2label {path}: ids must be 0..{len(id2label) - 1}, each once; got "
                         f"{sorted(id2label)[:10]}")
    return id2label


def has_val(args: argparse.Namespace) -> bool:
    if args.data == "synthetic":
        return args.val_scenes > 0
    if args.data == "hf":
        return bool(args.val_split)
    return bool(args.val_images)


def add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="OneFormer: CLIP tokenizer folder (vocab.json + merges.txt) or bpe_simple_vocab_16e6.txt.gz "
                        "(default: the checkpoint folder's)")


def load_model(spec: str) -> Any:
    """A trained model: ``"builtin"`` (the shipped built-in model) or a checkpoint (hub id or folder; either
    model type, read from it). A model config JSON is refused: it describes an untrained model (``maskformers
    train --from-scratch CONFIG`` trains one). A model that cannot be found or loaded (a mistyped folder, a hub id
    offline, a damaged checkpoint) raises :class:`UsageError` naming ``--model`` and the reason."""
    from ..hub import CheckpointError
    from .builtin import BuiltinModelMissing, load_builtin_model

    if spec == "builtin":
        try:
            return load_builtin_model()
        except BuiltinModelMissing as exc:
            raise UsageError(str(exc)) from exc
    if Path(spec).suffix == ".json":
        raise UsageError(f"--model {spec} is a model config, not a trained model: `maskformers train --from-scratch "
                         f"{spec}` trains a new model from it")
    from ..hub import from_pretrained

    try:
        return from_pretrained(spec)
    except CheckpointError as exc:
        raise UsageError(f"--model {spec}: {exc}") from exc


def new_model(spec: str, *, id2label: dict[int, str], seed: int = 0) -> Any:
    """A new, randomly initialised model (seeded by ``seed``) for the classes ``id2label``: ``"builtin"`` (the
    built-in architecture) or a model config JSON (``"model_type": "oneformer"`` or OneFormer fields make a
    OneFormer, else a Mask2Former; a saved ``maskformers_config.json`` works too)."""
    import torch

    from ..models.mask2former import Mask2FormerConfig, build_mask2former
    from ..models.oneformer import OneFormerConfig, build_oneformer
    from .builtin import build_builtin_model

    if spec == "builtin":
        return build_builtin_model(seed, id2label)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--from-scratch {spec}: no such file (expected 'builtin' or a model config JSON)")
    try:
        fields = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"--from-scratch {spec}: not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"--from-scratch {spec}: expected a JSON object of model config fields")
    if isinstance(fields.get("config"), dict):  # a saved maskformers_config.json
        fields = {"model_type": fields.get("model_type"), **fields["config"]}
    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        own = {f.name for f in dataclasses.fields(OneFormerConfig)} - {f.name for f in
                                                                       dataclasses.fields(Mask2FormerConfig)}
        model_type = "oneformer" if own & set(fields) else "mask2former"
    if model_type not in ("mask2former", "oneformer"):
        raise UsageError(f"--from-scratch {spec}: model_type must be 'mask2former' or 'oneformer', got {model_type!r}")
    fields["num_classes"] = len(id2label)
    config_class, build = ((OneFormerConfig, build_oneformer) if model_type == "oneformer"
                           else (Mask2FormerConfig, build_mask2former))
    try:
        config = config_class.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--from-scratch {spec}: {exc}") from None
    torch.manual_seed(seed)
    return build(config, id2label=id2label)


def load_tokenizer(spec: str | None, model: Any) -> Any:
    """A OneFormer's CLIP tokenizer: ``--tokenizer`` (folder or BPE merge file), else the tokenizer files the model
    carries from its checkpoint folder."""
    from ..processing.clip_tokenizer import find_clip_tokenizer

    try:
        found = find_clip_tokenizer(spec, model=model)
    except ValueError:
        raise UsageError(f"--tokenizer {spec}: no such folder or file") from None
    if found is not None:
        return found
    folder = getattr(model, "source_folder", None)
    where = "" if folder is None else f"; {folder} has none"
    raise UsageError("a OneFormer needs its CLIP tokenizer: pass --tokenizer FOLDER (vocab.json + merges.txt, e.g. "
                     "a OneFormer hub checkpoint) or --tokenizer bpe_simple_vocab_16e6.txt.gz (CLIP's merge list, "
                     f"shipped by open_clip and the original OneFormer){where}")


