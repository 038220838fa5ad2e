"""CPU cost per call of each layer of the fused forward (does the CPU keep up with the GPU?).

Run on the GPU: PYTHONPATH=src python3 benchmarks/overhead.py [--narrow-only]
Each layer is called N times back to back with one synchronize at the end: when the per-call
CPU time exceeds the GPU time, the forward is launch-bound and do_bench measures the CPU.
The narrow MLP (preset narrow-mlp: one kernel per forward) is timed the same way at a small
batch (CPU-bound) and at 2^20 rows, through each layer: the kernel's launcher, the custom op,
its autograd.Function twin, functional.narrow_mlp and the module, and a training step.
"""

import sys
import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fusedmlp import FusedGatedMLP, FusedSequentialMLP, functional, ops
from fusedmlp.activations import Activation
from fusedmlp.kernels import gemm
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


def time_cases(cases, n=200):
    """One line per case: CPU us per call (n calls back to back) and do_bench's median."""
    for name, fn in cases.items():
        gpu = triton.testing.do_bench(fn, return_mode="median") * 1e3
        print(f"  {name:34s} CPU {cpu_us(fn, n):7.1f} us/call   do_bench {gpu:7.1f} us")


def run(M):
    if True:  # one shape
        eager = GatedMLP(
            4096 if M == 1 else 768, 14336 if M == 1 else 3072, "silu", device="cuda", dtype=torch.bfloat16
        )
        fused = FusedGatedMLP.from_module(eager)
        x = torch.randn(M, fused.hidden_size, device="cuda", dtype=torch.bfloat16)
        w, wo = fused.in_weight, fused.out_weight
        cfg = g.prune_configs(g.CONFIGS, {"M_BUCKET": gemm.m_bucket(M), "h_ptr": x}, GATED=True)[0]
        cases = {
            "F.linear (cuBLAS) alone": lambda: F.linear(x, w),
            "gemm_act, fixed config": lambda: g.gemm_act(x, w, None, Activation.SILU, True, config=cfg),
            "gemm_act, autotuned": lambda: g.gemm_act(x, w, None, Activation.SILU, True),
            "ops.mlp": lambda: ops.mlp(x, w, None, wo, None, "silu", True, "activation", True),
            "functional.gated_mlp": lambda: functional.gated_mlp(x, w, None, wo, None, "silu"),
            "FusedGatedMLP forward": lambda: fused(x),
            "eager GatedMLP forward": lambda: eager(x),
        }
        print(f"\n== M={M}")
        with torch.no_grad():
            time_cases(cases)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    fused(x)
            table = prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60
            )
            print(table)


def run_narrow(M):
    from fusedmlp.cases.presets import get_preset
    from fusedmlp.kernels import narrow_mlp as k

    p = get_preset("narrow-mlp")
    eager = p.eager("cuda", torch.bfloat16)
    fused = FusedSequentialMLP.from_module(eager)
    x = torch.randn(M, p.hidden, device="cuda", dtype=torch.bfloat16)
    linears = list(fused.linears)
    weights, biases = [m.weight for m in linears], [m.bias for m in linears]
    w, b = functional.pack_narrow_mlp(weights, biases)
    w, b = w.detach(), b.detach()
    widths = functional.narrow_widths(weights, biases)
    acts = list(fused.activations)
    names = ",".join(a.value for a in acts)
    cases = {
        "kernel launcher alone": lambda: k.narrow_mlp_forward(x, w, b, widths, acts),
        "ops.narrow_mlp (custom op)": lambda: ops.narrow_mlp(x, w, b, widths, names),
        "ops.NarrowMLPFunction": lambda: ops.NarrowMLPFunction.apply(x, w, b, widths, names),
        "functional.narrow_mlp_packed": lambda: functional.narrow_mlp_packed(x, w, b, widths, names),
        "functional.narrow_mlp (packs)": lambda: functional.narrow_mlp(x, weights, biases, acts),
        "FusedSequentialMLP forward": lambda: fused(x),
        "eager nn.Sequential forward": lambda: eager(x),
    }
    print(f"\n== narrow-mlp M={M}")
    with torch.no_grad():
        time_cases(cases)
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, widths[-1], device="cuda", dtype=x.dtype)

    def step(m):
        def run_step():
            for q in (*m.parameters(), xg):
                q.grad = None
            m(xg).backward(dy)

        return run_step

    time_cases(
        {
            f"{name} fwd+bwd": step(m)
            for name, m in (("FusedSequentialMLP", fused), ("eager nn.Sequential", eager))
        },
        n=50,
    )


def main():
    torch.manual_seed(0)
    for M in (4096, 1 << 20):
        run_narrow(M)
    if "--narrow-only" in sys.argv:
        return
    for M in (1, 8192):
        run(M)


if __name__ == "__main__":
    main()
