#!/usr/bin/env python
"""Correctness + speed check of the Gluon Hopper kernels (src/fusedmlp/kernels/gluon_gemm.py),
for an H100/H200; it produced benchmarks/results/gluon-check-v1-20261202.json.

    PYTHONPATH=src python benchmarks/gluon_check.py            # correctness, then timings (< 4 min)
    PYTHONPATH=src python benchmarks/gluon_check.py --quick    # correctness smoke test only
    OUT=/some/dir PYTHONPATH=src python benchmarks/gluon_check.py   # also writes $OUT/gluon_check.json

Needs torch (CUDA) and triton 3.6 or later (Gluon); no network.

Correctness: every output is compared with a float64 torch reference computed from the same
bf16 inputs.  A case passes when, for every output,
    max|kernel - ref64| <= 2 * max|eager - ref64| + 2 * eps(dtype) * max|ref64|
where "eager" is the same computation done by eager torch in the same dtype (F.linear in bf16
then the activation and product in bf16; in the backward, torch.mm then bf16 autograd).

Timing: triton.testing.do_bench (median, L2 flushed between runs) against cuBLAS:
forward: F.linear(x, W_merged) alone (the bare merged gate|up GEMM) and F.linear + eager
act(gate) * up; backward: torch.mm(dy, W_out) alone and + an eager pointwise for d(gate|up), h.
Every case catches its own exceptions; a watchdog ends the run (after writing what it has) if a
case hangs, which is what a synchronisation bug in a persistent kernel looks like.
"""

# The timing lambdas are called at once by attempt() inside their loop iteration, and the `del`s
# at the end of each iteration free GPU memory before the next shape: neither B023 nor F821 applies.
# ruff: noqa: B023, F821

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing

from fusedmlp.kernels import gluon_gemm as gg

RESULTS: dict = {"correctness": [], "benchmarks": [], "env": {}, "errors": []}
DEVICE = "cuda"  # --cpu-dry-run switches to "cpu" (harness self-test with an emulated kernel)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_T0 = time.time()
_CASE = {"name": None, "deadline": None}


# ---------------------------------------------------------------------------------------------
# watchdog: a hung persistent kernel cannot be interrupted; write what we have and exit
# ---------------------------------------------------------------------------------------------


def _dump_json():
    out = os.environ.get("OUT")
    if not out:
        return
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gluon_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    except Exception as e:  # pragma: no cover
        print(f"could not write JSON: {e}")


def _watchdog():
    while True:
        time.sleep(1.0)
        d = _CASE["deadline"]
        if d is not None and time.time() > d:
            msg = f"TIMEOUT in case {_CASE['name']!r}: probable deadlock (kernel never finished)"
            print("\n" + msg, flush=True)
            RESULTS["errors"].append(msg)
            RESULTS["timeout"] = _CASE["name"]
            print_tables()
            _dump_json()
            os._exit(3)


def _begin(name, seconds):
    _CASE["name"] = name
    _CASE["deadline"] = time.time() + seconds


def _end():
    _CASE["deadline"] = None


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

ACTS = [a.value for a in gg.SUPPORTED]  # silu gelu gelu_tanh relu relu2 sigmoid identity


