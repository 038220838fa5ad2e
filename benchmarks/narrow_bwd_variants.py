"""Where the narrow MLP's backward kernel spends its time: timed variants of it (issue 7).

METHOD.md's "leave one stage out" without hardware counters: each variant is the kernel source
of ``fusedmlp/kernels/narrow_mlp.py`` with named text substitutions, compiled as a module of its
own and timed alone on the default case (2^20 rows, 32 -> 64 x8 -> 16, ReLU, bf16) at a few
(BLOCK_M, num_warps, programs per SM). Candidate rewrites are checked against the shipped
kernel at ``--rev`` (dx, dW, db); ablations (``timing only``) compute wrong numbers on purpose, to price one
stage by difference.

    PYTHONPATH=src python3 benchmarks/narrow_bwd_variants.py --out DIR   # DIR/narrow_bwd_variants_<time>.json

Under TRITON_INTERPRET=1 with --rows 300 it runs as a smoke test of the substitutions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fusedmlp.activations import Activation
from fusedmlp.bench.timing import median_us
from fusedmlp.kernels import narrow_mlp as shipped

# The kernel these variants rewrite: the backward as of this commit (scratch-parking design),
# read from git so the study reruns after the kernel has moved on.
STUDY_REV = "40e72f6"
KERNEL_PATH = "src/fusedmlp/kernels/narrow_mlp.py"


def kernel_source(rev: str) -> str:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        ["git", "show", f"{rev}:{KERNEL_PATH}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout

# "shipped": the kernel at --rev as it is. "red": partial sums by fire-and-forget reductions (no
# load, no wait for the L2 round trip); each program still owns its slice, so the order of
# additions into an element is the program's.
_RED = [
    (
        "tl.store(db_ptr + l * P, tl.load(db_ptr + l * P) + tl.sum(dz, axis=0))",
        'tl.atomic_add(db_ptr + l * P, tl.sum(dz, axis=0), sem="relaxed")',
    ),
    (
        "tl.store(dw_ptr + l * P * P, tl.load(dw_ptr + l * P * P) + dw)",
        'tl.atomic_add(dw_ptr + l * P * P, dw, sem="relaxed")',
    ),
]
# Issue the next layer's loads (weight, parked pre-activation) before this layer's math.
_PREFETCH = [
    (
        "        for l in tl.static_range(L - 1, -1, -1):\n            _, dz = apply_act_bwd(z, g, ACTS[l])",
        "        for l in tl.static_range(L - 1, -1, -1):\n"
        "            w = tl.load(w_ptr + l * P * P + cols[:, None] * P + cols[None, :])\n"
        "            if l > 0:\n"
        "                z_prev = tl.load(z_ptr + (l - 1) * BLOCK_M * P)\n"
        "            _, dz = apply_act_bwd(z, g, ACTS[l])",
    ),
    (
        "                z = tl.load(z_ptr + (l - 1) * BLOCK_M * P).to(tl.float32)",
        "                z = z_prev.to(tl.float32)",
    ),
    (
        "            w = tl.load(w_ptr + l * P * P + cols[:, None] * P + cols[None, :])\n"
        "            g = _dot",
        "            g = _dot",
    ),
]
# Timing only: the partial-sum stores without their loads (what the RMW's load costs).
_DW_STORE_ONLY = [
    (
        "tl.store(db_ptr + l * P, tl.load(db_ptr + l * P) + tl.sum(dz, axis=0))",
        "tl.store(db_ptr + l * P, tl.sum(dz, axis=0))",
    ),
    ("tl.store(dw_ptr + l * P * P, tl.load(dw_ptr + l * P * P) + dw)", "tl.store(dw_ptr + l * P * P, dw)"),
]
# Timing only: no pre-activation scratch (the walk reuses a register tensor instead).
_NO_SCRATCH = [
    ("                tl.store(z_ptr + l * BLOCK_M * P, z)\n", ""),
    (
        "                z = tl.load(z_ptr + (l - 1) * BLOCK_M * P).to(tl.float32)",
        "                z = dz.to(tl.float32)",
    ),
]

VARIANTS: dict[str, tuple[list[tuple[str, str]], bool]] = {  # name: (substitutions, exact)
    "shipped": ([], True),
    "red": (_RED, True),
    "red+prefetch": (_RED + _PREFETCH, True),
    "prefetch": (_PREFETCH, True),
    "ablate: dW/db store only": (_DW_STORE_ONLY, False),
    "ablate: no scratch": (_NO_SCRATCH, False),
    "ablate: no scratch + dW/db store only": (_NO_SCRATCH + _DW_STORE_ONLY, False),
}
CONFIGS = [(128, 8, 1), (64, 4, 2), (128, 4, 2), (256, 16, 1)]


def build(name: str, source: str, subs: list[tuple[str, str]], tmp: Path) -> ModuleType:
    src = source
    for old, new in subs:
        if src.count(old) != 1:
            raise RuntimeError(f"variant {name!r}: pattern found {src.count(old)} times, not once: {old!r}")
        src = src.replace(old, new)
    slug = "".join(c if c.isalnum() else "_" for c in name)
    path = tmp / f"narrow_variant_{slug}.py"
    path.write_text(src)  # Triton reads a kernel's source from its file
    spec = importlib.util.spec_from_file_location(f"fusedmlp.kernels.narrow_variant_{slug}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rev", default=STUDY_REV, help="git revision of the kernel to rewrite")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    widths = [32] + [64] * 8 + [16]
    acts = [Activation.RELU] * 8 + [Activation.IDENTITY]
    L, P = len(acts), shipped.padded_width(widths)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.zeros(L, P, P)
    b = torch.zeros(L, P)
    for i in range(L):
        w[i, : widths[i + 1], : widths[i]] = (
            torch.randn(widths[i + 1], widths[i], generator=gen) / widths[i] ** 0.5
        )
        b[i, : widths[i + 1]] = 0.1 * torch.randn(widths[i + 1], generator=gen)
    w, b = w.to(device, dtype), b.to(device, dtype)
    x = torch.randn(args.rows, widths[0], generator=gen).to(device, dtype)
    dy = torch.randn(args.rows, widths[-1], generator=gen).to(device, dtype)
    configs = CONFIGS if device == "cuda" else [(32, 4, 1)]

    source = kernel_source(args.rev)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            subs, exact = VARIANTS[name]
            module = build(name, source, subs, Path(tmp))
            if name == "shipped":
                ref = module.narrow_mlp_backward(dy, x, w, b, widths, acts, *configs[0])
            for bm, warps, per_sm in configs:
                row: dict[str, Any] = {
                    "variant": name,
                    "block_m": bm,
                    "num_warps": warps,
                    "programs_per_sm": per_sm,
                }
                try:

                    def run(
                        module: ModuleType = module, bm: int = bm, warps: int = warps, per_sm: int = per_sm
                    ) -> Any:
                        return module.narrow_mlp_backward(dy, x, w, b, widths, acts, bm, warps, per_sm)

                    out = run()
                    if exact:
                        row["max_rel_diff_vs_shipped"] = max(
                            (
                                (o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)
                            ).item()
                            for o, r in zip(out, ref, strict=True)
                        )
                    row["us"] = median_us(run, device) if device == "cuda" else None
                except Exception as e:  # a variant that fails to compile is a result too
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
    record = {
        "case": "2^20 rows, 32 -> 64 x8 -> 16, ReLU, bf16" if args.rows == 1 << 20 else f"{args.rows} rows",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": f"{KERNEL_PATH} at {args.rev}",
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        (args.out / f"narrow_bwd_variants_{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
