"""Capture the real GPU traces that the profiler tests read, into tests/fixtures/traces/.

Run on a machine with a CUDA GPU, from the repository root:

    PYTHONPATH=src python3 benchmarks/capture_traces.py            # or: pip install -e . first

It writes (gzipped Chrome traces of the 3 active profiler steps only, each checked < 1 MB):

    geglu_eager.json.gz      the article's eager GeGLU MLP, M=8192, 768 -> 3072, bf16: 5 kernels/forward
    geglu_compile.json.gz    its torch.compile twin: 4 (gelu*mul fused by Inductor)
    geglu_fusedmlp.json.gz   fusedmlp.FusedGatedMLP: 2 (gate|up GEMM with act*mul epilogue, down GEMM)
    geglu_liger.json.gz      Liger's LigerGEGLUMLP: 4 (only when liger_kernel is installed)
    linear_bias.json.gz      one nn.Linear with bias, M=8192, 768 -> 3072: 1 GEMM, bias in its epilogue

Each trace carries the preset, dtype, GPU, versions and the peaks measured at the start under
its top-level "fusedmlp" key. The analysis of each is printed, and the exit status is 1 when a
kernel count differs from the guess, so a surprise is seen before the files are committed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from fusedmlp.cases.presets import PRESETS
from fusedmlp.cases.timing import measure_peaks
from fusedmlp.profiler import analyze, show
from fusedmlp.profiler.run import build_variants, profile_variant, run_metadata
from fusedmlp.profiler.trace import load

MAX_BYTES = 1_000_000

# (file stem, preset, variant)
CASES = (
    ("geglu_eager", "geglu-article", "eager"),
    ("geglu_compile", "geglu-article", "compile"),
    ("geglu_fusedmlp", "geglu-article", "fusedmlp"),
    ("geglu_liger", "geglu-article", "liger"),
    ("linear_bias", "linear-bias", "eager"),
)


def compact(path: Path) -> None:
    """Keep complete events ("X") and process/thread names ("M"): the flow arrows and counters
    that Kineto adds are not read by the analysis and would only add bytes."""
    data = json.loads(gzip.decompress(path.read_bytes()))
    data["traceEvents"] = [e for e in data["traceEvents"] if e.get("ph") in ("X", "M")]
    path.write_bytes(gzip.compress(json.dumps(data, separators=(",", ":")).encode(), 9, mtime=0))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/traces"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, not fixtures")
    parser.add_argument("--tokens", type=int, help="replace the presets' M (smoke tests only)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: capture_traces.py needs a CUDA GPU (the fixtures are real GPU traces)", file=sys.stderr)
        return 2
    if device.type != "cuda":
        dtype = torch.float32
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    peaks = measure_peaks(device)
    if peaks is not None:
        gpu = torch.cuda.get_device_name()
        console.print(f"peaks on {gpu}: {peaks['tflops']:.0f} TFLOP/s, {peaks['gbps']:.0f} GB/s")
    ok = True
    for stem, preset_name, variant_name in CASES:
        preset = PRESETS[preset_name]
        if args.tokens:
            preset = preset.with_tokens(args.tokens)
        torch.manual_seed(0)
        (variant,) = build_variants(preset, [variant_name], device, dtype)
        if variant.module is None:
            console.print(f"{stem}: {variant.note}")
            continue
        path = args.out / f"{stem}.json.gz"
        meta = run_metadata(preset, device, dtype, peaks)  # what `fusedmlp profile` writes
        profile_variant(variant, preset.input(device, dtype), device, path, meta)
        compact(path)
        size = path.stat().st_size
        summary = analyze.analyze(load(path))
        show.details(summary, peaks, console)
        status = "as guessed" if summary.expected is not None and not summary.expected_notes else "MISMATCH"
        console.print(
            f"{path}: {size / 1e3:.0f} kB, {summary.kernels_per_forward} kernels per forward, {status}"
        )
        if size > MAX_BYTES:
            console.print(f"[red]{path} is over {MAX_BYTES} bytes[/red]")
            ok = False
        ok = ok and status == "as guessed"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
