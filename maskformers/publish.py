"""Publish a model to the Hugging Face hub with a model card: ``maskformers push RUN_DIR REPO_ID`` and
``model.push_to_hub(repo_id)``.

What is uploaded, in one commit (``HfApi.create_repo`` + ``HfApi.create_commit``, so a real push takes the
hub's ordinary path, large files through its LFS/Xet storage):

* the model folder: every file ``save_pretrained`` wrote (``model.safetensors``, ``maskformers_config.json``,
  and the processor, tokenizer and class-info files a model carries). From a training run folder that is
  ``best/`` when the run kept one, else ``final/``; a model folder itself is taken as it is;
* ``run_config.json`` when the run folder has one (the run's arguments and versions);
* ``README.md``: the model card (:func:`model_card`), YAML front matter in the hub's format
  (``library_name: maskformers``, ``pipeline_tag: image-segmentation``, tags, metrics as ``model-index``)
  and a body with the architecture, the classes, the training data and command, the evaluation of the
  uploaded weights (from the run's ``log.jsonl``) and how to load it.

Nothing here touches the network except :func:`push_to_hub`; ``maskformers push --dry-run`` shows the files
and the card instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PublishError", "RunInfo", "read_run", "model_card", "upload_files", "check_repo_id", "push_to_hub",
           "add_push_parser", "run_push"]

_OUR_CONFIG = "maskformers_config.json"
_MAIN_METRICS = ("PQ", "mIoU", "AP")  # the metric a run's "best" is chosen by, per task
_TASK_OF_METRIC = {"PQ": "panoptic", "mIoU": "semantic", "AP": "instance"}
_DATA_KEYS = ("data", "images", "annotations", "panoptic_dir", "labels", "hf_name", "hf_split", "id2label", "scenes",
              "size")


class PublishError(ValueError):
    """The folder holds nothing to publish, or the repository id is not valid; the message says which."""


@dataclass
class RunInfo:
    """What a training run folder says about the model in it (None: not recorded)."""

    model_dir: Path
    which: str  # "best", "final" or "folder" (a model folder given directly)
    run_dir: Path | None = None
    evaluation: dict[str, Any] | None = None  # {"step": int, "metrics": {...}} of the uploaded weights
    last_step: int | None = None
    run_config: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)  # the model folder's files


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md")


def _is_model_folder(folder: Path) -> bool:
    return (folder / _OUR_CONFIG).is_file() and (folder / "model.safetensors").is_file()


def _read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a killed run
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _main_metric(metrics: dict[str, Any]) -> str | None:
    return next((m for m in _MAIN_METRICS if isinstance(metrics.get(m), (int, float))), None)


def _evaluation_of(which: str, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation record that describes the uploaded weights: the best one (the first maximum of the main
    metric, as the training loop keeps it) for ``best/``; the one at the last step for ``final/``."""
    evals = [r for r in records if isinstance(r.get("eval"), dict) and isinstance(r.get("step"), int)]
    if not evals:
        return None
    if which == "best":
        metric = _main_metric(evals[-1]["eval"])
        if metric is None:
            return None
        best = max(evals, key=lambda r: (r["eval"].get(metric, float("-inf")), -r["step"]))
        return {"step": best["step"], "metrics": best["eval"]}
    last_step = max(r["step"] for r in records if isinstance(r.get("step"), int))
    final = [r for r in evals if r["step"] == last_step]
    return {"step": last_step, "metrics": final[-1]["eval"]} if final else None


def read_run(path: str | Path) -> RunInfo:
    """The model to publish from a run folder (``best/``, else ``final/``) or a model folder, with what the run
    recorded about it. Raises :class:`PublishError` naming the folder when there is no model."""
    path = Path(path)
    if not path.is_dir():
        raise PublishError(f"RUN_DIR {str(path)!r} is not a folder")
    if _is_model_folder(path):
        parent = path.parent
        run_dir = parent if (parent / "log.jsonl").is_file() or (parent / "run_config.json").is_file() else None
        which = path.name if run_dir is not None and path.name in ("best", "final") else "folder"
        info = RunInfo(model_dir=path, which=which, run_dir=run_dir)
    else:
        found = next((name for name in ("best", "final") if _is_model_folder(path / name)), None)
        if found is None:
            raise PublishError(
                f"RUN_DIR {str(path)!r} holds no model: expected best/ or final/ (model.safetensors + {_OUR_CONFIG}, "
                "written at the end of `maskformers train`) or a model folder itself")
        info = RunInfo(model_dir=path / found, which=found, run_dir=path)
    info.files = _model_files(info.model_dir)
    if info.run_dir is not None:
        records = _read_log(info.run_dir / "log.jsonl")
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        info.last_step = max(steps) if steps else None
        info.evaluation = _evaluation_of(info.which, records)
        config_path = info.run_dir / "run_config.json"
        if config_path.is_file():
            try:
                loaded = json.loads(config_path.read_text())
            except ValueError as exc:
                raise PublishError(f"{config_path} is not valid JSON: {exc}") from None
            info.run_config = loaded if isinstance(loaded, dict) else None
    return info


