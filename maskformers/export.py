"""Writing a model in transformers' layout: ``model.save_pretrained(folder, format="transformers")`` and
``maskformers export SRC DST --to transformers``.

The folder holds what transformers' ``from_pretrained`` reads:

* ``config.json``: a transformers ``Mask2FormerConfig`` / ``OneFormerConfig`` with its ``backbone_config``
  (:mod:`weights_convert.hf_config_writer`);
* ``model.safetensors`` in transformers' names (:mod:`weights_convert.hf_state_writer`);
* ``preprocessor_config.json``: the model's processor settings (``model.preprocessor_config``, else our
  processor's defaults) in transformers' keys, so that ``AutoImageProcessor`` computes the same pixels;
* OneFormer: the CLIP tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``), ``processor_config.json`` (the task and text sequence lengths) and the class
  info as transformers' ``metadata`` inside ``preprocessor_config.json``, with ``class_info_file`` left empty
  so that transformers reads it from there instead of downloading a file (``OneFormerProcessor.from_pretrained``
  works offline).

By default a OneFormer is exported for inference: without its text mapper (``is_training=False``, like the
published checkpoints; an ``is_training`` model in transformers needs ``text_inputs`` at every forward).
``with_text_mapper=True`` keeps it. What transformers cannot represent raises ``ValueError`` naming the
setting; differences that do not block the export are returned as notes (``save_pretrained`` warns once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["export", "hf_preprocessor_config", "write_transformers_folder"]

_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}
_IMAGE_KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
               "image_std", "ignore_index", "do_reduce_labels")


def _image_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in _IMAGE_KEYS}


def _class_info(model: nn.Module, processor: Any) -> Any:
    """The OneFormer's class info: its processor's, the source folder's class-info file, or ``model.class_info``."""
    from .processing.class_info import load_class_info

    if processor.class_info is not None:
        return processor.class_info
    name = processor.class_info_file
    content = getattr(model, "extra_files", {}).get(name) if isinstance(name, str) else None
    if content is not None:
        return load_class_info(json.loads(content))
    info = getattr(model, "class_info", None)
    return None if info is None else load_class_info(info)


def _padding_notes(processor: Any) -> list[str]:
    """What changes when the processor pads to a multiple (training pads its batches to 32, so fine-tuned models
    are evaluated that way): transformers' processors pad to the batch's largest image only."""
    if not processor.size_divisibility:
        return []
    return [f"preprocessor size_divisibility={processor.size_divisibility} has no transformers equivalent: the "
            "exported processor pads to the largest image of the batch only, so on images whose sides are not "
            f"multiples of {processor.size_divisibility} transformers' predictions differ slightly from maskformers' "
            "(same weights; identical where the sides are multiples)"]


def hf_preprocessor_config(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """(transformers ``preprocessor_config.json`` dict, notes) of ``model``'s processor settings."""
    from .processing.image_processor import ImageProcessor
    from .processing.oneformer_processor import OneFormerProcessor

    config, settings = model.config, getattr(model, "preprocessor_config", None)
    if config.model_type == "mask2former":
        processor = ImageProcessor.from_dict(settings) if settings else ImageProcessor()
        out = {"image_processor_type": "Mask2FormerImageProcessor", **_image_settings(processor.to_dict()),
               "size_divisor": processor.size_divisor}
        if processor.pad_size is not None:
            out["pad_size"] = dict(processor.pad_size)
        return out, _padding_notes(processor)
    processor = OneFormerProcessor.from_dict(settings) if settings else OneFormerProcessor()
    if processor.size_divisor:
        raise ValueError(f"cannot export to transformers: preprocessor size_divisor={processor.size_divisor}: "
                         "transformers' OneFormerImageProcessor does not round sizes to a divisor")
    if processor.pad_size is not None:
        raise ValueError(f"cannot export to transformers: preprocessor pad_size={processor.pad_size}: transformers' "
                         "OneFormerImageProcessor pads to the largest image of the batch")
    if processor.task_seq_length != config.task_seq_len:
        raise ValueError(f"cannot export: the processor's task_seq_length={processor.task_seq_length} differs from the "
                         f"model's task_seq_len={config.task_seq_len} (the task MLP's input width)")
    out = {"image_processor_type": "OneFormerImageProcessor", "processor_class": "OneFormerProcessor",
           **_image_settings(processor.to_dict()),
           "num_text": processor.num_text or config.num_queries - config.text_n_ctx,
           "task_seq_length": processor.task_seq_length, "max_seq_length": processor.max_seq_length,
           "class_info_file": ""}
    notes = _padding_notes(processor)
    info = _class_info(model, processor)
    if info is None:
        notes.append("no class info (names, thing ids) travels with this OneFormer: transformers' OneFormerProcessor "
                     "gets no metadata, which its training targets and panoptic-task instance post-processing need")
    elif len(info.names) != config.num_classes:
        raise ValueError(f"cannot export: the class info names {len(info.names)} classes, the model has "
                         f"{config.num_classes}")
    else:
        out["metadata"] = {**{str(i): n for i, n in enumerate(info.names)}, "thing_ids": sorted(info.thing_ids),
                           "class_names": list(info.names)}
    return out, notes


def _clip_tokenizer(model: nn.Module, tokenizer: Any) -> Any:
    """A ``CLIPTokenizer``: ``tokenizer`` (itself, a folder or a BPE merge file), else the files the model
    brought from its checkpoint folder."""
    from .processing.clip_tokenizer import find_clip_tokenizer

    found = find_clip_tokenizer(tokenizer, model=model)
    if found is None:
        raise ValueError("cannot export a OneFormer to transformers without its CLIP tokenizer: this model carries "
                         "no tokenizer files; pass tokenizer= (a CLIPTokenizer, a folder with vocab.json + "
                         "merges.txt, or CLIP's bpe_simple_vocab_16e6.txt.gz)")
    return found


def _tokenizer_files(model: nn.Module, tokenizer: Any, processor: Mapping[str, Any]) -> dict[str, bytes]:
    """The CLIP tokenizer in the layout of the hub OneFormer checkpoints, and the processor's sequence lengths."""
    files = dict(_clip_tokenizer(model, tokenizer).files())
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "processor_class": "OneFormerProcessor",
                        "model_max_length": 77, "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
                        **_SPECIALS}
    lengths = {k: processor[k] for k in ("task_seq_length", "max_seq_length")}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", _SPECIALS),
                          ("processor_config.json", {"processor_class": "OneFormerProcessor", **lengths})):
        files[name] = (json.dumps(content, indent=2) + "\n").encode("utf-8")
    return files


