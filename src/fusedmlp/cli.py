"""The ``fusedmlp`` command line: profile (the main job), bench, report."""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console

from .cases.presets import PRESETS
from .cases.variants import ALL_VARIANTS, BENCH_VARIANTS, PROFILE_VARIANTS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _profile(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import profile_command  # imports matplotlib: only when profiling

    return profile_command(args, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import report_command

    return report_command(args, console)


def _bench(args: argparse.Namespace, console: Console) -> int:
    """The side-by-side benchmark on one or more presets; JSON, a markdown table and a plot."""
    from pathlib import Path

    from .bench import report, run
    from .cases.presets import PRESET_TOKENS, get_preset
    from .cases.timing import measure_peaks

    if not torch.cuda.is_available():
        console.print("[red]fusedmlp bench needs a CUDA GPU[/red] (use `fusedmlp profile` on a CPU)")
        return 2
    if args.hf_config:
        return _bench_e2e(args, console)
    variants = tuple(args.variants.split(",")) if args.variants else BENCH_VARIANTS
    dtype = _DTYPES[args.dtype or "bf16"]
    names = args.preset or ["geglu-article", "llama3-8b", "llama3-8b-decode", "gpt2"]
    peaks = measure_peaks("cuda")
    assert peaks is not None
    console.print(f"peaks: matmul {peaks['tflops']:.0f} TFLOP/s, copy {peaks['gbps']:.0f} GB/s")
    record: dict = {"env": run.environment(), "peaks": peaks, "cases": []}
    for name in names:
        preset = get_preset(name)
        for m in args.tokens or PRESET_TOKENS.get(name, (preset.tokens,)):
            p = preset if m == preset.tokens else preset.with_tokens(m)
            console.print(f"[bold]{p.name}[/bold] M={p.tokens}")
            record["cases"].append(run.run_case(p, dtype, variants, peaks, train=args.train))
            console.print(report.case_table(record["cases"][-1]))
            record["tuned"] = run.tuned_configs()
            path = run.save(record, Path(args.out))  # after every case: a timeout keeps what finished
    for key, cfg in record.get("tuned", {}).items():
        console.print(f"autotuned {key}: {cfg}")
    report.write_markdown(record, path.with_suffix(".md"))
    report.plot(record, path.with_suffix(".png"))
    console.print(f"wrote {path} (+ .md, .png)")
    return 0


def _bench_e2e(args: argparse.Namespace, console: Console) -> int:
    """Whole Hugging Face models (bench/e2e.py), one record for all of them."""
    import dataclasses
    import json
    from pathlib import Path

    from .bench import e2e, run

    variants = tuple(args.variants.split(",")) if args.variants else e2e.VARIANTS
    record: dict = {"env": run.environment(), "models": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e-{record['env']['date'].replace(':', '').replace('-', '')[:13]}.json"
    for name in args.hf_config:
        spec = e2e.MODELS.get(name) or e2e.Model(name, {}, args.batch or 8, args.seq or 512)
        spec = dataclasses.replace(spec, batch=args.batch or spec.batch, seq=args.seq or spec.seq)
        e2e.MODELS[name] = spec
        console.print(f"[bold]{name}[/bold] batch {spec.batch} seq {spec.seq}")
        record["models"].append(e2e.run_model(name, variants, args.train))
        console.print_json(json.dumps(record["models"][-1]["variants"]))
        path.write_text(json.dumps(record, indent=1))  # after every model: a timeout keeps what finished
    console.print(f"wrote {path}")
    return 0


def _token_list(text: str) -> list[int]:
    """--tokens for bench: one positive int or a comma-separated list of them."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _fuse_hf(args: argparse.Namespace, console: Console) -> int:
    """Build a Hugging Face model from a config, fuse it, show the report and the forward times."""
    from .cases import hf_models
    from .cases.timing import median_us
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
        default=",".join(PROFILE_VARIANTS),
        help="comma-separated, from: " + ", ".join(ALL_VARIANTS),
    )
    prof.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    prof.add_argument("--device", help="default: cuda when available")
    prof.add_argument("--out", default="fusedmlp-out", help="output folder (default: fusedmlp-out)")
    prof.set_defaults(func=_profile)
    bench = sub.add_parser("bench", help="side-by-side speed, memory and accuracy on the GPU")
    bench.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable")
    bench.add_argument(
        "--tokens", type=_token_list, help="M, or several: 1,16,256 (default: the preset's)"
    )
    bench.add_argument("--dtype", choices=sorted(_DTYPES))
    bench.add_argument("--variants", help="comma-separated, from: " + ", ".join(ALL_VARIANTS))
    bench.add_argument("--train", action="store_true", help="also time forward+backward and peak memory")
    bench.add_argument(
        "--hf-config",
        action="append",
        metavar="MODEL",
        help="end to end: a Hugging Face model from its config (gpt2, bert-base, qwen2-0.5b-like, "
        "llama3-8b-2layers, or a model type with its default sizes); repeatable",
    )
    bench.add_argument("--batch", type=int, help="end to end: batch size (default: the model's)")
    bench.add_argument("--seq", type=int, help="end to end: sequence length (default: the model's)")
    bench.add_argument("--out", default="benchmarks/results")
    bench.set_defaults(func=_bench)
    rep = sub.add_parser(
        "report", help="the profile analysis from saved Chrome traces (plain or .gz), no GPU"
    )
    rep.add_argument("paths", nargs="+", metavar="PATH", help="trace files, or folders holding them")
    rep.add_argument("--out", default="fusedmlp-out", help="output folder (default: fusedmlp-out)")
    rep.set_defaults(func=_report)
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
