"""Where the training step's time goes: each piece of fusedmlp's forward and backward, alone.

Run on the GPU: PYTHONPATH=src python3 benchmarks/backward_parts.py [--out DIR]
For each gated preset: the forward GEMM with and without storing gate|up; the backward's dh
step done two ways (the GEMM with the activation derivative in its epilogue, or cuBLAS dh then
the pointwise kernel); the three cuBLAS gradient GEMMs; the training step's GEMM floor (its six
GEMMs through cuBLAS, nothing else, replayed from one CUDA graph: what no MLP training step
built on cuBLAS-speed GEMMs can beat); and whole fwd+bwd steps of eager and fused, timed both
through the host (do_bench) and replayed from a CUDA graph (GPU time alone).
With --out, writes DIR/backward-parts-<UTC stamp>.json.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
import triton.testing

from fusedmlp.cases.presets import get_preset
from fusedmlp.kernels import gemm_act, gemm_act_bwd, pointwise


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
        pointwise.gated_act_backward(dh, pre[:, :H], pre[:, H:], act, dpre[:, :H], dpre[:, H:], hh)

    rows["bwd dh cuBLAS + pointwise act'"] = t(split)
    rows["bwd dh = dy W_out (cuBLAS)"] = t(lambda: dy @ w_out)
    rows["bwd dW_out = dy^T h (cuBLAS)"] = t(lambda: dy.t() @ h)
    rows["bwd dx = dpre W_in (cuBLAS)"] = t(lambda: pre @ w_in)
    rows["bwd dW_in = dpre^T x (cuBLAS)"] = t(lambda: pre.t() @ x)

    def gemm_floor() -> None:  # the six GEMMs of a training step, outputs preallocated
        torch.mm(x, w_in.t(), out=bufs["pre"])
        torch.mm(h, w_out.t(), out=bufs["y"])
        torch.mm(dy, w_out, out=bufs["dh"])
        torch.mm(dy.t(), h, out=bufs["dw_out"])
        torch.mm(pre, w_in, out=bufs["dx"])
        torch.mm(pre.t(), x, out=bufs["dw_in"])

    bufs = {
        "pre": torch.empty(M, 2 * H, **bf),
        "y": torch.empty(M, D, **bf),
        "dh": torch.empty(M, H, **bf),
        "dw_out": torch.empty(D, H, **bf),
        "dx": torch.empty(M, D, **bf),
        "dw_in": torch.empty(2 * H, D, **bf),
    }
    rows["floor: the step's 6 GEMMs, cuBLAS (CUDA graph)"] = t_graph(gemm_floor)
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
    flops = 9 * 2 * M * D * H  # gate, up, down forward (3 x 2MDH), twice that backward
    print(f"\n== {name}: M={M} D={D} H={H} {act.value}; a step is {flops / 1e12:.3f} TFLOP")
    for k, v in rows.items():
        print(f"  {v:9.1f} us  {k}")
    floor = rows["floor: the step's 6 GEMMs, cuBLAS (CUDA graph)"]
    print(f"  the floor runs at {flops / floor / 1e6:.0f} TFLOP/s")
    return {
        "preset": name,
        "M": M,
        "D": D,
        "H": H,
        "activation": act.value,
        "step_tflop": flops / 1e12,
        "us": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="geglu-article,llama3-8b")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = [parts(name) for name in args.presets.split(",")]
    if args.out:
        record = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "presets": results,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        (args.out / f"backward-parts-{stamp}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
