"""Load and save Mask2Former checkpoints: hub ids, transformers folders, our own folders, detectron2 files.

``load_mask2former(name_or_path)`` (= ``Mask2Former.from_pretrained``) resolves a hub id with
``huggingface_hub.snapshot_download`` or takes a local folder, then:

* transformers layout (``config.json`` with ``model_type="mask2former"`` + ``model.safetensors`` or
  ``pytorch_model.bin``, optionally sharded, + optional ``preprocessor_config.json``): the config is
  translated to :class:`Mask2FormerConfig`, the weights renamed by ``weights_convert.hf_mask2former``;
* our layout (``maskformers_config.json`` + ``model.safetensors`` with our names), written by
  ``save_mask2former`` / ``Mask2Former.save_pretrained``.

Weights load strictly: missing, unexpected or mis-shaped keys raise one :class:`CheckpointError`
listing them all. safetensors is preferred when both formats exist; ``.bin`` files load with
``torch.load(weights_only=True)``. ``convert(src, dst)`` turns any supported source (also detectron2
``.pkl``/``.pth`` files of the original repository) into our layout.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .models.backbone import backbone_spec_from_hf_config
from .ops.backend import check_backend, set_backend
from .models.mask2former import Mask2Former, Mask2FormerConfig, build_mask2former

__all__ = [
    "CheckpointError",
    "load_mask2former",
    "save_mask2former",
    "config_from_hf",
    "read_weights",
    "load_state_dict_strict",
    "convert",
    "OUR_CONFIG",
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
_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, understood or loaded; the message says which file and why."""


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read JSON file {path}: {exc}") from exc


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError: truncated, corrupt or unreadable
            raise CheckpointError(f"cannot read safetensors weights {path} (truncated or corrupt?): {exc}") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors, EOF, or a pickle that needs code execution
        raise CheckpointError(
            f"cannot read PyTorch weights {path} with torch.load(weights_only=True) (truncated, corrupt, or not a "
            f"plain state dict?): {exc}"
        ) from exc
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
# transformers config -> ours
# ------------------------------------------------------------------------------------------------

# transformers defaults for keys a (diff-saved) config.json may leave out
_HF_DEFAULTS = {
    "feature_size": 256, "mask_feature_size": 256, "hidden_dim": 256, "encoder_feedforward_dim": 1024,
    "activation_function": "relu", "encoder_layers": 6, "decoder_layers": 10, "num_attention_heads": 8,
    "dim_feedforward": 2048, "pre_norm": False, "enforce_input_projection": False, "common_stride": 4,
    "num_queries": 100, "feature_strides": [4, 8, 16, 32],
}
_HF_DEFAULT_BACKBONE = {
    "model_type": "swin",
    "depths": [2, 2, 18, 2],
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
def config_from_hf(hf: Mapping[str, Any]) -> tuple[Mask2FormerConfig, dict[int, str]]:
    """Our config and the label names from a transformers ``Mask2FormerConfig`` dict (config.json)."""
    if hf.get("model_type") != "mask2former":
        raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}, expected 'mask2former'")
    if hf.get("use_timm_backbone") or (hf.get("backbone") and not hf.get("backbone_config")):
        raise CheckpointError(
            f"config.json names a backbone by string (backbone={hf.get('backbone')!r}, use_timm_backbone="
            f"{hf.get('use_timm_backbone')!r}); only an explicit backbone_config is supported"
        )
    get = lambda k: hf.get(k, _HF_DEFAULTS[k])  # noqa: E731
    if get("activation_function") != "relu":
        raise CheckpointError(f"unsupported activation_function={get('activation_function')!r} (only 'relu')")
    try:  # also rejects backbone options our modules cannot reproduce
        spec = backbone_spec_from_hf_config(hf.get("backbone_config") or _HF_DEFAULT_BACKBONE)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json backbone_config: {exc}") from exc
    strides = [4, 8, 16, 32]
    if list(get("feature_strides")) != strides:
        raise CheckpointError(
            f"config.json feature_strides={get('feature_strides')} differ from the backbone's {strides}"
        )
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_classes = len(id2label) if id2label else hf.get("num_labels")
    if not num_classes:
        raise CheckpointError("config.json has neither id2label nor num_labels; cannot tell the number of classes")
    if get("decoder_layers") < 1:
        raise CheckpointError(f"config.json decoder_layers={get('decoder_layers')} must be >= 1")
    config = Mask2FormerConfig(
        backbone=spec,
        num_classes=int(num_classes),
        num_queries=int(get("num_queries")),
        hidden_dim=int(get("hidden_dim")),
        conv_dim=int(get("feature_size")),
        mask_dim=int(get("mask_feature_size")),
        num_heads=int(get("num_attention_heads")),
        encoder_layers=int(get("encoder_layers")),
        encoder_ffn_dim=int(get("encoder_feedforward_dim")),
        decoder_layers=int(get("decoder_layers")) - 1,  # transformers counts the query-only prediction
        decoder_ffn_dim=int(get("dim_feedforward")),
        common_stride=int(get("common_stride")),
        pre_norm=bool(get("pre_norm")),
        enforce_input_projection=bool(get("enforce_input_projection")),
    )
    return config, id2label


