"""Narrow MLP benchmark: eager nn.Sequential vs torch.compile vs FusedSequentialMLP (issue 7).

Default case (../shared/anchors/README.md): batch 2^20, 32 -> 64 x8 -> 16, ReLU, bf16, forward
(inference, no grad) and forward+backward (every weight, bias and the input get gradients).
Also: a (BLOCK_M, num_warps[, programs/SM]) sweep of the two kernels, the numerics contract on
a row subset, peak memory of a training step, and a 1 GiB device copy for the bandwidth floor.

    PYTHONPATH=src python3 benchmarks/narrow_mlp_bench.py --out DIR   # writes DIR/narrow_mlp_<time>.json

On a CPU (TRITON_INTERPRET=1, small --rows) it runs the same code paths as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import itertools
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fusedmlp
from fusedmlp import FusedSequentialMLP, functional
from fusedmlp.activations import Activation
from fusedmlp.cases.timing import median_us
from fusedmlp.kernels import narrow_mlp as kernels
from fusedmlp.numerics import check_contract

TARGET_FWD_SPEEDUP = 8.0  # issue 7, vs both eager and torch.compile
TARGET_FWD_BWD_SPEEDUP = 4.0
# (BLOCK_M, num_warps, programs per SM; 0 = one program per row block)
FWD_SWEEP = [(64, 4, 0), (128, 4, 0), (128, 4, 2), (128, 8, 0)]
# (BLOCK_M, num_warps, programs per SM, layers per recompute segment; None = the default)
BWD_SWEEP = [
    (128, 8, 1, None), (128, 8, 1, 2), (128, 8, 1, 9), (128, 4, 2, None),
    (64, 8, 1, None), (64, 4, 2, None), (64, 4, 2, 1), (64, 4, 2, 2), (64, 4, 3, None), (64, 4, 4, 2),
]


def make_stack(widths: list[int], device: str, dtype: torch.dtype) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(device, dtype)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One training step's forward and backward, gradients set to None first (no accumulate)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)

    return step


def _peak_mib(fn: Callable[[], None], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def contract_checks(seq: nn.Sequential, fused: nn.Module, rows: int, device: str) -> list[dict[str, Any]]:
    """The numerics contract for y, dx and every weight and bias gradient on ``rows`` fresh rows."""
    dtype = next(seq.parameters()).dtype
    ref = copy.deepcopy(seq).double()
    x = torch.randn(rows, seq[0].in_features, device=device).to(dtype)
    dy = torch.randn(rows, fused.out_features, device=device).to(dtype)
    outs = {}
    for name, m, cast in (("fused", fused, dtype), ("eager", seq, dtype), ("ref", ref, torch.float64)):
        m.zero_grad(set_to_none=True)
        xi = x.to(cast).detach().clone().requires_grad_()
        y = m(xi)
        y.backward(dy.to(cast))
        grads = {n: p.grad for n, p in m.named_parameters()}
        outs[name] = {"y": y.detach(), "dx": xi.grad, **grads}
    checks = [check_contract(k, outs["fused"][k], outs["eager"][k], outs["ref"][k]) for k in outs["eager"]]
    for c in checks:
        print("  ", c)
    return [
        {"name": c.name, "ok": c.ok, "fused_max": c.fused.max_abs, "eager_max": c.eager.max_abs,
         "fused_mean": c.fused.mean_abs, "eager_mean": c.eager.mean_abs}
        for c in checks
    ]


def sweep(fused: FusedSequentialMLP, x: torch.Tensor, dy: torch.Tensor, device: str) -> list[dict[str, Any]]:
    """Each kernel alone (no packing, no reduction) at a few launch configurations."""
    linears = fused.linears
    with torch.no_grad():
        w, b = functional.pack_narrow_mlp([m.weight for m in linears], [m.bias for m in linears])
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    acts = fused.activations
    cases = [("forward", kernels.narrow_mlp_forward, (x,), (*cfg, None)) for cfg in FWD_SWEEP]
    cases += [("backward", kernels.narrow_mlp_backward, (dy, x), cfg) for cfg in BWD_SWEEP]
    rows: list[dict[str, Any]] = []
    for kernel, launch, inputs, (bm, warps, per_sm, seg) in cases:
        row: dict[str, Any] = {"kernel": kernel, "block_m": bm, "num_warps": warps, "programs_per_sm": per_sm}
        extra = {}
        if kernel == "backward":
            extra["segment"] = row["segment"] = seg if seg is not None else kernels.default_segment(len(acts))
        try:  # a config that does not fit this GPU is a result too, not the end of the run
            fn = functools.partial(launch, *inputs, w, b, widths, acts, bm, warps, per_sm, **extra)
            row["us"] = median_us(fn, device)
            shown = f"{row['us']:9.1f} us"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            shown = row["error"][:80]
        print(f"  {kernel:8s} BLOCK_M={bm:3d} warps={warps} programs/SM={per_sm} {extra} {shown}")
        rows.append(row)
    return rows


def copy_bandwidth_gbs(device: str) -> float | None:
    if device != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device)
    return 2 * 2**30 / us / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory for the JSON result")
    p.add_argument("--rows", type=int, default=2**20)
    p.add_argument("--widths", default="32," + "64," * 8 + "16", help="D0,...,DL")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--contract-rows", type=int, default=2**16)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-sweep", action="store_true", help="skip the kernel configuration sweep")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    seq = make_stack(widths, device, dtype)
    fused = FusedSequentialMLP.from_module(seq)
    assert all(a in (Activation.RELU, Activation.IDENTITY) for a in fused.activations)
    M = args.rows
    x = torch.randn(M, widths[0], device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    dy = torch.randn(M, widths[-1], device=device, dtype=dtype)

    variants: dict[str, nn.Module] = {"eager": seq}
    if not args.no_compile:
        variants["torch.compile"] = torch.compile(copy.deepcopy(seq))
    variants["fusedmlp"] = fused

    flops = 2 * M * sum(a * b for a, b in itertools.pairwise(widths))
    io_bytes = M * (widths[0] + widths[-1]) * torch.finfo(dtype).bits // 8
    results: dict[str, dict[str, Any]] = {}
    for name, m in variants.items():
        def fwd(m: nn.Module = m) -> None:
            with torch.no_grad():
                m(x)

        step = _fwd_bwd(m, x_grad, dy)
        try:
            fwd_us = median_us(fwd, device)
            fwd_bwd_us = median_us(step, device)
        except Exception as e:
            if name == "fusedmlp":
                raise
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}  # e.g. no compiler for inductor
            print(f"{name}: failed: {results[name]['error']}")
            continue
        results[name] = {
            "fwd_us": fwd_us,
            "fwd_bwd_us": fwd_bwd_us,
            "fwd_tflops": flops / fwd_us / 1e6,
            "fwd_bwd_tflops": 3 * flops / fwd_bwd_us / 1e6,
            "fwd_io_gbs": io_bytes / fwd_us / 1e3,
            "train_step_peak_mib": _peak_mib(step, device),
        }
        m.zero_grad(set_to_none=True)
        x_grad.grad = None

    base = {k: v for k, v in results.items() if k != "fusedmlp" and "error" not in v}
    speedups = {
        f"{kind} vs {k}": results[k][f"{kind}_us"] / results["fusedmlp"][f"{kind}_us"]
        for k in base
        for kind in ("fwd", "fwd_bwd")
    }
    met = {
        "fwd >= 8x": all(v >= TARGET_FWD_SPEEDUP for k, v in speedups.items() if k.startswith("fwd vs")),
        "fwd_bwd >= 4x": all(
            v >= TARGET_FWD_BWD_SPEEDUP for k, v in speedups.items() if k.startswith("fwd_bwd vs")
        ),
    }

    print(f"\nnarrow MLP {'->'.join(map(str, widths))}, ReLU, {args.dtype}, M={M}, on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}")
    print(f"{'variant':15s} {'fwd us':>10s} {'fwd+bwd us':>11s} {'fwd TFLOP/s':>12s} "
          f"{'fwd IO GB/s':>12s} {'train peak MiB':>15s}")
    for name, r in results.items():
        if "error" in r:
            continue
        peak = "-" if r["train_step_peak_mib"] is None else f"{r['train_step_peak_mib']:.1f}"
        print(f"{name:15s} {r['fwd_us']:10.1f} {r['fwd_bwd_us']:11.1f} {r['fwd_tflops']:12.1f} "
              f"{r['fwd_io_gbs']:12.1f} {peak:>15s}")
    for k, v in speedups.items():
        print(f"  speed-up {k}: {v:.2f}x")
    print(f"  targets: {met}")

    print(f"\nnumerics contract on {args.contract_rows} rows:")
    contract = contract_checks(seq, fused, min(args.contract_rows, M), device)
    bw = copy_bandwidth_gbs(device)
    floor_us = None if bw is None else io_bytes / bw / 1e3
    if bw is not None:
        print(f"\n1 GiB copy: {bw:.0f} GB/s -> IO floor of the forward {floor_us:.1f} us")
    sweep_rows = []
    if not args.no_sweep:
        print("\nkernel sweep (each kernel alone):")
        sweep_rows = sweep(fused, x, dy, device)

    record = {
        "case": {"widths": widths, "activation": "relu", "dtype": args.dtype, "rows": M},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "fusedmlp": fusedmlp.__version__,
        "commit": _git_commit(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "flops_fwd": flops,
        "io_bytes_fwd": io_bytes,
        "copy_gbs": bw,
        "io_floor_us": floor_us,
        "results": results,
        "speedups": speedups,
        "targets_met": met,
        "contract": contract,
        "contract_ok": all(c["ok"] for c in contract),
        "sweep": sweep_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"narrow_mlp_{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
    return 0 if record["contract_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
