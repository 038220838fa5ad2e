"""Where the training step's time goes: each piece of fusedmlp's forward and backward, alone.

Run on the GPU: PYTHONPATH=src python3 benchmarks/backward_parts.py
For each gated preset: the forward GEMM with and without storing gate|up; the backward's dh
step done two ways (the GEMM with the activation derivative in its epilogue, or cuBLAS dh then
the pointwise kernel); the three cuBLAS gradient GEMMs; and whole fwd+bwd steps of eager and
fused, timed both through the host (do_bench) and replayed from a CUDA graph (GPU time alone).
"""

import torch
import triton.testing

from fusedmlp.bench.presets import get_preset
from fusedmlp.kernels import gated_act, gemm_act, gemm_act_bwd


def t(fn):
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def t_graph(fn):
    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
    except Exception:  # a step that cannot be captured
        return float("nan")


def parts(name):
    p = get_preset(name)
    M, D, H, act = p.tokens, p.hidden, p.intermediate, p.activation
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(M, D, **bf)
    w_in = torch.randn(2 * H, D, **bf) / D**0.5
    w_out = torch.randn(D, H, **bf) / H**0.5
    dy = torch.randn(M, D, **bf)
    h, pre = gemm_act.gemm_act(x, w_in, None, act, True, store_preact=True)
    rows = {
        "fwd GEMM+act (h only)": t(lambda: gemm_act.gemm_act(x, w_in, None, act, True)),
        "fwd GEMM+act (h and gate|up)": t(
            lambda: gemm_act.gemm_act(x, w_in, None, act, True, store_preact=True)
        ),
        "fwd down GEMM (cuBLAS)": t(lambda: h @ w_out.t()),
        "bwd dh GEMM+act' epilogue (Triton)": t(
            lambda: gemm_act_bwd.gemm_act_backward(dy, w_out, pre, act, True)
        ),
    }

    def split():
        dh = dy @ w_out
        dpre = torch.empty_like(pre)
        hh = torch.empty_like(dh)
        gated_act.act_backward(dh, pre[:, :H], pre[:, H:], act, dpre[:, :H], dpre[:, H:], hh)

    rows["bwd dh cuBLAS + pointwise act'"] = t(split)
    rows["bwd dW_out = dy^T h (cuBLAS)"] = t(lambda: dy.t() @ h)
    rows["bwd dx = dpre W_in (cuBLAS)"] = t(lambda: pre @ w_in)
    rows["bwd dW_in = dpre^T x (cuBLAS)"] = t(lambda: pre.t() @ x)
    eager = p.eager("cuda", torch.bfloat16)
    fused = p.fused(eager)
    xg = x.clone().requires_grad_()

    def step(m):
        def run():
            for q in (*m.parameters(), xg):
                q.grad = None
            m(xg).backward(dy)
        return run

    for label, m in (("eager", eager), ("fusedmlp", fused)):
        rows[f"step {label} fwd+bwd (do_bench)"] = t(step(m))
        rows[f"step {label} fwd+bwd (CUDA graph)"] = t_graph(step(m))
    print(f"\n== {name}: M={M} D={D} H={H} {act.value}")
    for k, v in rows.items():
        print(f"  {v:9.1f} us  {k}")


if __name__ == "__main__":
    for preset in ("geglu-article", "llama3-8b"):
        parts(preset)
