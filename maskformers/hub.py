"""Load and save checkpoints: hub ids, transformers folders, our own folders, original-repository files.

``from_pretrained(name_or_path)`` (also ``maskformers.from_pretrained``) resolves a hub id with
``huggingface_hub.snapshot_download`` or takes a local folder, reads its ``model_type`` and returns the
right model, like transformers' Auto classes:

* transformers layout (``config.json`` with ``model_type`` "mask2former" or "oneformer" + ``model.safetensors``
  or ``pytorch_model.bin``, optionally sharded, + optional ``preprocessor_config.json``): the config is
  translated by ``weights_convert.hf_config``, the weights renamed by ``weights_convert.hf_<model>``;
* our layout (``maskformers_config.json`` + ``model.safetensors`` with our names), written by
  :func:`save_pretrained` / ``model.save_pretrained``.

Weights load strictly: missing, unexpected or mis-shaped keys raise one :class:`CheckpointError`
summarising them all. safetensors is preferred when both formats exist; ``.bin`` files load with
``torch.load(weights_only=True)``. :func:`maskformers.convert.convert` turns any supported source (also the
original repositories' ``.pkl``/``.pth`` files) into our layout.

This module imports the model classes only when it builds one, so ``models`` and ``hub`` do not
import each other at import time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .ops.backend import check_backend, set_backend

__all__ = [
    "CheckpointError",
    "MODEL_TYPES",
    "ModelTypeAPI",
    "OUR_CONFIG",
    "checkpoint_model_type",
    "from_pretrained",
    "load_state_dict_strict",
    "model_type_api",
    "read_weights",
    "resolve_checkpoint",
    "save_pretrained",
]

OUR_CONFIG = "maskformers_config.json"
HF_CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
WEIGHT_FILES = (  # in order of preference
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MODEL_TYPES = ("mask2former", "oneformer")
# tokenizer and processor files of OneFormer checkpoints (hub layout and transformers 5 save_pretrained)
_PROCESSOR_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "processor_config.json")
# 1: the first layout; 2: Mask2Former's learned queries moved from the decoder to the model
_FORMAT_VERSION = 2
_PROBLEM_KEYS_SHOWN = 12


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, understood or loaded; the message says which file and why."""


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read JSON file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError: truncated, corrupt or unreadable
            raise CheckpointError(f"cannot read safetensors weights {path} (truncated or corrupt?): {exc}") from exc
    from weights_convert.checkpoint_io import UnsafePickleError, torch_load_weights_only

    try:
        data = torch_load_weights_only(path, name=str(path))
    except UnsafePickleError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # zip/pickle errors, EOF
        raise CheckpointError(f"cannot read PyTorch weights {path} (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor), got {type(data).__name__}")
    return dict(data)


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict stored in ``folder`` and the file it came from (safetensors first, shards allowed)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_one(path), path
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointError(f"{path} has no 'weight_map' of shard files")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"shard {folder / shard} listed in {path} does not exist")
            state.update(_read_one(folder / shard))
        return state, path
    raise CheckpointError(f"no weights in {folder}: expected one of {list(WEIGHT_FILES)}")


# ------------------------------------------------------------------------------------------------
# resolving
# ------------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a checkpoint: ``name_or_path`` itself, or a hub id downloaded (config, weights).

    A name that can only be a local path (absolute, starting with ``.`` or ``~``, more than one ``/``) or
    whose first part is an existing local folder (``runs/bset`` beside ``runs/``) is never looked up on the
    hub: when it is missing the error says "no such folder" and what its parent holds."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; expected a checkpoint folder or a hub id (use convert() for single files)"
        )
    name = str(name_or_path)
    hub_like = bool(_REPO_ID.match(name)) and not name.startswith((".", "~"))
    if not hub_like or Path(name.split("/")[0]).is_dir():
        raise CheckpointError(_no_such_folder(path, hub_like=hub_like))
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"], **kwargs))
        if not any((folder / f).is_file() for f in WEIGHT_FILES[:2]):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"], **kwargs))
    except Exception as exc:  # offline, unknown repo, gated, network errors
        raise CheckpointError(
            f"cannot download {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local folder with config.json and model.safetensors or pytorch_model.bin instead"
        ) from exc
    return folder


