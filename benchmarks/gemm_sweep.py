"""Sweep the gate|up GEMM-with-activation kernel over load path, persistence and tiles.

Run on the GPU: PYTHONPATH=src python3 benchmarks/gemm_sweep.py --out DIR
Prints, per shape, cuBLAS's time for the same GEMM (x @ W^T alone) and each config's time.
"""

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.testing

from fusedmlp.activations import Activation
from fusedmlp.kernels import gemm
from fusedmlp.kernels import gemm_act as g

SHAPES = {  # name: (M, K, N, gated, bias)
    "geglu-article": (8192, 768, 3072, True, False),
    "gpt2-fc1": (8192, 768, 3072, False, True),
    "llama3-8b": (4096, 4096, 14336, True, False),
    "decode-M1": (1, 4096, 14336, True, False),
    "decode-M16": (16, 4096, 14336, True, False),
}


def _label(cfg: triton.Config, tma: bool) -> str:
    k = cfg.kwargs
    extra = " WS" if k["WARP_SPEC"] else ""
    tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
    return (f"{tile} s{cfg.num_stages} w{cfg.num_warps} g{k['GROUP_M']} "
            f"{'tma' if tma else 'ptr'} {'pers' if k['PERSISTENT'] else 'grid'}{extra}")


def candidates(M: int, gated: bool) -> list[tuple[triton.Config, bool]]:
    """(config, use TMA) pairs: the v1 winners and the ideas of this round (docs/perf-notes.md)."""
    if M <= 64:
        tiles = ((32, 256, 4), (64, 256, 3), (64, 128, 6), (128, 128, 4), (32, 512, 2), (16, 512, 2))
        cfgs = [gemm.config(16, bn, bk, 4, st, False, 1) for bn, bk, st in tiles]
        return [(c, tma) for c in cfgs for tma in (True, False)]
    cfgs = [
        gemm.config(128, 128, 64, 8, 3, False),
        gemm.config(128, 128, 64, 8, 3, False, group=4),
        gemm.config(128, 128, 64, 8, 3, False, group=16),
        gemm.config(128, 128, 128, 8, 2, False),
        gemm.config(128, 128, 64, 8, 4, False, ws=True),
        gemm.config(128, 128, 64, 8, 3, False, ws=True),
        gemm.config(256, 64, 64, 8, 3, False),
        gemm.config(64, 128, 64, 4, 4, False),
        gemm.config(64, 256, 64, 8, 3, False),
    ]
    if not gated:
        cfgs += [
            gemm.config(128, 256, 64, 8, 3, True),
            gemm.config(128, 256, 64, 8, 3, False, ws=True),
            gemm.config(128, 256, 64, 8, 3, True, ws=True),
            gemm.config(256, 128, 64, 8, 3, True),
        ]
    return [(c, tma) for c in cfgs for tma in (True, False)]


def _time(x, w, b, act, gated, cfg, tma, ref) -> tuple[float, float | None, str]:
    orig = gemm.tma_ok
    if not tma:
        gemm.tma_ok = lambda *_: False
    try:
        fn = lambda: g.gemm_act(x, w, b, act, gated, config=cfg)
        h, _ = fn()
        err = ((h.float() - ref).norm() / ref.norm()).item()
        return triton.testing.do_bench(fn, return_mode="median") * 1e3, err, ""
    except Exception as e:  # a sweep reports what does not compile
        return float("inf"), None, f" FAILED {type(e).__name__}: {str(e)[:80]}"
    finally:
        gemm.tma_ok = orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    results = {}
    for name in args.shapes.split(","):
        M, K, N, gated, bias = SHAPES[name]
        rows = 2 * N if gated else N
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        b = torch.randn(rows, device="cuda", dtype=torch.bfloat16) if bias else None
        cublas = triton.testing.do_bench(
            lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), return_mode="median"
        ) * 1e3
        act = Activation.GELU_TANH
        ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        ref = (act(ref[:, :N]) * ref[:, N:]) if gated else act(ref)
        rows_out = []
        for cfg, tma in candidates(M, gated):
            us, err, note = _time(x, w, b, act, gated, cfg, tma, ref)
            rows_out.append((us, _label(cfg, tma) + note, err))
        rows_out.sort()
        print(f"\n== {name}: M={M} K={K} N={N} gated={gated}; cuBLAS x@W^T alone: {cublas:.1f} us")
        for us, label, err in rows_out:
            e = "-" if err is None else f"{err:.1e}"
            print(f"  {us:8.1f} us  {us / cublas:5.2f}x cuBLAS  err {e}  {label}")
        configs = [{"us": u, "label": lab, "rel_err": e} for u, lab, e in rows_out]
        results[name] = {"cublas_us": cublas, "configs": configs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemm_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