def write_transformers_folder(
    model: nn.Module, folder: str | Path, *, with_text_mapper: bool = False, tokenizer: Any = None
) -> list[str]:
    """Write ``model`` into the existing ``folder`` in transformers' layout (see the module docstring); returns
    the notes on what differs. Raises ``ValueError`` for what transformers cannot represent."""
    from safetensors.torch import save_file

    from weights_convert import ConversionError
    from weights_convert.hf_config_writer import mask2former_config_to_hf, oneformer_config_to_hf
    from weights_convert.hf_state_writer import state_dict_to_hf

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type not in ("mask2former", "oneformer"):
        raise ValueError(f"{type(model).__name__} has no Mask2Former/OneFormer config (model.config); build it with "
                         "build_mask2former / build_oneformer")
    if with_text_mapper and getattr(model, "text_mapper", None) is None:
        raise ValueError("with_text_mapper=True needs a OneFormer with a text mapper (built with_text_mapper=True)")
    if model_type == "mask2former" and tokenizer is not None:
        raise ValueError("tokenizer= applies to OneFormer exports only")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if with_text_mapper or not k.startswith("text_mapper.")}
    dtype = str(next(v.dtype for v in state.values() if v.is_floating_point())).removeprefix("torch.")
    try:
        if model_type == "mask2former":
            hf_config, notes = mask2former_config_to_hf(config.to_dict(), model.id2label, dtype=dtype)
        else:
            hf_config, notes = oneformer_config_to_hf(config.to_dict(), model.id2label, dtype=dtype,
                                                      with_text_mapper=with_text_mapper)
            if model.text_mapper is not None and not with_text_mapper:
                notes.append("the text mapper (training only: text queries of the contrastive loss) is not exported; "
                             "pass with_text_mapper=True (--with-text-mapper) to keep it as an is_training model")
        hf_state = state_dict_to_hf(state, model_type=model_type, backbone_type=config.backbone["name"],
                                    source=f"{type(model).__name__} weights")
    except ConversionError as exc:
        raise ValueError(str(exc)) from None
    preprocessor, more = hf_preprocessor_config(model)
    files = {"config.json": hf_config, "preprocessor_config.json": preprocessor}
    folder = Path(folder)
    save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model_type == "oneformer":
        for name, content in _tokenizer_files(model, tokenizer, preprocessor).items():
            (folder / name).write_bytes(content)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return notes + more


def export(
    src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "transformers", force: bool = False,
    with_text_mapper: bool = False, tokenizer: Any = None,
) -> Path:
    """``maskformers export SRC DST --to transformers``: load ``src`` (a hub id or folder in either layout, e.g.
    a training run's ``best``/``final`` folder, or an original-repository file) and write it to ``dst`` with
    ``save_pretrained(..., format=to)``. ``dst`` follows :func:`maskformers.convert.convert`'s rules: never the
    source nor inside it, missing or empty unless ``force``, written through a temporary folder."""
    from .convert import check_destination, load_source

    if to != "transformers":
        raise ValueError(f"--to must be 'transformers', got {to!r}")
    dst = check_destination(src, dst, force=force)
    model = load_source(src)
    return model.save_pretrained(dst, format=to, with_text_mapper=with_text_mapper, tokenizer=tokenizer)