def _no_such_folder(path: Path, *, hub_like: bool) -> str:
    """The error for a checkpoint folder that does not exist: the nearest existing parent and what it holds."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    message = f"no such folder: {path}"
    if parent.is_dir() and parent != path.parent:
        message += f" ({parent} exists, {path.parent} does not)"
    elif parent.is_dir():
        entries = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
        message += f" ({parent} holds the folders: {shown})" if entries else f" ({parent} holds no folder)"
    if hub_like:
        message += f"; not looked up on the hub because the local folder {path.parts[0]}/ exists"
    elif len(path.parts) == 1 and not path.is_absolute():
        message += "; a hub id looks like 'facebook/mask2former-swin-tiny-coco-panoptic'"
    return message


def checkpoint_model_type(folder: Path) -> str:
    """"mask2former" or "oneformer": the ``model_type`` of our config or of transformers' config.json."""
    for name in (OUR_CONFIG, HF_CONFIG):
        if (folder / name).is_file():
            model_type = _read_json(folder / name).get("model_type")
            if model_type not in MODEL_TYPES:
                raise CheckpointError(
                    f"{folder / name} has model_type={model_type!r}; supported: {', '.join(MODEL_TYPES)}"
                )
            return model_type
    raise CheckpointError(f"{folder} has neither {HF_CONFIG} (transformers layout) nor {OUR_CONFIG} (maskformers layout)")


# ------------------------------------------------------------------------------------------------
# the two model types: config class, builder, transformers converters
# ------------------------------------------------------------------------------------------------


class ModelTypeAPI(NamedTuple):
    """What loading needs of one model type: its config class and builder, the transformers config parser
    and defaults, and the transformers weight converter."""

    config_class: type
    build: Callable[..., nn.Module]
    config_from_hf: Callable[..., dict[str, Any]]
    hf_defaults: Mapping[str, Any]
    convert_hf: Callable[..., dict[str, torch.Tensor]]


def model_type_api(name: str) -> ModelTypeAPI:
    from weights_convert import hf_config

    if name == "mask2former":
        from weights_convert import hf_mask2former

        from .models.mask2former import Mask2FormerConfig, build_mask2former

        return ModelTypeAPI(Mask2FormerConfig, build_mask2former, hf_config.mask2former_config_from_hf,
                          hf_config.MASK2FORMER_DEFAULTS, hf_mask2former.convert_state_dict)
    if name == "oneformer":
        from weights_convert import hf_oneformer

        from .models.oneformer import OneFormerConfig, build_oneformer

        return ModelTypeAPI(OneFormerConfig, build_oneformer, hf_config.oneformer_config_from_hf,
                          hf_config.ONEFORMER_DEFAULTS, hf_oneformer.convert_state_dict)
    raise CheckpointError(f"unsupported model_type={name!r}; supported: {', '.join(MODEL_TYPES)}")


