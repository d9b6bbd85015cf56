"""Checkpoint methods shared by :class:`~maskformers.models.mask2former.Mask2Former` and
:class:`~maskformers.models.oneformer.OneFormer`: ``from_pretrained``, ``save_pretrained``, ``push_to_hub``.

Each is a thin call into :mod:`maskformers.hub` (loading and saving) or :mod:`maskformers.publish` (the hub
upload), imported on first use so that the models and those modules do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

__all__ = ["PretrainedMixin"]


class PretrainedMixin:
    """``checkpoint_type`` names the checkpoints the class loads ("mask2former" or "oneformer")."""

    checkpoint_type: ClassVar[str] = ""

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> Any:
        """Load a checkpoint of this model type: a hub id, a local folder in transformers' layout, a folder
        written by :meth:`save_pretrained`, or ``"builtin"``. See :func:`maskformers.hub.from_pretrained` for the
        keyword arguments; a checkpoint of the other model type is an error."""
        from ..hub import from_pretrained

        return from_pretrained(name_or_path, model_type=cls.checkpoint_type, **kwargs)

    def save_pretrained(self, folder: str | Path, *, format: str = "maskformers", **options: Any) -> Path:
        """Write ``model.safetensors`` (our parameter names) and ``maskformers_config.json``; with
        ``format="transformers"`` the folder transformers' ``from_pretrained`` reads. See
        :func:`maskformers.hub.save_pretrained` for ``options``."""
        from ..hub import save_pretrained

        return save_pretrained(self, folder, format=format, **options)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload to the hub repository ``repo_id`` (``NAMESPACE/NAME``, created if missing) with a model card;
        returns the commit URL. Keywords: ``private``, ``token``, ``commit_message``, ``endpoint`` (see
        :func:`maskformers.publish.push_to_hub`)."""
        from ..publish import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
