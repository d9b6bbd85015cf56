"""``maskformers train``: train or fine-tune a Mask2Former or a OneFormer (one process or torchrun).

    maskformers train --recipe builtin --out runs/builtin            # the built-in model, from scratch
    maskformers train --model facebook/mask2former-swin-tiny-coco-panoptic --data coco-panoptic \\
        --images train2017 --panoptic-dir panoptic_train2017 --annotations panoptic_train2017.json --out runs/ft
    maskformers train --resume --out runs/ft                           # continue it, with its stored settings
    torchrun --nproc_per_node=8 -m maskformers train ...               # DDP (see README)

A thin layer over :func:`maskformers.finetune` (one code path for the CLI and Python): it reads the options,
builds the reader and the model, and turns every input error into one line on stderr with exit code 2.
``--model`` starts from a trained model (a hub id, a folder, or ``builtin``: the shipped built-in model);
``--from-scratch CONFIG`` from a new one (``builtin``: the built-in architecture, or a model config JSON;
``"model_type": "oneformer"`` makes a OneFormer, whose CLIP tokenizer comes from ``--tokenizer``).
Every option left out takes the default shown by ``--help`` or one derived from the data (printed at the start);
``--resume`` takes the run's stored options (``run_config.json``), and says which ones the command line changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_data import UsageError, add_common_data, add_data_arguments, add_tokenizer_argument, build_reader, has_val

__all__ = ["add_train_parser", "run_train"]


def _number(kind: type, low: float, name: str, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (strict and value == low) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


_POSITIVE, _COUNT = _number(int, 1, "positive int"), _number(int, 0, "int >= 0")
# option, TrainingConfig field, parser, help (the default is the field's, appended by the help formatter)
_TRAINING_OPTIONS = (
    ("steps", "max_steps", _POSITIVE, "optimizer steps"),
    ("batch-size", "batch_size", _POSITIVE, "images per step and process"),
    ("accum", "grad_accumulation", _POSITIVE, "micro-batches accumulated into one step"),
    ("lr", "lr", _number(float, 0.0, "positive float", strict=True), "base learning rate (backbone: x0.1)"),
    ("warmup-steps", "warmup_steps", _COUNT, "linear warm-up steps"),
    ("log-every", "log_every", _POSITIVE, "write a log.jsonl record every N steps"),
    ("eval-every", "eval_every", _COUNT, "evaluate every N steps (with validation data: --checkpoint-every)"),
    ("checkpoint-every", "checkpoint_every", _POSITIVE, "write a checkpoint every N steps"),
    ("keep-checkpoints", "keep_checkpoints", _COUNT, "newest checkpoints kept (0: all)"),
    ("early-stopping", "early_stopping_patience", _COUNT,
     "stop after N evaluations without a better PQ / mIoU / AP (0: never)"),
    ("max-skip-rate", "max_skip_rate", _number(float, 0.0, "rate"),
     "--on-error skip: stop once more than this share of the samples proved unusable"),
    ("num-points", "num_points", _POSITIVE, "points sampled per mask for the mask losses"),
    ("seed", "seed", int, "seeds the new class head, the data order, augmentations and points"),
    ("workers", "num_workers", _COUNT, "data loading processes"),
)
# options stored in run_config.json that --resume restores (everything but the run's place and the console)
_NOT_RESTORED = {"out", "resume", "overwrite", "quiet", "device", "run", "command", "help"}
_FALLBACKS: dict[str, Any] = {}  # the parser defaults of the shared data options, applied after --resume's merge


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .config import TrainingConfig

    defaults = TrainingConfig()
    p = subparsers.add_parser("train", help="train or fine-tune a Mask2Former or a OneFormer (one process or torchrun)")
    p.add_argument("--recipe", choices=["builtin"],
                   help="a complete recipe: 'builtin' trains the shipped built-in model from scratch")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", default=None,
                       help="start from a trained model: a hub id, a checkpoint folder or 'builtin' (the shipped "
                            "built-in model)")
    start.add_argument("--from-scratch", default=None, metavar="CONFIG",
                       help="start from a new, randomly initialised model: 'builtin' (the built-in architecture) or "
                            "a model config JSON (\"model_type\": \"oneformer\" makes a OneFormer)")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], default=None,
                   help="the targets' task and the evaluation metric (default: panoptic when the data has thing "
                        "classes, else semantic; OneFormer draws a task per image and uses this for the metric)")
    add_common_data(p)
    p.add_argument("--thing-ids", nargs="+", default=None, metavar="ID_OR_NAME",
                   help="the thing classes (ids or names) of data that does not say (semantic folders, HF datasets): "
                        "they count as things in PQ and are saved with the model (default: none)")
    p.add_argument("--crop-size", type=_POSITIVE, default=None,
                   help="training crop (default: the images' median longest side, or shortest side for semantic, "
                        "rounded up to a multiple of 32 and capped at 1024)")
    add_data_arguments(p, "val-")
    p.add_argument("--val-split", default=None, help="HF dataset split for evaluation")
    p.add_argument("--val-scenes", type=_COUNT, default=None, help="synthetic: held-out scenes for evaluation "
                   "(default: 100)")
    p.add_argument("--out", required=True, help="output folder: run_config.json, log.jsonl, checkpoints, best/ and "
                   "final/ models; must be empty unless --resume or --overwrite")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest readable checkpoint, with its stored options")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start a new run in a non-empty --out (its contents first move to OUT.old-N)")
    p.add_argument("--config", help="JSON file of TrainingConfig fields (the options below override it)")
    for name, field, kind, text in _TRAINING_OPTIONS:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: {getattr(defaults, field)})")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train the pixel decoder and transformer decoder only")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: float32)")
    p.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="large-scale-jitter range (default: 0.1 2.0)")
    p.add_argument("--on-error", choices=["raise", "skip"], default=None,
                   help="bad samples: stop with an error naming the file, or skip and list them (default: raise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tokenizer_argument(p)
    for action in p._actions:  # every option parses to None unless given, so --resume knows what the user set
        if action.default in (None, argparse.SUPPRESS) or action.dest in _NOT_RESTORED:
            continue
        if action.default is not False and "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {action.default})".strip()
        _FALLBACKS[action.dest] = action.default
        action.default = None
    p.set_defaults(run=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from ..hub import CheckpointError
    from .builtin import BuiltinModelMissing
    from .distributed import teardown
    from .loop import TooManySkipped

    try:
        return _run(args)
    except TooManySkipped as exc:
        print(f"maskformers train: stopped: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError, CheckpointError, BuiltinModelMissing) as exc:
        from .data import SampleError

        hint = " (--on-error skip skips such samples and lists them)" if isinstance(exc, SampleError) else ""
        print(f"maskformers train: {exc}{hint}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"maskformers train: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(options in effect, TrainingConfig fields, what --resume changed): the command line over the stored run."""
    from .run_folder import check_run_folder, read_run_config

    given = {k: v for k, v in vars(args).items() if k not in _NOT_RESTORED and v is not None}
    if not args.resume:
        return given, {}, None
    check_run_folder(args.out, resume=True, overwrite=bool(args.overwrite))
    stored = read_run_config(args.out)
    before = dict(stored.get("args", {}))
    changed = {k: {"was": before.get(k), "now": v} for k, v in given.items() if before.get(k) != v}
    for key in ("model", "from_scratch", "recipe"):  # the run's starting point is its own
        if key in changed:
            print(f"note: --{key.replace('_', '-')} {given[key]} ignored: a resumed run continues from its own "
                  f"checkpoint (it started from {before.get(key)})", file=sys.stderr)
            del changed[key]
            given.pop(key)
    if changed:
        print("resuming with changed settings: " + ", ".join(
            f"--{k.replace('_', '-')} {c['was']} -> {c['now']}" for k, c in changed.items()), file=sys.stderr)
    before.setdefault("crop_size", (stored.get("data") or {}).get("crop_size"))
    return {**before, **given}, dict(stored.get("training", {})), {"changed": changed}


