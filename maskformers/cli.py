"""The ``maskformers`` command line: ``info``, ``build-ops`` (more subcommands arrive with the models)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from . import info

    return info.main(["--build"] if args.build else [])


def _build_ops(args: argparse.Namespace) -> int:
    from .ops import build

    return build.main(["--device", args.device])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformers", description="Mask2Former/OneFormer in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
