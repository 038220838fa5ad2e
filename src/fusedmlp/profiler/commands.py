"""The ``profile`` and ``report`` commands: run or read traces, analyse, write the outputs.

Outputs in the --out folder: ``traces/`` (profile only: one Chrome trace per variant, for
Perfetto), ``summary.json`` (strict JSON: no NaN) and ``report.html``, both built in memory and
then written together (a failure writes neither); rich tables in the terminal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from ..cases import moe
from ..cases.moe import MOE_PROFILE_VARIANTS
from ..cases.timing import measure_peaks
from ..cases.variants import PROFILE_VARIANTS, Variant
from ..kernels import INTERPRETING
from ..numerics import ContractCheck, check_contract
from . import analyze, html, show
from .analyze import VariantSummary
from .run import (
    ProfileError,
    build_variants,
    check_numerics,
    hf_variants,
    resolve_preset,
    run,
)
from .trace import TraceError, clean_text, load, strict_json, write_atomic

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_outputs(
    summaries: list[VariantSummary],
    metas: list[dict[str, Any]],
    out: Path,
    console: Console,
    skipped: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Tables, summary.json and report.html for analysed traces (``metas``: their metadata)."""
    skipped = skipped or {}
    # The article's order (eager, compile, liger, fusedmlp), whatever order the files came in.
    order = {v: i for i, v in enumerate(PROFILE_VARIANTS)}
    summaries = sorted(summaries, key=lambda s: order.get(s.variant, len(order)))
    analyze.unique_names(summaries)
    # Device, dtype, versions, peaks and preset: from the first trace that has our metadata.
    meta = next((m for m in metas if m), {})
    keys = ("device", "dtype", "element_size", "torch", "triton", "fusedmlp")
    info = {k: meta[k] for k in keys if k in meta}
    info["notes"] = {
        m["variant"]: m["note"] for m in metas if isinstance(m.get("note"), str) and m.get("variant")
    }
    preset = analyze.preset_from_dict(meta["preset"]) if isinstance(meta.get("preset"), dict) else None
    peaks = meta.get("peaks")
    summary = analyze.summary_json(summaries, preset, peaks, {**info, "skipped": skipped})
    text, page = strict_json(summary, indent=1), html.render(summary, summaries)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic({out / "report.html": page, out / "summary.json": text})  # summary.json last
    show.overview(summaries, skipped, console)
    for s in summaries:
        show.details(s, peaks, console)
    console.print(f"wrote {out / 'summary.json'} and {out / 'report.html'}")
    return summary


def moe_numerics(case: moe.MoEPreset, variants: list[Variant], x: torch.Tensor) -> list[ContractCheck]:
    """Each variant but the floor and hf against Hugging Face's output and a float64 reference."""
    by_name = {v.name: v.module for v in variants if v.module is not None}
    if "fusedmlp" not in by_name:
        return []
    want = moe.reference(case, x, "balanced")
    with torch.no_grad():
        base = (by_name.get("hf") or moe.build(case, ["hf"], x.device, x.dtype)[0][0].module)(x)
        return [
            check_contract(f"{name} output", m(x), base, want)
            for name, m in by_name.items()
            if name not in ("floor", "hf")
        ]


def profile_command(args: argparse.Namespace, console: Console) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda, but torch sees no CUDA device")
    dtype = (
        _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    moe_preset = getattr(args, "moe", None)
    default = MOE_PROFILE_VARIANTS if moe_preset else PROFILE_VARIANTS
    names = [n.strip() for n in (args.variants or ",".join(default)).split(",") if n.strip()]
    out = Path(args.out)
    eager: nn.Module | None = None  # the weights every variant shares; None for --hf-config
    try:
        inputs: Any
        if args.hf_config:
            preset = None
            variants, inputs = hf_variants(args.hf_config, names, device, dtype, args.tokens or 512)
        elif moe_preset:
            preset = None
            moe_case = moe.get_moe_preset(moe_preset)
            moe_case = moe_case.with_tokens(args.tokens) if args.tokens else moe_case
            c = moe_case
            console.print(
                f"[bold]{c.name}[/bold]: {c.description} (M={c.tokens}, {c.hidden} -> {c.experts} experts "
                f"x {c.expert_width}, top-{c.top_k}, balanced routing); {dtype}, {device}"
            )
            variants, inputs = moe.build(moe_case, names, device, dtype, "balanced")
        else:
            preset = resolve_preset(
                args.preset,
                args.tokens,
                args.hidden,
                args.intermediate,
                args.activation,
                args.gated,
                args.bias,
            )
            torch.manual_seed(0)
            eager = preset.eager(device, dtype).eval()
            variants = build_variants(preset, names, device, dtype, eager)
            inputs = preset.input(device, dtype)
    except ValueError as e:  # a bad preset, variant or activation: the user's to fix (status 2)
        raise ProfileError(clean_text(" ".join(str(e).split()), 2000)) from e
    if preset is not None:
        console.print(
            f"[bold]{preset.name}[/bold]: {preset.description} (M={preset.tokens}, {preset.hidden} -> "
            f"{preset.intermediate}, {preset.activation.value}); {dtype}, {device}"
        )
    summaries: list[VariantSummary] = []
    skipped: dict[str, str] = {}
    metas: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("measuring peaks", total=len(variants) + 1)
        peaks = measure_peaks(device)
        progress.advance(task)
        progress.update(task, description=f"warming up and profiling {variants[0].name}" if variants else "")
        runs = run(preset, variants, inputs, device, dtype, out / "traces", peaks)
        for i, (variant, path) in enumerate(runs):
            progress.advance(task)
            if i + 1 < len(variants):
                progress.update(task, description=f"warming up and profiling {variants[i + 1].name}")
            if path is None:
                skipped[variant.name] = variant.note
                continue
            trace = load(path)
            metas.append(trace.metadata)
            summaries.append(analyze.analyze(trace))
    write_outputs(summaries, metas, out, console, skipped)
    if device.type == "cpu" and "fusedmlp" in names and not INTERPRETING:
        console.print(
            "note: on a CPU, fusedmlp runs its eager reference path (the Triton kernels need a CUDA "
            "GPU, or TRITON_INTERPRET=1 to run them slowly on the CPU), so its kernels differ from "
            "the guess, which describes the GPU."
        )
    if moe_preset:
        checks = moe_numerics(moe_case, variants, inputs)
    elif preset is None or eager is None:
        return 0
    else:
        checks = check_numerics(preset, eager, variants, inputs)
    for check in checks:
        console.print(f"numerics: {check}", highlight=False)
    return 0 if all(c.ok for c in checks) else 1


def report_command(args: argparse.Namespace, console: Console) -> int:
    """The same analysis from saved traces: files, or folders searched for *.json and *.json.gz."""
    paths: list[Path] = []
    try:
        for p in map(Path, args.paths):
            if p.is_dir():
                found = sorted([*p.rglob("*.json"), *p.rglob("*.json.gz")])
                paths += [f for f in found if f.name != "summary.json"]
            else:
                paths.append(p)
        if not paths:
            raise TraceError(f"no trace files in {', '.join(args.paths)}")
        traces = [load(p) for p in paths]
    except OSError as e:
        raise TraceError(clean_text(f"{e.filename}: {e.strerror}")) from e
    summaries = [analyze.analyze(t) for t in traces]
    write_outputs(summaries, [t.metadata for t in traces], Path(args.out), console)
    return 0