def _command_line(options: dict[str, Any], out: str) -> list[str]:
    """The words of the ``maskformers train`` command that gives these options."""
    words = ["maskformers", "train"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        elif value is not False:
            words += [flag, str(value)]
    return [*words, "--out", str(out)]


def _run(args: argparse.Namespace) -> int:
    from .builtin import BUILTIN_IMAGE_SIZE, BUILTIN_RECIPE
    from .cli_data import load_model, new_model
    from .config import TrainingConfig
    from .run import finetune

    options, fields, resumed = _settings(args)
    for key, value in {**_FALLBACKS, **options}.items():
        setattr(args, key, value)
    if args.recipe == "builtin":
        if args.model is None:
            args.from_scratch = args.from_scratch or "builtin"
        args.data = "synthetic"
        args.scenes = args.scenes or BUILTIN_RECIPE["train_scenes"]
        args.scale_range = args.scale_range or BUILTIN_RECIPE["scale_range"]
        args.val_scenes = BUILTIN_RECIPE["val_scenes"] if args.val_scenes is None else args.val_scenes
        if resumed is None:
            fields = dict(BUILTIN_RECIPE["training"])
    if args.config and resumed is None:
        try:
            fields.update(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--config {args.config}: cannot read it as JSON ({exc})") from None
    for option, field in [("task", "task"), ("amp", "amp"), ("freeze_backbone", "freeze_backbone")] + [
            (name.replace("-", "_"), field) for name, field, _, _ in _TRAINING_OPTIONS]:
        if getattr(args, option, None) is not None:
            fields[field] = getattr(args, option)
    TrainingConfig.from_dict(fields)  # unknown --config fields: one line, before anything is read
    args.seed = fields.get("seed", 0)
    args.val_scenes = 100 if args.val_scenes is None else args.val_scenes

    reader = build_reader(args)
    if (args.model is None) == (args.from_scratch is None):
        raise UsageError("say what to start from: --model (a trained model: hub id, folder or 'builtin') or "
                         "--from-scratch ('builtin' or a model config JSON)")
    if args.from_scratch is not None:
        model = new_model(args.from_scratch, id2label=dict(reader.id2label), seed=args.seed)
    else:
        model = load_model(args.model)
    crop = args.crop_size or args.size or (BUILTIN_IMAGE_SIZE if args.data == "synthetic" else None)
    val = build_reader(args, split="val") if has_val(args) else None
    run_info = {"command": _command_line(options, args.out), "args": options,
                **({"resumed": resumed} if resumed is not None else {})}
    finetune(model, reader, out=args.out, val_data=val, crop_size=crop, on_error=args.on_error or "raise",
             scale_range=tuple(args.scale_range or (0.1, 2.0)), thing_ids=args.thing_ids, tokenizer=args.tokenizer,
             resume=bool(args.resume), overwrite=bool(args.overwrite), device=args.device, progress=not args.quiet,
             run_info=run_info, **fields)
    return 0
