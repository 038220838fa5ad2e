"""The ``fusedmlp`` command line: profile (the main job), bench, report, fuse.

A failure ends in one line on stderr, ``fusedmlp: error: ...``, and a non-zero exit status: 2 for
a bad flag or input (argparse's convention), 1 for a failure while running; ``--debug`` (or
FUSEDMLP_DEBUG=1) shows the traceback instead. Flags are checked as they are parsed (``type=``
functions below) and ``--out`` before any work, so a typo does not cost a profiling run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch
from rich.console import Console

from .cases.moe import MOE_PRESETS, MOE_PROFILE_VARIANTS, MOE_VARIANTS, ROUTINGS
from .cases.presets import PRESETS
from .cases.variants import ALL_VARIANTS, BENCH_VARIANTS, PROFILE_VARIANTS
from .profiler.run import ProfileError
from .profiler.trace import TraceError, clean_text

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SIZE = 2**31 - 1  # tokens, widths, batch, sequence: what int32 indexing holds


class CLIError(Exception):
    """A problem the user can fix, said in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block), as every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message, 2000)} (see {self.prog} --help)\n")


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), cut."""
    return clean_text(" ".join(text.split()), limit)


def _shown(text: str, limit: int = 60) -> str:
    return repr(one_line(text, limit))


def _positive_int(text: str) -> int:
    """A flag's value: an integer from 1 to MAX_SIZE."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer up to {MAX_SIZE:,}, got {_shown(text)}"
        )
    return value


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:N, and only a device torch can run on here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown device {_shown(text)}: expected cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{_shown(text)}: torch sees {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{_shown(text)}: fusedmlp runs on cpu or cuda, not {device.type}")
    return text


def _names(text: str) -> str:
    """--variants: one or more comma-separated names (which ones exist is checked by the command)."""
    if not [n for n in text.split(",") if n.strip()]:
        raise argparse.ArgumentTypeError(f"expected variant names separated by commas, got {_shown(text)}")
    return text


def _out_dir(text: str) -> str:
    """--out: a folder, existing or to be made; ``_prepare_out`` tries it before any work."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a usable path: {_shown(text, 500)}")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{clean_text(text, 500)} exists and is not a folder")
    return text


def _prepare_out(text: str) -> Path:
    """Make the --out folder and write (then remove) a file in it, or fail in one line now."""
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(
            f"--out {clean_text(text, 500)}: cannot create the folder: {e.strerror or e}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise CLIError(
            f"--out {clean_text(text, 500)}: cannot write in the folder: {e.strerror or e}"
        ) from None
    return out


def _unused_flags(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """A flag that would be ignored is an error, not a silent no-op."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


def _profile(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import profile_command  # imports matplotlib: only when profiling

    shape = ("hidden", "intermediate", "activation", "gated", "bias")
    if args.hf_config:
        _unused_flags(args, shape, "to --hf-config (the model's config sets its sizes)")
    if args.moe:
        _unused_flags(args, shape, "to --moe (the MoE preset sets its sizes; --tokens does apply)")
    _prepare_out(args.out)
    return profile_command(args, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from .profiler.commands import report_command

    _prepare_out(args.out)
    return report_command(args, console)


def _bench(args: argparse.Namespace, console: Console) -> int:
    """The side-by-side benchmark on one or more presets; JSON, a markdown table and a plot."""
    from .bench import report, run
    from .cases.presets import PRESET_TOKENS, get_preset
    from .cases.timing import measure_peaks

    if args.moe and (args.preset or args.hf_config):
        raise CLIError("--moe cannot be combined with --preset or --hf-config: run them separately")
    if not args.hf_config:
        _unused_flags(args, ("batch", "seq"), "without --hf-config (they size end-to-end model runs)")
    if not torch.cuda.is_available():
        raise CLIError("fusedmlp bench needs a CUDA GPU (use `fusedmlp profile` on a CPU)")
    _prepare_out(args.out)
    if args.hf_config:
        return _bench_e2e(args, console)
    if args.moe:
        return _bench_moe(args, console)
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


def _bench_moe(args: argparse.Namespace, console: Console) -> int:
    """MoE layers (bench/moe.py): every preset under both routings, one record for all."""
    from .bench import moe, report, run
    from .cases.moe import get_moe_preset
    from .cases.timing import measure_peaks

    names = tuple(args.variants.split(",")) if args.variants else MOE_VARIANTS
    unknown = [n for n in names if n not in MOE_VARIANTS]
    if unknown:
        raise CLIError(f"unknown MoE variant(s) {', '.join(unknown)}; choose from {', '.join(MOE_VARIANTS)}")
    dtype = _DTYPES[args.dtype or "bf16"]
    peaks = measure_peaks("cuda")
    record: dict = {"env": run.environment(), "peaks": peaks, "baseline": "hf", "cases": []}
    for name in args.moe:
        preset = get_moe_preset(name)
        for m in args.tokens or (preset.tokens,):
            p = preset.with_tokens(m)
            for kind in ROUTINGS:
                console.print(f"[bold]{p.name}[/bold] M={p.tokens}, {kind} routing")
                record["cases"].append(moe.run_case(p, kind, dtype, names, peaks, train=args.train))
                console.print(report.case_table(record["cases"][-1]))
                path = run.save(record, Path(args.out), prefix="moe-bench")  # a timeout keeps what finished
    report.write_markdown(record, path.with_suffix(".md"))
    report.plot(record, path.with_suffix(".png"))
    console.print(f"wrote {path} (+ .md, .png)")
    return 0


def _bench_e2e(args: argparse.Namespace, console: Console) -> int:
    """Whole Hugging Face models (bench/e2e.py), one record for all of them."""
    import dataclasses
    import json

    from .bench import e2e, run
    from .profiler.trace import strict_json, write_atomic

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
        # after every model: a timeout keeps what finished
        write_atomic({path: strict_json(record, indent=1)})
    console.print(f"wrote {path}")
    return 0


def _token_list(text: str) -> list[int]:
    """--tokens for bench: one positive int or a comma-separated list of them."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas: {_shown(text)}") from None
    if not values or min(values) <= 0 or max(values) > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected positive integers up to {MAX_SIZE:,}, got {_shown(text)}")
    return values


def _fuse_hf(args: argparse.Namespace, console: Console) -> int:
    """Build a Hugging Face model from a config, fuse it, show the report and the forward times."""
    from .cases import hf_models
    from .cases.timing import median_us
    from .fuse import fuse

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    name = clean_text(args.hf_config, 500)
    try:
        overrides = hf_models.parse_overrides(args.set)
        config = hf_models.hf_config(args.hf_config, overrides)
    except Exception as e:
        if isinstance(e, ImportError) or (isinstance(e, ValueError) and not os.path.exists(args.hf_config)):
            # no transformers, a bad --set, a name that is no model type: the user's to fix
            raise CLIError(one_line(str(e))) from e
        # a config.json that is not JSON, names no model type, or cannot be read
        raise CLIError(f"--hf-config {name}: cannot read the model config: {one_line(str(e))}") from e
    try:  # a config that loads can still name an unknown activation or impossible sizes
        model = hf_models.build_model(config, device, dtype)
        inputs = hf_models.example_inputs(model, tokens=args.tokens)
        with torch.no_grad():
            model(**inputs)
    except Exception as e:
        raise CLIError(
            f"--hf-config {name}: cannot build or run the model: {type(e).__name__}: {one_line(str(e))}"
        ) from e
    with torch.no_grad():
        before = median_us(lambda: model(**inputs), device)
        report = fuse(model)
        after = median_us(lambda: model(**inputs), device)
    console.print(report)
    console.print(
        f"{type(model).__name__} forward ({dtype}, {device}, {args.tokens} tokens): "
        f"{before:.1f} us before, {after:.1f} us after fuse ({before / max(after, 1e-9):.2f}x)"
    )
    if not on_gpu:
        console.print("(on a CPU the fused ops run Triton's interpreter or the reference: no speed to see)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fusedmlp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
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
    shape.add_argument(
        "--moe",
        choices=sorted(MOE_PRESETS),
        help="a mixture-of-experts layer (Hugging Face experts, fixed routing)",
    )
    prof.add_argument("--tokens", type=_positive_int, help="number of tokens (M); replaces the preset's")
    prof.add_argument("--hidden", type=_positive_int, help="model width D; replaces the preset's")
    prof.add_argument("--intermediate", type=_positive_int, help="MLP width H; replaces the preset's")
    prof.add_argument("--activation", help="activation name (silu, gelu, gelu_tanh, relu, ...)")
    prof.add_argument("--gated", action=argparse.BooleanOptionalAction, help="gated (GLU) MLP or plain")
    prof.add_argument("--bias", action=argparse.BooleanOptionalAction, help="Linear layers with bias")
    prof.add_argument(
        "--variants",
        type=_names,
        help=f"comma-separated (default {','.join(PROFILE_VARIANTS)}; with --moe "
        f"{','.join(MOE_PROFILE_VARIANTS)}), from: {', '.join(ALL_VARIANTS)}; "
        f"with --moe: {', '.join(MOE_VARIANTS)}",
    )
    prof.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    prof.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)")
    prof.add_argument(
        "--out", type=_out_dir, default="fusedmlp-out", help="output folder (default: fusedmlp-out)"
    )
    prof.set_defaults(func=_profile)
    bench = sub.add_parser("bench", help="side-by-side speed, memory and accuracy on the GPU")
    bench.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable")
    bench.add_argument(
        "--moe",
        action="append",
        choices=sorted(MOE_PRESETS),
        help="a mixture-of-experts layer, balanced and skewed routing; repeatable (variants: "
        + ", ".join(MOE_VARIANTS)
        + ")",
    )
    bench.add_argument("--tokens", type=_token_list, help="M, or several: 1,16,256 (default: the preset's)")
    bench.add_argument("--dtype", choices=sorted(_DTYPES))
    bench.add_argument("--variants", type=_names, help="comma-separated, from: " + ", ".join(ALL_VARIANTS))
    bench.add_argument("--train", action="store_true", help="also time forward+backward and peak memory")
    bench.add_argument(
        "--hf-config",
        action="append",
        metavar="MODEL",
        help="end to end: a Hugging Face model from its config (gpt2, bert-base, qwen2-0.5b-like, "
        "llama3-8b-2layers, or a model type with its default sizes); repeatable",
    )
    bench.add_argument("--batch", type=_positive_int, help="end to end: batch size (default: the model's)")
    bench.add_argument("--seq", type=_positive_int, help="end to end: sequence length (default: the model's)")
    bench.add_argument("--out", type=_out_dir, default="benchmarks/results")
    bench.set_defaults(func=_bench)
    rep = sub.add_parser(
        "report", help="the profile analysis from saved Chrome traces (plain or .gz), no GPU"
    )
    rep.add_argument("paths", nargs="+", metavar="PATH", help="trace files, or folders holding them")
    rep.add_argument(
        "--out", type=_out_dir, default="fusedmlp-out", help="output folder (default: fusedmlp-out)"
    )
    rep.set_defaults(func=_report)
    fz = sub.add_parser("fuse", help="fuse a Hugging Face model built from a config; report and time it")
    fz.add_argument("--hf-config", required=True, help="a local config path, or a model type (tiny sizes)")
    fz.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    fz.add_argument("--tokens", type=_positive_int, default=64, help="sequence length of the timed forward")
    fz.add_argument("--dtype", choices=sorted(_DTYPES))
    fz.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)")
    fz.set_defaults(func=_fuse_hf)
    return parser


def _failure(e: BaseException) -> tuple[str, int]:
    """(one line saying what went wrong, exit status) for an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, CLIError):
        return str(e), e.code
    if isinstance(e, (TraceError, ProfileError)):
        return str(e), 2
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror} ({type(e).__name__})", 1
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {one_line(text)} (--debug shows the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits here: one line, status 2
    try:
        return args.func(args, Console())
    except BrokenPipeError:  # `fusedmlp report ... | head`: the reader left; nothing to say
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no real stdout (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, KeyboardInterrupt) as e:
        if args.debug or os.environ.get("FUSEDMLP_DEBUG") == "1":
            raise
        message, code = _failure(e)
        parser.exit(code, f"fusedmlp: error: {one_line(message, 2000)}\n")


if __name__ == "__main__":
    sys.exit(main())
