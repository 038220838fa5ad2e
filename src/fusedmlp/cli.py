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

_BENCH_VARIANTS = ("floor", "eager", "eager-merged", "compile", "compile-max-autotune", "liger", "fusedmlp")
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


def _bench(args: argparse.Namespace, console: Console) -> int:
    """The side-by-side benchmark on one or more presets; JSON, a markdown table and a plot."""
    from pathlib import Path

    from .bench import report, run
    from .bench.presets import PRESET_TOKENS

    if not torch.cuda.is_available():
        console.print("[red]fusedmlp bench needs a CUDA GPU[/red] (use `fusedmlp profile` on a CPU)")
        return 2
    variants = tuple(args.variants.split(",")) if args.variants else run.DEFAULT_VARIANTS
    dtype = _DTYPES[args.dtype or "bf16"]
    names = args.preset or ["geglu-article", "llama3-8b", "llama3-8b-decode", "gpt2"]
    peaks = run.measure_peaks()
    console.print(f"peaks: matmul {peaks.matmul_tflops:.0f} TFLOP/s, copy {peaks.copy_gbps:.0f} GB/s")
    cases = []
    for name in names:
        preset = get_preset(name)
        for m in [args.tokens] if args.tokens else PRESET_TOKENS.get(name, (preset.tokens,)):
            p = preset if m == preset.tokens else preset.with_tokens(m)
            console.print(f"[bold]{p.name}[/bold] M={p.tokens}")
            cases.append(run.run_case(p, dtype, variants, peaks, train=args.train))
            console.print(report.case_table(cases[-1]))
    record = {"env": run.environment(), "peaks": vars(peaks), "cases": cases, "tuned": run.tuned_configs()}
    for key, cfg in record["tuned"].items():
        console.print(f"autotuned {key}: {cfg}")
    path = run.save(record, Path(args.out))
    report.write_markdown(record, path.with_suffix(".md"))
    report.plot(record, path.with_suffix(".png"))
    console.print(f"wrote {path} (+ .md, .png)")
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
    bench = sub.add_parser("bench", help="side-by-side speed, memory and accuracy on the GPU")
    bench.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable")
    bench.add_argument("--tokens", type=int)
    bench.add_argument("--dtype", choices=sorted(_DTYPES))
    bench.add_argument("--variants", help="comma-separated, from: " + ", ".join(_BENCH_VARIANTS))
    bench.add_argument("--train", action="store_true", help="also time forward+backward and peak memory")
    bench.add_argument("--out", default="benchmarks/results")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, Console())


if __name__ == "__main__":
    sys.exit(main())
