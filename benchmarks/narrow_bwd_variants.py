"""Where the narrow MLP's backward kernel spends its time: timed variants of it (issue 7).

METHOD.md's "leave one stage out" without hardware counters: each variant is the kernel source
of ``fusedmlp/kernels/narrow_mlp.py`` with named text substitutions, compiled as a module of its
own and timed alone on the default case (2^20 rows, 32 -> 64 x8 -> 16, ReLU, bf16) at a few
(BLOCK_M, num_warps, programs per SM). Candidate rewrites are checked against the shipped
kernel at ``--rev`` (dx, dW, db); ablations (``timing only``) compute wrong numbers on purpose, to price one
stage by difference.

    PYTHONPATH=src python3 benchmarks/narrow_bwd_variants.py --study v2 --out DIR

writes DIR/narrow_bwd_variants_<UTC time>.json.

Studies: v1, the scratch-parking kernel of 40e72f6 (its results: narrow-bwd-variants-v1); v2, the
recompute-segment kernel of b253e37 (what its weight-gradient reductions cost).

Under TRITON_INTERPRET=1 with --rows 300 it runs as a smoke test of the substitutions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import triton

from fusedmlp.activations import Activation
from fusedmlp.cases.timing import median_us
from fusedmlp.kernels import narrow_mlp as shipped

KERNEL_PATH = "src/fusedmlp/kernels/narrow_mlp.py"


def kernel_source(rev: str) -> str:
    """The kernel file at git revision ``rev``, or as it is on disk for ``rev="worktree"``."""
    root = Path(__file__).resolve().parent.parent
    if rev == "worktree":
        return (root / KERNEL_PATH).read_text()
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

V1_VARIANTS: dict[str, tuple[list[tuple[str, str]], bool]] = {  # name: (substitutions, exact)
    "shipped": ([], True),
    "red": (_RED, True),
    "red+prefetch": (_RED + _PREFETCH, True),
    "prefetch": (_PREFETCH, True),
    "ablate: dW/db store only": (_DW_STORE_ONLY, False),
    "ablate: no scratch": (_NO_SCRATCH, False),
    "ablate: no scratch + dW/db store only": (_NO_SCRATCH + _DW_STORE_ONLY, False),
}

# v2 (recompute segments, atomic partial sums). What the weight-gradient reductions cost, and a
# candidate: each layer's [P, P] fp32 dW tile reduced into the program's slice by one TMA bulk
# reduction (cp.reduce.async.bulk.tensor, through a tensor descriptor) instead of P*P/threads
# scalar reductions per thread.
_V2_DW = 'tl.atomic_add(dw_ptr + (s + i) * P * P, dw, sem="relaxed")'
_V2_DB = 'tl.atomic_add(db_ptr + (s + i) * P, tl.sum(dz, axis=0), sem="relaxed")'
_V2_NO_REDUCTIONS = [(_V2_DW, "pass"), (_V2_DB, "pass")]  # the dW dot is dead code then
_V2_DW_PLAIN_STORE = [(_V2_DW, "tl.store(dw_ptr + (s + i) * P * P, dw)")]
# the dW dot kept, one reduction per block instead of one per layer (sums every layer's dW)
_V2_DW_ONCE = [
    (
        "    for blk in range(pid, num_blocks, num_programs):\n",
        "    for blk in range(pid, num_blocks, num_programs):\n"
        "        dw_all = tl.zeros((P, P), tl.float32)\n",
    ),
    (_V2_DW, "dw_all += dw"),
    (
        "        tl.store(\n            dx_ptr",
        '        tl.atomic_add(dw_ptr, dw_all, sem="relaxed")\n        tl.store(\n            dx_ptr',
    ),
]
_V2_TMA_REDUCE = [
    (
        "    dw_ptr += pid.to(tl.int64) * L * P * P + cols[:, None] * P + cols[None, :]\n",
        "    dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[num_programs * L * P, P], strides=[P, 1],"
        " block_shape=[P, P])\n",
    ),
    (_V2_DW, "dw_desc.atomic_add([(pid * L + s + i) * P, 0], dw)"),
]
V2_VARIANTS: dict[str, tuple[list[tuple[str, str]], bool]] = {
    "shipped": ([], True),
    "tma bulk reduce of dW": (_V2_TMA_REDUCE, True),
    "ablate: dW plain store (no L2 add)": (_V2_DW_PLAIN_STORE, False),
    "ablate: one dW reduction per block": (_V2_DW_ONCE, False),
    "ablate: no dW/db reductions": (_V2_NO_REDUCTIONS, False),
}

# study: (kernel revision read from git, variants, (BLOCK_M, num_warps, programs per SM) configs)
STUDIES = {
    "v1": ("40e72f6", V1_VARIANTS, [(128, 8, 1), (64, 4, 2), (128, 4, 2), (256, 16, 1)]),
    "v2": ("b253e37", V2_VARIANTS, [(64, 4, 2), (128, 8, 1), (64, 4, 1)]),
}


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
    ap.add_argument("--study", choices=sorted(STUDIES), default="v2")
    ap.add_argument(
        "--configs", default=None, help='"BLOCK_M,warps,programs_per_sm;..." (default: the study\'s)'
    )
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all of the study)")
    ap.add_argument(
        "--rev", default=None, help="git revision of the kernel to rewrite (default: the study's)"
    )
    args = ap.parse_args(argv)
    study_rev, variants, study_configs = STUDIES[args.study]
    rev = args.rev or study_rev
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
    if args.configs:
        study_configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    configs = study_configs if device == "cuda" else [(32, 4, 1)]
    if device == "cuda":  # device-side tensor descriptors take their scratch from this allocator
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))

    source = kernel_source(rev)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(",") if args.variants else variants:
            subs, exact = variants[name]
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
        "kernel": f"{KERNEL_PATH} at {rev}",
        "study": args.study,
        "DISABLE_MMA_V3": os.environ.get("DISABLE_MMA_V3", ""),  # Triton: mma.sync instead of wgmma
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        (args.out / f"narrow_bwd_variants_{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