def _shown(keys: list[str]) -> str:
    more = len(keys) - _PROBLEM_KEYS_SHOWN
    return str(keys[:_PROBLEM_KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "")


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, hint: str = ""
) -> None:
    """``model.load_state_dict(state_dict)`` after checking keys and shapes; one error summarises every
    problem (counts, and the first keys of each kind). ``hint`` is appended to that error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_shown(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} key(s) with the wrong shape: {_shown(shapes)}")
    if problems:
        raise CheckpointError(f"weights of {source} do not fit the model: " + "; ".join(problems) + hint)
    model.load_state_dict(state_dict, strict=True)


def _upgrade_our_state(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    if version == 1:  # Mask2Former's queries lived in the decoder
        for name in ("query_feat", "query_embed"):
            key = f"transformer_decoder.{name}.weight"
            if key in state:
                state[f"{name}.weight"] = state.pop(key)
    return state


def _load_folder(folder: Path, expected_type: str | None) -> nn.Module:
    model_type = checkpoint_model_type(folder)
    if expected_type is not None and model_type != expected_type:
        raise CheckpointError(
            f"{folder} holds a {model_type} checkpoint, not a {expected_type} one; use "
            "maskformers.from_pretrained to load whichever it is"
        )
    api = model_type_api(model_type)
    from weights_convert import ConversionError

    if (folder / OUR_CONFIG).is_file():
        meta = _read_json(folder / OUR_CONFIG)
        version = meta.get("format_version", 1)
        if version not in (1, _FORMAT_VERSION):
            raise CheckpointError(f"{folder / OUR_CONFIG} has format_version={version!r}; this maskformers reads 1-2")
        try:
            config = api.config_class.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid config in {folder / OUR_CONFIG}: {exc}") from exc
        id2label, hint = meta.get("id2label") or {}, ""
        state, path = read_weights(folder)
        state = _upgrade_our_state(state, version)
    else:
        hf = _read_json(folder / HF_CONFIG)
        try:
            fields = api.config_from_hf(hf, where=str(folder / HF_CONFIG))
            config = api.config_class.from_dict(fields)
        except (ConversionError, ValueError, TypeError) as exc:
            raise CheckpointError(str(exc)) from exc
        from weights_convert.hf_config import id2label_from_hf

        id2label = id2label_from_hf(hf)
        absent = sorted(k for k in api.hf_defaults if k not in hf)
        hint = (
            f" (note: {folder / HF_CONFIG} leaves out {absent}, which took transformers' defaults: a config "
            "that does not describe the weights' architecture shows up as missing or mis-shaped keys)"
            if absent else ""
        )
        raw, path = read_weights(folder)
        try:
            state = api.convert_hf(raw, backbone_type=config.backbone["name"], source=str(path))
        except ConversionError as exc:
            raise CheckpointError(str(exc) + hint) from exc
    model = api.build(config, id2label=id2label)
    load_state_dict_strict(model, state, source=str(path), hint=hint)
    if (folder / PREPROCESSOR_CONFIG).is_file():
        model.preprocessor_config = _read_json(folder / PREPROCESSOR_CONFIG)
    model.source_folder = folder  # where the processor's files (tokenizer, class info) sit
    # files a OneFormer processor reads beside the weights travel with the model into save_pretrained
    names = list(_PROCESSOR_FILES)
    class_info_file = (getattr(model, "preprocessor_config", None) or {}).get("class_info_file")
    if isinstance(class_info_file, str) and Path(class_info_file).name == class_info_file:  # a plain file name
        names.append(class_info_file)
    model.extra_files = {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
    return model


def from_pretrained(
    name_or_path: str | Path,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    op_backend: str | None = None,
) -> nn.Module:
    """The model (Mask2Former or OneFormer, read from the checkpoint) with the weights of a hub id or
    local folder (transformers or our layout), in eval mode on the CPU.

    model_type: "mask2former" / "oneformer" to insist on one (an error otherwise), None for either.
    op_backend: None, "native" or "reference", applied with :func:`maskformers.ops.set_backend`.
    """
    check_backend(op_backend, name="op_backend")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be None or one of {MODEL_TYPES}, got {model_type!r}")
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    model = _load_folder(folder, model_type)
    if op_backend is not None:
        set_backend(model, op_backend)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _write_folder(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", ""):
        raise ValueError(
            f"{type(model).__name__} has no architecture config (model.config); build it with "
            "build_mask2former / build_oneformer"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "library": "maskformers"})
    meta = {
        "model_type": config.model_type,
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict(),
        "id2label": {str(k): v for k, v in sorted(model.id2label.items())},
    }
    (folder / OUR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if getattr(model, "preprocessor_config", None) is not None:
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(model.preprocessor_config, indent=2) + "\n")
    for extra, content in getattr(model, "extra_files", {}).items():  # e.g. the tokenizer's vocab.json
        (folder / extra).write_bytes(content)


def save_pretrained(
    model: nn.Module,
    folder: str | Path,
    *,
    format: str = "maskformers",
    with_text_mapper: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` into ``folder``; :func:`from_pretrained` reads either layout back.

    format="maskformers": ``model.safetensors`` and ``maskformers_config.json`` (+ ``preprocessor_config.json``
    and the tokenizer / class-info files when the model carries them). format="transformers": the folder
    transformers' ``from_pretrained`` (and ``AutoImageProcessor`` / ``OneFormerProcessor``) reads, see
    :mod:`maskformers.export`; ``with_text_mapper`` keeps a OneFormer's text mapper (``is_training``), and
    ``tokenizer`` (a ``CLIPTokenizer``, a folder or CLIP's BPE file) supplies a OneFormer's tokenizer files
    when the model did not bring them from its checkpoint. Settings transformers cannot represent raise
    ``ValueError``; differences that do not block the export are shown once as a ``UserWarning``.

    The files are written into a temporary folder next to ``folder`` and moved in at the end, so an
    interrupted save leaves the previous files intact."""
    if format not in ("maskformers", "transformers"):
        raise ValueError(f"format must be 'maskformers' or 'transformers', got {format!r}")
    if format == "maskformers" and (with_text_mapper or tokenizer is not None):
        raise ValueError("with_text_mapper and tokenizer apply to format='transformers' only")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save into {folder}: it is a file")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    notes: list[str] = []
    try:
        if format == "transformers":
            from .export import write_transformers_folder

            notes = write_transformers_folder(model, tmp, with_text_mapper=with_text_mapper, tokenizer=tokenizer)
        else:
            _write_folder(model, tmp)
        folder.mkdir(exist_ok=True)
        if format == "transformers":  # a config of ours would make from_pretrained read the folder as ours
            (folder / OUR_CONFIG).unlink(missing_ok=True)
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if notes:
        warnings.warn(f"exported {type(model).__name__} to transformers ({folder}) with these differences:\n- "
                      + "\n- ".join(notes), UserWarning, stacklevel=2)
    return folder
