"""Sweep launch configs of the backward GEMM with act' in its epilogue (kernels/gemm_act_bwd.py).

Run on the GPU: PYTHONPATH=src python3 benchmarks/gemm_bwd_sweep.py --out $OUT
Per preset (--presets): the baseline (cuBLAS dh = dy @ W_out, then pointwise.gated_act_backward writing
d(gate|up) and h), cuBLAS dh alone (the GEMM floor), then every candidate config of the fused
kernel launched directly (no autotuning), checked against the baseline and timed (do_bench
median). llama3-8b runs the best geglu configs plus a few large tiles. A time budget
(--budget-s) skips the tail of a list rather than overrun. Writes
<out>/gemm-bwd-sweep-<UTC stamp>.json. CPU plumbing check (tiny shapes, fp16, one timed call):
TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gemm_bwd_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.testing
from rich.console import Console
from rich.table import Table

from fusedmlp.activations import Activation
from fusedmlp.cases.presets import get_preset
from fusedmlp.kernels import gemm_act_bwd as gb
from fusedmlp.kernels import pointwise
from fusedmlp.kernels.gemm import SMEM_PIPELINE_BUDGET, descriptor, m_bucket, smem_bytes, tile_grid, tma_ok
from fusedmlp.kernels.gemm import config as _cfg

TOL = 2e-2  # max |fused - baseline| / max |baseline| above this marks a config wrong
Cfg = triton.Config
# (BLOCK_M, BLOCK_N, warps): one fp32 accumulator of <= 128 registers a thread (256x256 is not);
# 8 warps only on tiles of >= 128x64 (two warpgroups of 64 rows). Big tiles first: when the
# budget runs out the small-tile tail is what gets skipped.
BIG = [(128, 128, 8), (128, 256, 8), (256, 128, 8), (128, 128, 4)]
MID = [(128, 64, 4), (64, 128, 4), (256, 64, 8), (64, 256, 8), (128, 64, 8), (64, 128, 8),
       (256, 64, 4), (64, 256, 4), (64, 64, 4)]  # fmt: skip
BIG_PIPES = ((64, 3), (64, 4), (64, 5), (128, 3), (32, 5))  # (BLOCK_K, stages); MID: the first four


def fits(c: Cfg) -> bool:
    return smem_bytes(c, 2, b_tiles=1) <= SMEM_PIPELINE_BUDGET  # what gemm_act_bwd._prune keeps (bf16)


def sweep_configs() -> list[Cfg]:
    """~50 configs: BK/stage pipelines per tile, persistent and warp-specialised big tiles."""
    out = [_cfg(m, n, k, w, s, False) for m, n, w in BIG for k, s in BIG_PIPES]
    out += [_cfg(m, n, 64, w, s, True) for m, n, w in BIG for s in (3, 4)]
    out += [_cfg(128, 128, 64, 8, 3, False, ws=True), _cfg(128, 128, 64, 8, 4, False, ws=True)]
    out += [_cfg(128, 256, 64, 8, 3, False, ws=True)]
    out += [_cfg(m, n, k, w, s, False) for m, n, w in MID for k, s in BIG_PIPES[:4] if s < 5]
    return [c for c in out if fits(c)]


LARGE = [_cfg(128, 256, 64, 8, s, p) for s in (3, 4) for p in (False, True)] + [
    _cfg(256, 128, 64, 8, 3, True), _cfg(128, 128, 64, 8, 4, True), _cfg(128, 128, 64, 8, 3, False)
]  # fmt: skip
SMOKE = [_cfg(32, 32, 32, 4, 2, False, group=2), _cfg(32, 64, 32, 4, 2, True), _cfg(64, 32, 32, 4, 2, False)]


def label(c: Cfg) -> str:
    k = c.kwargs
    tags = ("pers" if k["PERSISTENT"] else "grid") + (" WS" if k["WARP_SPEC"] else "")
    star = " *" if any(str(c) == str(d) for d in gb.CONFIGS) else ""  # * = in the kernel's list
    tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
    return f"{tile} w{c.num_warps} s{c.num_stages} g{k['GROUP_M']} {tags}{star}"


def launcher(dy, w_out, pre, dpre, h, act: Activation, store_h: bool, use_tma: bool) -> Callable[[Cfg], None]:
    """gemm_act_backward's args/meta/grid (gated, bf16/fp16), launching a given config."""
    M, K = dy.shape
    N = w_out.shape[1]
    hh = h if store_h else dpre
    args = (
        descriptor(dy) if use_tma else dy, descriptor(w_out) if use_tma else w_out, pre, dpre, hh,
        M, N, K, m_bucket(M),
        dy.stride(0), w_out.stride(0), pre.stride(0), dpre.stride(0), hh.stride(0),
    )  # fmt: skip
    meta = {"ACT": act.code, "GATED": True, "STORE_H": store_h, "USE_TMA": use_tma, "DOT_PRECISION": "tf32"}
    key = (args[8], N, K, dy.dtype, True, store_h, use_tma, False)

    def cpu_grid(c: dict) -> tuple[int]:  # the interpreter: persistent configs walk several tiles
        tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
        return (min(tiles, 4) if c["PERSISTENT"] else tiles,)

    grid = tile_grid(M, N, dy.device) if dy.is_cuda else cpu_grid
    return lambda cfg: gb.LAUNCHER(key, grid, args, meta, config=cfg)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def sweep_preset(shape: tuple, dev: str, dtype: torch.dtype, configs: list[Cfg], timer, args) -> dict:
    M, D, H, act = shape
    t0 = time.perf_counter()
    kw = {"device": dev, "dtype": dtype}
    x, dy = torch.randn(M, D, **kw), torch.randn(M, D, **kw)
    w_in, w_out = torch.randn(2 * H, D, **kw) / D**0.5, torch.randn(D, H, **kw) / H**0.5
    pre = x @ w_in.t()  # what gemm_act(..., store_preact=True) saves, without tuning the forward
    dh, ref_dpre, ref_h = torch.empty(M, H, **kw), torch.empty_like(pre), torch.empty(M, H, **kw)

    def baseline(h: torch.Tensor | None = ref_h) -> None:
        torch.mm(dy, w_out, out=dh)
        pointwise.gated_act_backward(dh, pre[:, :H], pre[:, H:], act, ref_dpre[:, :H], ref_dpre[:, H:], h)

    res: dict[str, Any] = {"M": M, "D": D, "H": H, "activation": act.value, "dtype": str(dtype)}
    res["gemm_us"] = timer(lambda: torch.mm(dy, w_out, out=dh))
    res["gemm_tflops"] = 2 * M * D * H / res["gemm_us"] * 1e-6
    res["baseline_no_h_us"] = timer(lambda: baseline(None))
    res["baseline_us"] = timer(baseline)
    use_tma = not args.no_tma and tma_ok(dy, w_out)
    res["use_tma"] = use_tma
    dpre, h = torch.empty_like(pre), torch.empty(M, H, **kw)
    launch = {s: launcher(dy, w_out, pre, dpre, h, act, s, use_tma) for s in (True, False)}

    def run(cfg: Cfg, store_h: bool, deadline: float) -> dict:
        row: dict[str, Any] = {"config": label(cfg) + ("" if store_h else " noH"), "store_h": store_h}
        row.update(kwargs=cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if time.perf_counter() > deadline:
            return {**row, "status": "skipped (time budget)"}
        dpre.fill_(float("nan"))
        h.fill_(float("nan"))
        try:
            start = time.perf_counter()
            launch[store_h](cfg)
            if dev == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - start
            row["rel_diff_dpre"] = rel(dpre, ref_dpre)
            row["rel_diff_h"] = rel(h, ref_h) if store_h else None
            worst = max(row["rel_diff_dpre"], row["rel_diff_h"] or 0.0)
            row["status"] = "ok" if worst <= TOL else "wrong"  # NaN (unwritten) is not <= TOL
            row["us"] = timer(lambda: launch[store_h](cfg))
            row["vs_baseline"] = row["us"] / res["baseline_us" if store_h else "baseline_no_h_us"]
        except Exception as e:  # out of resources, compile errors: record and go on
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
        return row

    sweep_end = args.deadline - (0 if args.smoke else 12)  # leave room for the no-h runs
    rows = [run(c, True, sweep_end) for c in configs]
    ranked = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["us"])
    by_label = {label(c): c for c in configs}
    rows += [run(by_label[r["config"]], False, args.deadline) for r in ranked[: args.no_h_top]]
    res["configs"] = sorted(rows, key=lambda r: r.get("us", float("inf")))
    res["best_store_h"] = [by_label[r["config"]] for r in ranked]  # for the next preset, not saved
    res["wall_s"] = time.perf_counter() - t0
    return res