# ------------------------------------------------------------------------------------------------
# resolving and loading
# ------------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _resolve(
    name_or_path: str | Path, *, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; expected a checkpoint folder or a hub id (use convert() for single files)"
        )
    name = str(name_or_path)
    if not _REPO_ID.match(name):
        raise CheckpointError(
            f"{name!r} is neither an existing folder nor a hub id like 'facebook/mask2former-swin-tiny-coco-panoptic'"
        )
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], **kwargs))
        if not any((folder / f).is_file() for f in WEIGHT_FILES[:2]):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"], **kwargs))
    except Exception as exc:  # offline, unknown repo, gated, network errors
        raise CheckpointError(
            f"cannot download {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "pass a local folder with config.json and model.safetensors or pytorch_model.bin instead"
        ) from exc
    return folder


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``model.load_state_dict(state_dict)`` after checking keys and shapes; one error lists every problem."""
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
        problems.append(f"{len(missing)} missing key(s): {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
    if shapes:
        problems.append(f"{len(shapes)} key(s) with the wrong shape: {shapes}")
    if problems:
        raise CheckpointError(f"weights of {source} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_mask2former(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    op_backend: str | None = None,
) -> Mask2Former:
    """A Mask2Former with the weights of a hub id or local folder (transformers or our layout), in eval
    mode on the CPU. ``op_backend`` (None, "native", "reference") is applied to the whole model with
    :func:`maskformers.ops.set_backend`."""
    check_backend(op_backend, name="op_backend")
    folder = _resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if (folder / OUR_CONFIG).is_file():
        meta = _read_json(folder / OUR_CONFIG)
        if meta.get("model_type") != "mask2former":
            raise CheckpointError(
                f"{folder / OUR_CONFIG} describes model_type={meta.get('model_type')!r}, not 'mask2former'"
            )
        try:
            config = Mask2FormerConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid config in {folder / OUR_CONFIG}: {exc}") from exc
        id2label = meta.get("id2label") or {}
        state, path = read_weights(folder)
        model = build_mask2former(config, id2label=id2label)
    elif (folder / HF_CONFIG).is_file():
        from weights_convert import ConversionError
        from weights_convert.hf_mask2former import convert_state_dict

        config, id2label = config_from_hf(_read_json(folder / HF_CONFIG))
        raw, path = read_weights(folder)
        try:
            state = convert_state_dict(raw, backbone_type=config.backbone["name"], source=str(path))
        except ConversionError as exc:
            raise CheckpointError(str(exc)) from exc
        model = build_mask2former(config, id2label=id2label)
    else:
        raise CheckpointError(
            f"{folder} has neither {HF_CONFIG} (transformers layout) nor {OUR_CONFIG} (maskformers layout)"
        )
    load_state_dict_strict(model, state, source=str(path))
    if op_backend is not None:
        set_backend(model, op_backend)
    if (folder / PREPROCESSOR_CONFIG).is_file():
        model.preprocessor_config = _read_json(folder / PREPROCESSOR_CONFIG)
    return model.eval()


def save_mask2former(model: Mask2Former, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``maskformers_config.json`` (+ ``preprocessor_config.json`` when
    the model carries one) into ``folder``; :func:`load_mask2former` reads them back."""
    if model.config is None:
        raise ValueError("the model has no Mask2FormerConfig (model.config is None); build it with build_mask2former")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "library": "maskformers"})
    meta = {
        "model_type": "mask2former",
        "format_version": _FORMAT_VERSION,
        "config": model.config.to_dict(),
        "id2label": {str(k): v for k, v in sorted(model.id2label.items())},
    }
    (folder / OUR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if model.preprocessor_config is not None:
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(model.preprocessor_config, indent=2) + "\n")
    return folder


def convert(src: str | Path, dst: str | Path, *, config: Mask2FormerConfig | None = None) -> Path:
    """Convert ``src`` to our layout in folder ``dst`` (the ``maskformers convert SRC DST`` command).

    src: a hub id or folder (transformers or our layout), or a detectron2 checkpoint file of the original
    Mask2Former repository (``.pkl`` model-zoo file or ``.pth``). For detectron2 files the architecture
    is read from the weights (8 attention heads and 4 sampling points assumed) unless ``config`` is given.
    """
    path = Path(src).expanduser()
    if path.is_file():
        from weights_convert import ConversionError
        from weights_convert import d2_mask2former

        try:
            raw = d2_mask2former.load_checkpoint(path)
            if config is None:
                config = Mask2FormerConfig(**d2_mask2former.infer_architecture(raw))
            state = d2_mask2former.convert_state_dict(raw, backbone_type=config.backbone["name"], source=str(path))
        except (ConversionError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(str(exc)) from exc
        model = build_mask2former(config)
        load_state_dict_strict(model, state, source=str(path))
    else:
        if config is not None:
            raise ValueError("config is only used for detectron2 checkpoint files; folders and hub ids carry their own")
        model = load_mask2former(src)
    return save_mask2former(model, dst)