def check_repo_id(repo_id: str) -> str:
    """``NAMESPACE/NAME`` as the hub accepts it; :class:`PublishError` naming the value otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PublishError(f"REPO_ID {repo_id!r} must be NAMESPACE/NAME (your user or organisation, then the model)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        raise PublishError(f"REPO_ID {repo_id!r} is not a valid hub repository id: {reason}") from None
    return repo_id


# ------------------------------------------------------------------------------------------------
# the model card
# ------------------------------------------------------------------------------------------------


def _architecture(meta: dict[str, Any], num_parameters: int) -> list[tuple[str, str]]:
    config = meta.get("config", {})
    backbone = dict(config.get("backbone") or {})
    name = backbone.pop("name", "?")
    keys = ("embed_dim", "depths", "num_heads", "window_size", "depth", "variant", "dims", "kernel_size")
    shown = ", ".join(f"{k} {v}" for k, v in backbone.items() if k in keys)
    rows = [("model", {"mask2former": "Mask2Former", "oneformer": "OneFormer"}.get(meta.get("model_type"), "?")),
            ("backbone", f"{name} ({shown})" if shown else str(name))]
    for key, label in (("num_queries", "queries"), ("hidden_dim", "hidden size"), ("decoder_layers", "decoder layers"),
                       ("encoder_layers", "pixel-decoder encoder layers")):
        if key in config:
            rows.append((label, str(config[key])))
    rows.append(("parameters", f"{num_parameters / 1e6:.2f} M"))
    return rows


def _count_parameters(weights: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _command(run_config: dict[str, Any]) -> str | None:
    command = run_config.get("command") or run_config.get("argv")
    if isinstance(command, list) and command:
        words = [str(w) for w in command]
        if words[0] != "maskformers" and not words[0].endswith(("maskformers", "torchrun", "python")):
            words = ["maskformers", *words]
        return shlex.join(words)
    return command if isinstance(command, str) and command else None


def _run_args(run_config: dict[str, Any]) -> dict[str, Any]:
    args = run_config.get("args") or run_config.get("arguments") or {}
    return args if isinstance(args, dict) else {}


def _task(info: RunInfo | None) -> str | None:
    if info is not None and info.run_config is not None:
        task = _run_args(info.run_config).get("task")
        training = info.run_config.get("training_config") or info.run_config.get("training") or {}
        task = task or (training.get("task") if isinstance(training, dict) else None)
        if isinstance(task, str):
            return task
    if info is not None and info.evaluation is not None:
        metric = _main_metric(info.evaluation["metrics"])
        if metric is not None:
            return _TASK_OF_METRIC[metric]
    return None


def model_card(meta: dict[str, Any], repo_id: str, *, num_parameters: int, info: RunInfo | None = None) -> str:
    """The ``README.md`` of a hub repository: YAML front matter + markdown. ``meta`` is the model folder's
    ``maskformers_config.json``; ``info`` what the run recorded (None for a model pushed from Python)."""
    from huggingface_hub import EvalResult, ModelCardData

    model_type = meta.get("model_type", "mask2former")
    id2label = {int(k): v for k, v in (meta.get("id2label") or {}).items()}
    task = _task(info)
    args = _run_args(info.run_config) if info is not None and info.run_config else {}
    data_kind = args.get("data")
    metrics = info.evaluation["metrics"] if info is not None and info.evaluation else {}
    shown_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("n")}
    tags = ["maskformers", model_type, "image-segmentation", *([f"{task}-segmentation"] if task else [])]
    eval_results = [
        EvalResult(task_type="image-segmentation", task_name=f"{task or 'image'} segmentation".capitalize(),
                   dataset_type=str(data_kind or "unknown"), dataset_name=str(args.get("hf_name") or data_kind or
                                                                              "validation data of the run"),
                   metric_type=name.lower(), metric_name=name, metric_value=round(float(value), 4))
        for name, value in shown_metrics.items()
    ]
    card_data = ModelCardData(
        library_name="maskformers", pipeline_tag="image-segmentation", tags=tags,
        datasets=[args["hf_name"]] if data_kind == "hf" and args.get("hf_name") else None,
        metrics=sorted({name.lower() for name in shown_metrics}) or None,
        model_name=repo_id if eval_results else None, eval_results=eval_results or None,
    )
    name = {"mask2former": "Mask2Former", "oneformer": "OneFormer"}.get(model_type, model_type)
    what = ("one model for panoptic, instance and semantic segmentation (the task is its prompt)"
            if model_type == "oneformer" else f"{task} segmentation" if task else "universal image segmentation")
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A {name} for {what}, {len(id2label)} classes, trained and published with maskformers (Mask2Former "
             "and OneFormer in plain PyTorch).", "",
             "## Use", "", "```python", "import maskformers", "",
             f'model = maskformers.from_pretrained("{repo_id}")', "```", "", "```bash",
             f"maskformers segment photo.jpg --model {repo_id} --task {task or 'panoptic'} --out seg/", "```", "",
             "## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _architecture(meta, num_parameters)]
    lines += ["", "## Classes", "", ", ".join(f"{i} {label}" for i, label in sorted(id2label.items())) or "none", ""]
    lines += ["## Training", ""]
    if info is None or info.run_dir is None:
        lines += ["Not recorded: this model was published without its training run folder.", ""]
    else:
        data = {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, "", False)}
        kind = data.pop("data", None)
        details = ", ".join(f"{k} `{v}`" for k, v in data.items())
        command = _command(info.run_config) if info.run_config else None
        lines.append(f"- data: {kind or 'not recorded'}" + (f"; {details}" if details else ""))
        lines.append(f"- command: `{command}`" if command else
                     "- command: not recorded (the run has no run_config.json)")
        if info.last_step is not None:
            lines.append(f"- steps: {info.last_step}")
        versions = info.run_config.get("versions") if info.run_config else None
        if isinstance(versions, dict) and versions:
            lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        weights = "a model folder" if info.which == "folder" else f"`{info.which}/` of the run"
        lines.append(f"- weights: {weights}")
        lines.append("")
    lines += ["## Evaluation", ""]
    if shown_metrics:
        lines += [f"On the run's validation data at step {info.evaluation['step']}:", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in shown_metrics.items()]
    else:
        lines.append("Not recorded: the run's log.jsonl holds no evaluation of these weights.")
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"


def upload_files(info: RunInfo, repo_id: str) -> dict[str, Path | bytes]:
    """Path in the repository -> local file (or the card's bytes): exactly what :func:`push_to_hub` uploads."""
    meta = json.loads((info.model_dir / _OUR_CONFIG).read_text())
    files: dict[str, Path | bytes] = {p.name: p for p in info.files}
    if info.run_dir is not None and (info.run_dir / "run_config.json").is_file():
        files["run_config.json"] = info.run_dir / "run_config.json"
    card = model_card(meta, repo_id, num_parameters=_count_parameters(info.model_dir / "model.safetensors"), info=info)
    files["README.md"] = card.encode()
    return dict(sorted(files.items()))


def push_to_hub(
    source: str | Path | Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` on the hub if needed and upload a model with its card in one commit; returns the
    commit's URL. ``source``: a training run folder, a model folder, or a model (saved to a temporary folder
    first). ``token`` defaults to the logged-in one (``hf auth login`` or ``HF_TOKEN``); ``endpoint`` to the
    hub (``HF_ENDPOINT``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="maskformers-push-") as tmp:
        if not isinstance(source, (str, Path)):
            if not hasattr(source, "save_pretrained"):
                raise PublishError(f"cannot publish a {type(source).__name__}: give a folder or a maskformers model")
            source.save_pretrained(Path(tmp) / "model")
            source = Path(tmp) / "model"
        info = read_run(source)
        files = upload_files(info, repo_id)
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes)
                                         else str(content)) for name, content in files.items()]
        commit = api.create_commit(repo_id, operations, repo_type="model",
                                   commit_message=commit_message or f"Upload {info.model_dir.name} with maskformers")
    return str(commit.commit_url)


# ------------------------------------------------------------------------------------------------
# maskformers push
# ------------------------------------------------------------------------------------------------


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("push", help="upload a trained model with a model card to the Hugging Face hub")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a training run folder (its best/, else final/) or a model folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="NAMESPACE/NAME of the hub repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="hub token (default: `hf auth login`'s, or $HF_TOKEN)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list the files and print the model card; upload nothing")
    p.set_defaults(run=run_push)
    return p


def _network_errors() -> tuple[type[BaseException], ...]:
    """Errors of a failed request, from whichever HTTP client this huggingface_hub uses."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_push(args: argparse.Namespace) -> int:
    try:
        check_repo_id(args.repo_id)
        info = read_run(args.run_dir)
    except PublishError as exc:
        print(f"maskformers push: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        files = upload_files(info, args.repo_id)
        print(f"would upload to {args.repo_id}:")
        for name, content in files.items():
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
            print(f"  {name}  ({size:,} bytes)")
        print()
        print(files["README.md"].decode(), end="")
        return 0
    from huggingface_hub import constants, get_token

    if args.token is None and get_token() is None:
        print("maskformers push: no Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass --token",
              file=sys.stderr)
        return 2
    try:
        url = push_to_hub(args.run_dir, args.repo_id,
                          private=args.private or None, token=args.token, commit_message=args.message)
    except _network_errors() as exc:
        reason = " ".join(str(exc).split())[:300]
        print(f"maskformers push: the upload to {args.repo_id} at {constants.ENDPOINT} failed: {reason}",
              file=sys.stderr)
        return 1
    print(f"pushed {info.model_dir} to {args.repo_id}: {url}")
    return 0
