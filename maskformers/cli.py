"""The ``maskformers`` command line.

    maskformers segment IMAGE_OR_FOLDER... --model NAME_OR_PATH --task panoptic|semantic|instance --out DIR
    maskformers convert SRC DST [--force] [--config JSON]
    maskformers export SRC DST --to transformers [--force] [--with-text-mapper] [--tokenizer PATH]
    maskformers info [--build]
    maskformers build-ops [--device auto|cpu|cuda|all] [--op NAME|all] [--variants] [--rebuild]
    maskformers train / evaluate / demo     (see maskformers.training.cli_train, cli_evaluate)
    maskformers check-data --data ...        (see maskformers.training.cli_check_data)
    maskformers push RUN_DIR REPO_ID [--private] [--dry-run]     (see maskformers.publish)
    maskformers serve [--model NAME_OR_PATH] [--port N]            (see maskformers.serve; needs the [demo] extra)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "make_parser"]


def _info(args: argparse.Namespace) -> int:
    from . import info

    return info.main(["--build"] if args.build else [])


def _build_ops(args: argparse.Namespace) -> int:
    from .ops import build

    return build.run(args)


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .hub import CheckpointError

    try:
        config = None
        if args.config is not None:  # an inline JSON object, or a JSON file
            text = Path(args.config).read_text() if args.config.lstrip()[:1] != "{" else args.config
            try:
                config = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"--config {args.config!r} is not valid JSON: {exc}") from None
            if not isinstance(config, dict):
                raise ValueError(f"--config must hold a JSON object of config fields, got {type(config).__name__}")
        folder = convert(args.src, args.dst, config=config, force=args.force)
    except (ValueError, OSError) as exc:  # a DST that must not be written, a bad --config
        print(f"maskformers convert: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"maskformers convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import warnings

    from .export import export
    from .hub import CheckpointError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            folder = export(args.src, args.dst, to=args.to, force=args.force, with_text_mapper=args.with_text_mapper,
                            tokenizer=args.tokenizer)
    except (ValueError, OSError) as exc:  # a DST that must not be written, a setting transformers cannot hold
        print(f"maskformers export: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"maskformers export: {exc}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"maskformers export: note: {warning.message}", file=sys.stderr)
    print(f"wrote {folder}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformers", description="Mask2Former/OneFormer in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .cli_segment import add_segment_parser

    add_segment_parser(sub)

    p = sub.add_parser("convert", help="convert a checkpoint (hub id, folder, detectron2 .pkl/.pth) to our format")
    p.add_argument("src")
    p.add_argument("dst", help="output folder: must be missing or empty (see --force), never the source")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing our files there")
    p.add_argument("--config", help="original .pkl/.pth files only: a JSON object (inline or a file) of config fields "
                   "that override what is read from the weights, e.g. '{\"num_heads\": 16}'")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="write a checkpoint (ours, a hub id, a run's best/final folder) for transformers")
    p.add_argument("src")
    p.add_argument("dst", help="output folder: must be missing or empty (see --force), never the source")
    p.add_argument("--to", required=True, choices=["transformers"], help="the target library's layout")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST, replacing the files it writes")
    p.add_argument("--with-text-mapper", action="store_true",
                   help="OneFormer: keep the training-only text mapper (an is_training model in transformers)")
    p.add_argument("--tokenizer", help="OneFormer: CLIP tokenizer folder or bpe_simple_vocab_16e6.txt.gz, when the "
                   "source carries no tokenizer files")
    p.set_defaults(run=_export)

    p = sub.add_parser("info", help="versions, and which ms_deform_attn backends are available (and why not)")
    p.add_argument("--build", action="store_true", help="build the native kernels if they are not cached yet")
    p.set_defaults(run=_info)

    p = sub.add_parser("build-ops", help="compile the native kernels now (else: on first use)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="auto (default): what can run here, the CPU plus CUDA when a GPU is visible; "
                   "cuda: for TORCH_CUDA_ARCH_LIST (else the visible GPUs, else torch's architectures)")
    p.add_argument("--op", default="all", help="one op (ms_deform_attn, neighborhood_attention) or all")
    p.add_argument("--variants", action="store_true",
                   help="with the CUDA kernels, also build their variants (maskformers.ops.kernel_variants())")
    p.add_argument("--rebuild", action="store_true", help="delete the cached builds first and compile again")
    p.set_defaults(run=_build_ops)

    from .training.cli_check_data import add_check_data_parser
    from .training.cli_evaluate import add_demo_parser, add_evaluate_parser
    from .training.cli_train import add_train_parser

    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_check_data_parser(sub)
    add_demo_parser(sub)

    from .publish import add_push_parser
    from .serve import add_serve_parser

    add_push_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .training.cli_data import UsageError

    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:  # a bad option or input, named by the message: one line, exit code 2
        print(f"maskformers {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