def print_table(console: Console, name: str, res: dict) -> None:
    title = (f"{name}: M={res['M']} D={res['D']} H={res['H']} {res['activation']} tma={res['use_tma']} | "
             f"baseline {res['baseline_us']:.1f} us (no h {res['baseline_no_h_us']:.1f}), "
             f"cuBLAS dh alone {res['gemm_us']:.1f} us ({res['gemm_tflops']:.0f} TFLOP/s)")  # fmt: skip
    table = Table(title=title, caption="vs baseline: fused time / baseline time (< 1: the fused kernel wins)")
    for col in ("config", "us", "vs baseline", "rel diff dpre", "rel diff h", "status"):
        table.add_column(col, justify="left" if col in ("config", "status") else "right")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in res["configs"]:
        note = r["status"] + (f": {r['error'][:60]}" if "error" in r else "")
        table.add_row(r["config"], f(r.get("us"), ".1f"), f(r.get("vs_baseline"), ".2f") + "x",
                      f(r.get("rel_diff_dpre"), ".1e"), f(r.get("rel_diff_h"), ".1e"), note)  # fmt: skip
    console.print(table)


def git_commit() -> str:
    try:
        cwd = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="geglu-article,llama3-8b")
    ap.add_argument("--out", default=None, help="default benchmarks/results (smoke: the temp dir)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="wall-clock budget of all presets' sweeps")
    ap.add_argument("--no-h-top", type=int, default=3, help="also time store_h=False for the best N")
    ap.add_argument("--no-tma", action="store_true", help="pointer loads instead of TMA descriptors")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    args = ap.parse_args()
    console, start = Console(width=160), time.perf_counter()
    if args.smoke:
        dev, dtype = "cpu", torch.float16  # the interpreter mishandles bf16 dots and descriptors
        shapes = {
            "smoke-geglu": (96, 64, 80, Activation.GELU_TANH),
            "smoke-swiglu": (96, 64, 80, Activation.SILU),
        }

        def timer(fn: Callable[[], object]) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
    else:
        dev, dtype, shapes = "cuda", torch.bfloat16, {}
        for n in args.presets.split(","):
            p = get_preset(n)
            shapes[n] = (p.tokens, p.hidden, p.intermediate, p.activation)
        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median") * 1e3
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (TRITON_INTERPRET=1)",
           "torch": torch.__version__, "triton": triton.__version__, "git_commit": git_commit(),
           "tolerance": TOL, "budget_s": args.budget_s}  # fmt: skip
    results: dict[str, Any] = {"env": env, "presets": {}}
    best: list[Cfg] = []
    for i, (name, shape) in enumerate(shapes.items()):
        if args.smoke:
            configs = SMOKE
        elif name.startswith("llama"):  # the best geglu configs (or the first) plus large tiles
            configs = list({label(c): c for c in (best or sweep_configs())[:12] + LARGE}.values())
        else:
            configs = sweep_configs()
        args.deadline = start + args.budget_s * (i + 1) / len(shapes)  # the rest carries over
        console.print(f"[bold]{name}[/]: {len(configs)} configs, {shape[:3]}, {dev}")
        res = sweep_preset(shape, dev, dtype, configs, timer, args)
        ranked = res.pop("best_store_h")
        best = best or ranked
        results["presets"][name] = res
        print_table(console, name, res)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or (tempfile.gettempdir() if args.smoke else "benchmarks/results")
    path = Path(out) / f"gemm-bwd-sweep-{stamp}{'-smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    console.print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
