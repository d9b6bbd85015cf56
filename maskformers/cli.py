"""The ``maskformers`` command line.

    maskformers segment IMAGE_OR_FOLDER... --model NAME_OR_PATH --task panoptic|semantic|instance --out DIR
    maskformers convert SRC DST [--force]
    maskformers info [--build]
    maskformers build-ops [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "make_parser"]


def _info(args: argparse.Namespace) -> int:
    from . import info

    return info.main(["--build"] if args.build else [])


def _build_ops(args: argparse.Namespace) -> int:
    from .ops import build

    return build.main(["--device", args.device])


def _convert(args: argparse.Namespace) -> int:
    from .hub import CheckpointError, convert

    try:
        folder = convert(args.src, args.dst, force=args.force)
    except ValueError as exc:  # a DST that must not be written (the source, a file, a non-empty folder)
        print(f"maskformers convert: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"maskformers convert: {exc}", file=sys.stderr)
        return 1
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
    p.set_defaults(run=_convert)

    p = sub.add_parser("info", help="versions, and which ms_deform_attn backends are available (and why not)")
    p.add_argument("--build", action="store_true", help="build the native kernels if they are not cached yet")
    p.set_defaults(run=_info)

    p = sub.add_parser("build-ops", help="compile the native ms_deform_attn kernels now (else: on first use)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.set_defaults(run=_build_ops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
