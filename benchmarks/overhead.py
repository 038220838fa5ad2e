"""Host cost per call of each layer of the fused forward: where does a decode forward's CPU go?

Run on the GPU: PYTHONPATH=src python3 benchmarks/overhead.py [--out FILE]
Each piece is called back to back 16 times and timed before any synchronize (the host's time to
issue it; the launch queue never fills), median of 15 repeats, at the Llama-3-8B MLP's sizes at
M=1, where the GPU needs ~90 us and every microsecond of host above that shows in wall time.
Also reports whether launch plans are in use (kernels/launch.py) and a cProfile of the module.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from fusedmlp import FusedGatedMLP, functional, ops
from fusedmlp.activations import Activation
from fusedmlp.kernels import gemm_act, launch
from fusedmlp.ops import fused_mlp
from fusedmlp.options import Recompute
from fusedmlp.reference import GatedMLP


def host_us(fn, calls: int = 16, repeats: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    eager = GatedMLP(4096, 14336, "silu", device="cuda", dtype=torch.bfloat16)
    fused = FusedGatedMLP.from_module(eager).requires_grad_(False)
    eager.requires_grad_(False)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w, wo = fused.merged_in_weight(), fused.out_weight
    h = torch.empty(1, 14336, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    act, level, names = Activation.SILU, Recompute.ACTIVATION, functional.GATED_NAMES
    args_ = (x, w, w, h, h, 1, 14336, 4096, 1, 4096, 4096, 14336, 14336)
    cases = {
        "torch.empty [1, 14336]": lambda: torch.empty((1, 14336), device="cuda", dtype=torch.bfloat16),
        "F.linear (cuBLAS, down)": lambda: F.linear(h, wo),
        "torch.mm(out=) (down)": lambda: torch.mm(h, wo.t(), out=y),
        "launch.spec(13 args)": lambda: launch.spec(args_),
        "functional.check_mlp": lambda: functional.check_mlp(x, w, None, wo, None, True, names),
        "gemm_act (plan)": lambda: gemm_act.gemm_act(x, w, None, act, True),
        "fused_mlp.mlp_forward": lambda: fused_mlp.mlp_forward(x, w, None, wo, None, act, True, level, True),
        "fused_mlp.mlp_inference": lambda: fused_mlp.mlp_inference(x, w, None, wo, None, act, True),
        "functional.run_mlp": lambda: functional.run_mlp(x, w, None, wo, None, act, True, level),
        "FusedGatedMLP forward": lambda: fused(x),
        "eager GatedMLP forward (5 ops)": lambda: eager(x),
        "ops.mlp (triton_op)": lambda: ops.mlp(x, w, None, wo, None, "silu", True, "activation", True),
    }
    results = {name: host_us(fn) for name, fn in cases.items()}
    info = {
        "direct_launch": launch._DIRECT,
        "gemm_act_plans": len(gemm_act.LAUNCHER.planned._plans),
        "host_us": results,
    }
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fused(x)
    prof.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(14)
    info["cprofile_top"] = stream.getvalue()
    for name, us in results.items():
        print(f"  {name:40s} {us:7.1f} us/call (host)")
    print(f"direct launch: {info['direct_launch']}, gemm_act plans: {info['gemm_act_plans']}")
    print("\n".join(info["cprofile_top"].splitlines()[6:26]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
