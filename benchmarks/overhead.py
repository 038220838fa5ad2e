"""CPU cost per call of each layer of the fused forward (does the CPU keep up with the GPU?).

Run on the GPU: PYTHONPATH=src python3 benchmarks/overhead.py
Each layer is called N times back to back with one synchronize at the end: when the per-call
CPU time exceeds the GPU time, the forward is launch-bound and do_bench measures the CPU.
"""

import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fusedmlp import FusedGatedMLP, functional, ops
from fusedmlp.activations import Activation
from fusedmlp.kernels import gemm_act as g
from fusedmlp.reference import GatedMLP


def cpu_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return cpu


def run(M):
    if True:  # one shape
        eager = GatedMLP(
            4096 if M == 1 else 768, 14336 if M == 1 else 3072, "silu", device="cuda", dtype=torch.bfloat16
        )
        fused = FusedGatedMLP.from_module(eager)
        x = torch.randn(M, fused.hidden_size, device="cuda", dtype=torch.bfloat16)
        w, wo = fused.in_weight, fused.out_weight
        cfg = g._prune(g._PREFILL + g._DECODE, {"M_BUCKET": g.m_bucket(M), "h_ptr": x}, GATED=True)[0]
        cases = {
            "F.linear (cuBLAS) alone": lambda: F.linear(x, w),
            "gemm_act, fixed config": lambda: g.gemm_act(x, w, None, Activation.SILU, True, config=cfg),
            "gemm_act, autotuned": lambda: g.gemm_act(x, w, None, Activation.SILU, True),
            "ops.mlp": lambda: ops.mlp(x, w, None, wo, None, "silu", True, False),
            "functional.gated_mlp": lambda: functional.gated_mlp(x, w, None, wo, None, "silu"),
            "FusedGatedMLP forward": lambda: fused(x),
            "eager GatedMLP forward": lambda: eager(x),
        }
        print(f"\n== M={M}")
        with torch.no_grad():
            for name, fn in cases.items():
                gpu = triton.testing.do_bench(fn, return_mode="median") * 1e3
                print(f"  {name:28s} CPU {cpu_us(fn):7.1f} us/call   do_bench {gpu:7.1f} us")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    fused(x)
            table = prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60
            )
            print(table)


def main():
    torch.manual_seed(0)
    for M in (1, 8192):
        run(M)


if __name__ == "__main__":
    main()