def act_ref(name, x):
    """act(x) with torch ops, in x's dtype (float64 for the reference, bf16 for eager)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "identity":
        return x
    raise ValueError(name)


def act_and_grad64(name, x64):
    """(act(x), act'(x)) in float64 via autograd."""
    xr = x64.detach().clone().requires_grad_(True)
    a = act_ref(name, xr)
    (d,) = torch.autograd.grad(a.sum(), xr)
    return a.detach(), d.detach()


def bound_check(out, ref64, eager):
    """(ok, err, allowed, eager_err)."""
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    eager_err = (eager.double() - ref64).abs().max().item() if out.numel() else 0.0
    eps = torch.finfo(out.dtype).eps
    allowed = 2.0 * eager_err + 2.0 * eps * (ref64.abs().max().item() if out.numel() else 0.0)
    ok = math.isfinite(err) and err <= allowed
    return ok, err, allowed, eager_err


# ---------------------------------------------------------------------------------------------
# correctness cases
# ---------------------------------------------------------------------------------------------


def _cfg_fwd(gated, pingpong):
    if pingpong:
        return gg.GATED_FWD_PINGPONG if gated else gg.PLAIN_FWD_PINGPONG
    return gg.GATED_FWD_CONFIG if gated else gg.PLAIN_FWD_CONFIG


def case_fwd(M, K, N, act, gated, bias, store_pre, pingpong, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rows = 2 * N if gated else N
    x = torch.randn((M, K), device=DEVICE, dtype=torch.float32, generator=g).to(dtype)
    w = (torch.randn((rows, K), device=DEVICE, dtype=torch.float32, generator=g) / math.sqrt(K)).to(dtype)
    b = (
        (0.5 * torch.randn((rows,), device=DEVICE, dtype=torch.float32, generator=g)).to(dtype)
        if bias
        else None
    )

    h, pre = gg.gemm_act_fwd(x, w, b, act, gated=gated, store_pre=store_pre, cfg=_cfg_fwd(gated, pingpong))
    _sync()

    pre64 = x.double() @ w.double().T
    if b is not None:
        pre64 += b.double()
    pre_e = F.linear(x, w, b)
    if gated:
        h64 = act_ref(act, pre64[:, :N]) * pre64[:, N:]
        h_e = act_ref(act, pre_e[:, :N]) * pre_e[:, N:]
    else:
        h64 = act_ref(act, pre64)
        h_e = act_ref(act, pre_e)
    checks = {"h": bound_check(h, h64, h_e)}
    if store_pre:
        checks["pre"] = bound_check(pre, pre64, pre_e)
    return checks


def case_bwd(M, D, N, act, gated, store_h, inplace, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cols = 2 * N if gated else N
    dy = torch.randn((M, D), device=DEVICE, dtype=torch.float32, generator=g).to(dtype)
    w_out = (torch.randn((D, N), device=DEVICE, dtype=torch.float32, generator=g) / math.sqrt(D)).to(dtype)
    pre = (1.5 * torch.randn((M, cols), device=DEVICE, dtype=torch.float32, generator=g)).to(dtype)
    pre_saved = pre.clone()

    dpre, h = gg.gemm_act_bwd(
        dy, w_out, pre, act, gated=gated, dpre=pre if inplace else None, store_h=store_h
    )
    _sync()

    dh64 = dy.double() @ w_out.double()
    p64 = pre_saved.double()
    dh_e = torch.mm(dy, w_out)
    if gated:
        g64, u64 = p64[:, :N], p64[:, N:]
        a64, d64 = act_and_grad64(act, g64)
        ref = {"dgate": dh64 * u64 * d64, "dup": dh64 * a64, "h": a64 * u64}
        ge = pre_saved[:, :N].clone().requires_grad_(True)
        ue = pre_saved[:, N:].clone().requires_grad_(True)
        he = act_ref(act, ge) * ue
        dge, due = torch.autograd.grad(he, (ge, ue), dh_e)
        eager = {"dgate": dge, "dup": due, "h": he.detach()}
        outs = {"dgate": dpre[:, :N], "dup": dpre[:, N:], "h": h}
    else:
        a64, d64 = act_and_grad64(act, p64)
        ref = {"dz": dh64 * d64, "h": a64}
        ze = pre_saved.clone().requires_grad_(True)
        he = act_ref(act, ze)
        (dze,) = torch.autograd.grad(he, (ze,), dh_e)
        eager = {"dz": dze, "h": he.detach()}
        outs = {"dz": dpre, "h": h}
    checks = {}
    for k, v in outs.items():
        if k == "h" and not store_h:
            continue
        checks[k] = bound_check(v, ref[k], eager[k])
    if inplace:
        checks["inplace"] = (dpre.data_ptr() == pre.data_ptr(), 0.0, 0.0, 0.0)
    return checks


def case_specs(quick):
    """(kind, kwargs) of every correctness case; compile_check.py compiles the same variants."""
    S = []

    def fwd(M, K, N, act, gated=True, bias=True, pre=False, pp=False):
        S.append(("fwd", dict(M=M, K=K, N=N, act=act, gated=gated, bias=bias, store_pre=pre, pingpong=pp)))

    def bwd(M, D, N, act, gated=True, store_h=True, inplace=False):
        S.append(("bwd", dict(M=M, D=D, N=N, act=act, gated=gated, store_h=store_h, inplace=inplace)))

    if quick:
        fwd(100, 768, 3072, "silu", bias=True, pre=True)
        fwd(300, 1000, 2730, "gelu_tanh", bias=False, pre=True, pp=True)
        fwd(257, 768, 3072, "gelu", gated=False, bias=True, pre=False)
        bwd(100, 768, 3072, "silu", inplace=True)
        bwd(300, 1000, 2730, "gelu_tanh", store_h=True)
        bwd(257, 768, 3072, "relu2", gated=False)
        return S

    # forward gated, cooperative: every activation (bias on/off and the pre store alternate)
    for i, act in enumerate(ACTS):
        fwd(3000, 1000, 3072, act, bias=(i % 2 == 0), pre=(i % 3 == 0))
    # the same compiled variant (silu, bias, +pre) on other M (1, 100, 8192) and K
    fwd(1, 768, 3072, "silu", bias=True, pre=True)
    fwd(100, 768, 3072, "silu", bias=True, pre=True)
    fwd(8192, 768, 3072, "silu", bias=True, pre=True)
    # unaligned N (pointer-store epilogue)
    fwd(3000, 1000, 2730, "silu", bias=True, pre=True)
    fwd(100, 768, 2730, "gelu", bias=False, pre=False)
    # forward gated, ping-pong
    fwd(3000, 1000, 3072, "gelu_tanh", bias=True, pre=True, pp=True)
    fwd(8192, 768, 3072, "silu", bias=False, pre=False, pp=True)
    fwd(1, 1000, 3072, "gelu_tanh", bias=True, pre=True, pp=True)
    fwd(3000, 768, 2730, "relu2", bias=True, pre=True, pp=True)
    # forward plain
    fwd(3000, 1000, 3072, "gelu", gated=False, bias=True, pre=True)
    fwd(100, 768, 2730, "relu2", gated=False, bias=False, pre=False)
    fwd(8192, 768, 3072, "gelu_tanh", gated=False, bias=False, pre=False, pp=True)
    fwd(3000, 1000, 2730, "silu", gated=False, bias=True, pre=True, pp=True)
    # backward gated (dpre in place and not; with and without h)
    bwd(3000, 1000, 3072, "silu", inplace=True)
    bwd(1, 768, 3072, "silu", inplace=True)
    bwd(8192, 768, 3072, "silu", inplace=True)
    bwd(3000, 768, 3072, "gelu_tanh", store_h=False)
    bwd(100, 1000, 3072, "gelu", store_h=True)
    bwd(3000, 1000, 2730, "relu2", store_h=True, inplace=True)
    bwd(100, 768, 2730, "sigmoid", store_h=False)
    # backward plain
    bwd(3000, 1000, 3072, "gelu", gated=False)
    bwd(100, 768, 2730, "relu", gated=False, store_h=False)
    bwd(8192, 768, 3072, "gelu_tanh", gated=False, inplace=True)
    return S


def case_name(kind, p):
    if kind == "fwd":
        return (
            f"fwd {'gated' if p['gated'] else 'plain'} {'pingpong' if p['pingpong'] else 'coop'} {p['act']} "
            f"M={p['M']} K={p['K']} N={p['N']}{' bias' if p['bias'] else ''}"
            f"{' +pre' if p['store_pre'] else ''}"
        )
    return (
        f"bwd {'gated' if p['gated'] else 'plain'} {p['act']} M={p['M']} D={p['D']} N={p['N']}"
        f"{' +h' if p['store_h'] else ''}{' inplace' if p['inplace'] else ''}"
    )


def correctness_cases(quick):
    out = []
    for kind, p in case_specs(quick):
        fn = case_fwd if kind == "fwd" else case_bwd
        out.append((case_name(kind, p), (lambda fn=fn, p=p: fn(**p))))
    return out


def run_correctness(quick, case_timeout, only=None):
    for name, fn in correctness_cases(quick):
        if only and only not in name:
            continue
        t = time.time()
        _begin(name, case_timeout)
        rec = {"case": name}
        try:
            checks = fn()
            rec["ok"] = all(c[0] for c in checks.values())
            rec["outputs"] = {
                k: {"ok": bool(c[0]), "err": c[1], "allowed": c[2], "eager_err": c[3]}
                for k, c in checks.items()
            }
        except Exception as e:
            rec["ok"] = False
            rec["exception"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        _end()
        rec["seconds"] = round(time.time() - t, 2)
        RESULTS["correctness"].append(rec)
        status = "PASS" if rec["ok"] else "FAIL"
        detail = rec.get("exception") or "  ".join(
            f"{k}: {v['err']:.3g}/{v['allowed']:.3g}" for k, v in rec["outputs"].items()
        )
        print(f"[{status}] {name:<62} {detail[:300]}  ({rec['seconds']} s)", flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------

BENCH_SHAPES = [
    ("geglu M=8192 K=768 N=3072", 8192, 768, 3072, "gelu_tanh"),
    ("swiglu M=4096 K=4096 N=14336", 4096, 4096, 14336, "silu"),
    ("swiglu M=16384 K=4096 N=14336", 16384, 4096, 14336, "silu"),
]


def _bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _eager_dgated(dh, pre, N, act):
    g = pre[:, :N]
    u = pre[:, N:]
    ge = g.detach().requires_grad_(True)
    he = act_ref(act, ge)
    (da,) = torch.autograd.grad(he, ge, dh * u)
    return torch.cat([da, dh * he.detach()], dim=1), he.detach() * u


def _relerr(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_benchmarks(case_timeout, budget_s):
    for shape, M, K, N, act in BENCH_SHAPES:
        if time.time() - _T0 > budget_s - 30:
            msg = f"bench {shape}: skipped, the run's time budget ({budget_s:.0f} s) is nearly spent"
            print("  " + msg, flush=True)
            RESULTS["errors"].append(msg)
            continue
        torch.manual_seed(0)
        x = torch.randn((M, K), device="cuda", dtype=torch.bfloat16)
        w = (torch.randn((2 * N, K), device="cuda") / math.sqrt(K)).to(torch.bfloat16)
        fl = 2.0 * M * K * 2 * N

        def attempt(kind, fn, flops, base_ms, eager_ms=None, check=None):
            """Time fn; ``check`` (optional) returns a max relative error vs an fp32 reference,
            a sanity check at the benchmark shapes (the strict checks are the correctness cases)."""
            _begin(f"bench {shape} {kind}", case_timeout)
            try:
                ms = _bench(fn)
                rec = {
                    "shape": shape,
                    "kind": kind,
                    "ms": ms,
                    "tflops": flops / ms * 1e-9,
                    "vs_cublas": (base_ms / ms) if base_ms else None,
                    "vs_cublas_eager": (eager_ms / ms) if eager_ms else None,
                }
                if check is not None:
                    rec["relerr_vs_fp32"] = check()
                RESULTS["benchmarks"].append(rec)
                extra = f"  cuBLAS-GEMM-time/ours {rec['vs_cublas']:.3f}" if rec["vs_cublas"] else ""
                extra += (
                    f"  (cuBLAS+eager)/ours {rec['vs_cublas_eager']:.3f}" if rec["vs_cublas_eager"] else ""
                )
                extra += f"  relerr {rec['relerr_vs_fp32']:.2e}" if "relerr_vs_fp32" in rec else ""
                print(
                    f"  {shape:<32} {kind:<36} {ms * 1e3:9.1f} us {rec['tflops']:7.1f} TFLOP/s{extra}",
                    flush=True,
                )
                return ms
            except Exception as e:
                msg = f"bench {shape} {kind}: {type(e).__name__}: {str(e)[:500]}"
                print("  " + msg, flush=True)
                RESULTS["errors"].append(msg)
                return None
            finally:
                _end()

        # ---- forward: fp32 reference of h for the sanity check
        pre32 = F.linear(x.float(), w.float())
        h32 = act_ref(act, pre32[:, :N]) * pre32[:, N:]
        del pre32

        def eager_fwd():
            p = F.linear(x, w)
            return act_ref(act, p[:, :N]) * p[:, N:]

        base = attempt("fwd cuBLAS F.linear (GEMM only)", lambda: F.linear(x, w), fl, None)
        eager = attempt("fwd cuBLAS + eager act*up", eager_fwd, fl, base)
        for pp in (False, True):
            cfg = _cfg_fwd(True, pp)
            tag = "pingpong" if pp else "coop"
            attempt(
                f"fwd gluon gated {tag} (h)",
                lambda: gg.gemm_act_fwd(x, w, None, act, gated=True, store_pre=False, cfg=cfg),
                fl,
                base,
                eager,
                check=lambda: _relerr(gg.gemm_act_fwd(x, w, None, act, gated=True, cfg=cfg)[0], h32),
            )
            attempt(
                f"fwd gluon gated {tag} (h + pre)",
                lambda: gg.gemm_act_fwd(x, w, None, act, gated=True, store_pre=True, cfg=cfg),
                fl,
                base,
                eager,
            )
        del w, h32
        torch.cuda.empty_cache()
        # ---- backward (the GEMM's K is the model width: dy [M, K], W_out [K, N])
        dy = torch.randn((M, K), device="cuda", dtype=torch.bfloat16)
        w_out = (torch.randn((K, N), device="cuda") / math.sqrt(K)).to(torch.bfloat16)
        pre = torch.randn((M, 2 * N), device="cuda", dtype=torch.bfloat16)
        flb = 2.0 * M * K * N
        dh32 = dy.float() @ w_out.float()
        a32, d32 = act_and_grad64(act, pre[:, :N].float())
        dg32 = dh32 * pre[:, N:].float() * d32
        del dh32, a32, d32
        dpre = torch.empty_like(pre)
        base = attempt("bwd cuBLAS torch.mm (dh only)", lambda: torch.mm(dy, w_out), flb, None)
        eager = attempt(
            "bwd cuBLAS mm + eager dgated (+h)",
            lambda: _eager_dgated(torch.mm(dy, w_out), pre, N, act),
            flb,
            base,
        )
        attempt(
            "bwd gluon dgated (+h)",
            lambda: gg.gemm_act_bwd(dy, w_out, pre, act, gated=True, dpre=dpre, store_h=True),
            flb,
            base,
            eager,
            check=lambda: _relerr(
                gg.gemm_act_bwd(dy, w_out, pre, act, gated=True, dpre=dpre)[0][:, :N], dg32
            ),
        )
        attempt(
            "bwd gluon dgated (no h)",
            lambda: gg.gemm_act_bwd(dy, w_out, pre, act, gated=True, dpre=dpre, store_h=False),
            flb,
            base,
            eager,
        )
        del x, dy, w_out, pre, dpre, dg32
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# --cpu-dry-run: self-test of this harness on a machine without a GPU; the kernels are replaced
# by an fp32 torch emulation of what they compute (fp32 accumulate, fp32 epilogue, one rounding)
# ---------------------------------------------------------------------------------------------


def _emu_act_bwd(name, x, grad):
    xr = x.detach().clone().requires_grad_(True)
    a = act_ref(name, xr)
    (d,) = torch.autograd.grad(a, xr, grad)
    return a.detach(), d


def _emu_fwd(x, w, bias=None, activation="silu", gated=True, store_pre=False, cfg=None, perturb=0.0):
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    N = w.shape[0] // 2 if gated else w.shape[0]
    h = act_ref(activation, y[:, :N]) * y[:, N:] if gated else act_ref(activation, y)
    h = h * (1 + perturb)
    return h.to(x.dtype), (y.to(x.dtype) if store_pre else None)


def _emu_bwd(dy, w_out, pre, activation="silu", gated=True, dpre=None, store_h=True, cfg=None):
    dh = dy.float() @ w_out.float()
    N = w_out.shape[1]
    p = pre.float()
    if gated:
        g, u = p[:, :N], p[:, N:]
        a, dg = _emu_act_bwd(activation, g, dh * u)
        out = torch.cat([dg, dh * a], dim=1).to(pre.dtype)
        h = (a * u).to(pre.dtype) if store_h else None
    else:
        a, dz = _emu_act_bwd(activation, p, dh)
        out = dz.to(pre.dtype)
        h = a.to(pre.dtype) if store_h else None
    if dpre is None:
        dpre = torch.empty_like(pre)
    dpre.copy_(out)
    return dpre, h


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def print_tables():
    print("\n" + "=" * 100)
    print("CORRECTNESS")
    npass = sum(1 for r in RESULTS["correctness"] if r["ok"])
    for r in RESULTS["correctness"]:
        if r["ok"]:
            worst = max((v["err"] / v["allowed"] if v["allowed"] else 0.0) for v in r["outputs"].values())
            print(f"  PASS  {r['case']:<64} worst err/allowed = {worst:.2f}")
        else:
            why = r.get("exception") or "  ".join(
                f"{k}: err {v['err']:.3g} > {v['allowed']:.3g}"
                for k, v in r["outputs"].items()
                if not v["ok"]
            )
            print(f"  FAIL  {r['case']:<64} {why[:200]}")
    print(f"  {npass}/{len(RESULTS['correctness'])} passed")
    if RESULTS["benchmarks"]:
        print("\nTIMINGS (median, bf16)" + " " * 48 + "us   TFLOP/s  cuBLAS/ours  (cuBLAS+eager)/ours")
        for b in RESULTS["benchmarks"]:
            r = f"{b['vs_cublas']:.3f}" if b["vs_cublas"] else "-"
            r2 = f"{b['vs_cublas_eager']:.3f}" if b.get("vs_cublas_eager") else "-"
            print(
                f"  {b['shape']:<30} {b['kind']:<36} {b['ms'] * 1e3:9.1f} {b['tflops']:9.1f} {r:>11} {r2:>11}"
            )
        print("  (cuBLAS/ours > 1: faster than the bare cuBLAS GEMM, which computes no activation)")
    if RESULTS["errors"]:
        print("\nERRORS")
        for e in RESULTS["errors"]:
            print("  " + e[:300])
    print(f"\ntotal {time.time() - _T0:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="correctness smoke test only")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--case-timeout", type=float, default=90.0, help="seconds before a case counts as hung")
    ap.add_argument(
        "--budget", type=float, default=225.0, help="overall seconds; benchmarks are skipped past it"
    )
    ap.add_argument("--only", default=None, help="run only the correctness cases whose name contains this")
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run-perturb", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cpu_dry_run:  # harness self-test, no GPU: emulated kernels on the --quick cases
        global DEVICE
        DEVICE = "cpu"
        gg.gemm_act_fwd = lambda *args, **kw: _emu_fwd(*args, **kw, perturb=a.dry_run_perturb)
        gg.gemm_act_bwd = _emu_bwd
        run_correctness(True, 1e9, a.only)
        print_tables()
        _dump_json()
        return 0 if all(r["ok"] for r in RESULTS["correctness"]) else 1
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    cap = torch.cuda.get_device_capability()
    RESULTS["env"] = {
        "device": torch.cuda.get_device_name(),
        "capability": cap,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    print(RESULTS["env"], flush=True)
    if cap[0] != 9:
        print("these kernels need Hopper (sm_90a)")
        return 2
    threading.Thread(target=_watchdog, daemon=True).start()
    run_correctness(a.quick, a.case_timeout, a.only)
    if not a.quick and not a.no_bench:
        print("\nbenchmarks", flush=True)
        run_benchmarks(a.case_timeout, a.budget)
    print_tables()
    _dump_json()
    return 0 if all(r["ok"] for r in RESULTS["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
