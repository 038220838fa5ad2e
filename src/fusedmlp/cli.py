"""The ``fusedmlp`` command line: profile (the main job), bench, report."""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console

from .bench.presets import PRESETS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _profile(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import profile_command  # imports matplotlib: only when profiling

    return profile_command(args, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import report_command

    return report_command(args, console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedmlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser(
        "profile", help="run MLP variants side by side under torch.profiler: kernels, decoded, and why"
    )
    shape = prof.add_mutually_exclusive_group()
    shape.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: geglu-article on a GPU, cpu-small on CPU"
    )
    shape.add_argument(
        "--hf-config",
        metavar="NAME_OR_DIR",
        help="a transformers model from its config, fused by fusedmlp.fuse",
    )
    prof.add_argument("--tokens", type=int, help="number of tokens (M); replaces the preset's")
    prof.add_argument("--hidden", type=int, help="model width D; replaces the preset's")
    prof.add_argument("--intermediate", type=int, help="MLP width H; replaces the preset's")
    prof.add_argument("--activation", help="activation name (silu, gelu, gelu_tanh, relu, ...)")
    prof.add_argument("--gated", action=argparse.BooleanOptionalAction, help="gated (GLU) MLP or plain")
    prof.add_argument("--bias", action=argparse.BooleanOptionalAction, help="Linear layers with bias")
    prof.add_argument(
        "--variants",
        default="eager,compile,liger,fusedmlp",
        help="comma-separated: eager,compile,liger,fusedmlp",
    )
    prof.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    prof.add_argument("--device", help="default: cuda when available")
    prof.add_argument("--out", default="fusedmlp-out", help="output folder (default: fusedmlp-out)")
    prof.set_defaults(func=_profile)
    rep = sub.add_parser(
        "report", help="the profile analysis from saved Chrome traces (plain or .gz), no GPU"
    )
    rep.add_argument("paths", nargs="+", metavar="PATH", help="trace files, or folders holding them")
    rep.add_argument("--out", default="fusedmlp-out", help="output folder (default: fusedmlp-out)")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, Console())


if __name__ == "__main__":
    sys.exit(main())
