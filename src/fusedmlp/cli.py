"""The ``fusedmlp`` command line: profile (the main job), bench, report."""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from rich.table import Table

from .bench.presets import PRESETS, default_preset, get_preset
from .bench.timing import median_us
from .numerics import check_contract

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _profile(args: argparse.Namespace, console: Console) -> int:
    """Eager vs fused on one preset: time per forward and the numerics check."""
    preset = get_preset(args.preset) if args.preset else default_preset()
    if args.tokens:
        preset = preset.with_tokens(args.tokens)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    eager = preset.eager(device, dtype)
    fused = preset.fused(eager)
    x = preset.input(device, dtype)
    with torch.no_grad():
        ref = preset.eager(device, torch.float64)
        ref.load_state_dict(eager.state_dict())
        check = check_contract("output", fused(x), eager(x), ref(x.double()))
        times = {
            name: median_us(lambda m=m: m(x), device) for name, m in (("eager", eager), ("fusedmlp", fused))
        }
    table = Table(
        title=f"{preset.name}: M={preset.tokens}, {preset.hidden} -> {preset.intermediate}, "
        f"{preset.activation.value}{' gated' if preset.gated else ''}, {dtype}, {device}"
    )
    table.add_column("variant")
    table.add_column("forward us", justify="right")
    table.add_column("TFLOP/s", justify="right")
    table.add_column("vs eager", justify="right")
    for name, us in times.items():
        table.add_row(name, f"{us:.1f}", f"{preset.flops / us / 1e6:.2f}", f"{times['eager'] / us:.2f}x")
    console.print(table)
    console.print(str(check))
    return 0 if check.ok else 1


def _fuse_hf(args: argparse.Namespace, console: Console) -> int:
    """Build a Hugging Face model from a config, fuse it, show the report and the forward times."""
    from .bench import hf_models
    from .fuse import fuse

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        config = hf_models.hf_config(args.hf_config, hf_models.parse_overrides(args.set))
    except (ImportError, ValueError) as e:  # no transformers, an unknown name, a bad --set
        console.print(f"fusedmlp fuse: {e}", markup=False)
        return 2
    model = hf_models.build_model(config, device, dtype)
    inputs = hf_models.example_inputs(model, tokens=args.tokens)
    with torch.no_grad():
        before = median_us(lambda: model(**inputs), device)
        report = fuse(model)
        after = median_us(lambda: model(**inputs), device)
    console.print(report)
    console.print(
        f"{type(model).__name__} forward ({dtype}, {device}, {args.tokens} tokens): "
        f"{before:.1f} us before, {after:.1f} us after fuse ({before / after:.2f}x)"
    )
    if device == "cpu":
        console.print("(on a CPU the fused ops run Triton's interpreter or the reference: no speed to see)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedmlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="run eager and fused side by side on a preset")
    prof.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: geglu-article on a GPU, cpu-small on CPU"
    )
    prof.add_argument("--tokens", type=int, help="override the preset's number of tokens (M)")
    prof.add_argument("--dtype", choices=sorted(_DTYPES))
    prof.add_argument("--device")
    prof.set_defaults(func=_profile)
    fz = sub.add_parser("fuse", help="fuse a Hugging Face model built from a config; report and time it")
    fz.add_argument("--hf-config", required=True, help="a local config path, or a model type (tiny sizes)")
    fz.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    fz.add_argument("--tokens", type=int, default=64, help="sequence length of the timed forward")
    fz.add_argument("--dtype", choices=sorted(_DTYPES))
    fz.add_argument("--device")
    fz.set_defaults(func=_fuse_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, Console())


if __name__ == "__main__":
    sys.exit(main())
