"""GEMM with the (gated) activation in its epilogue: h = act(x @ Wg^T + bg) * (x @ Wu^T + bu).

Design limit: one pass over x and the merged gate|up weight W [2N, K] (gate rows first, the
module's own layout), two fp32 accumulators per output tile (gate and up columns n..n+BN), the
bias, activation and product applied in registers, and only h [M, N] written: the
[M, 2N] gate|up intermediate never reaches memory unless the caller asks for it (training saves
it for the backward: ``store_preact``). With ``gated=False`` the same kernel computes
h = act(x @ W^T + b) for FusedMLP.

Loads: on Hopper through TMA tensor descriptors (the copy engine fills shared memory, no address
arithmetic in the main loop); elsewhere through pointers (Ampere, and bf16 under Triton's CPU
interpreter, whose descriptor emulation returns garbage for bf16 as of Triton 3.9). The grid is
persistent for large M (one program per SM walking tiles in grouped order so that GROUP_M row
blocks reuse the same weight columns from L2) and one program per tile for decode-sized M.
Autotuned per (M bucket, N, K): a new M inside a bucket never re-tunes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from .activation import apply_act
from .common import Launcher, descriptor, mma, tile_grid, tma_ok, to_storage


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M consecutive row blocks sweep the column blocks together."""
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _gemm_act_kernel(
    # tensors: x [M, K]; w [2N, K] gate|up (or [N, K] when not GATED); bias like w's rows;
    # h [M, N]; pre [M, 2N] (or [M, N]) receives gate|up before the activation when STORE_PRE
    x, w, bias_ptr, h_ptr, pre_ptr,
    # sizes
    M, N, K,
    M_BUCKET,  # autotune key only
    # strides (rows; columns are unit-stride). x and w strides serve the pointer path only
    stride_xm, stride_wn, stride_hm, stride_pm,
    # meta
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,  # one program per SM walking the tiles (else one per tile)
    WARP_SPEC: tl.constexpr,  # producer/consumer warp specialisation of the K loop
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if not USE_TMA:
            # Out-of-range rows are clamped to row 0 rather than masked, so the loads stay full
            # width; their results land in rows/columns the epilogue does not store.
            rm = off_m + tl.arange(0, BLOCK_M)
            rn = off_n + tl.arange(0, BLOCK_N)
            rm = tl.where(rm < M, rm, 0).to(tl.int64)
            rn = tl.where(rn < N, rn, 0).to(tl.int64)
            x_ptrs = x + rm[:, None] * stride_xm + rk[None, :]
            wg_ptrs = w + rn[:, None] * stride_wn + rk[None, :]
            wu_ptrs = wg_ptrs + N * stride_wn
        for kt in tl.range(k_tiles, warp_specialize=WARP_SPEC):
            k0 = kt * BLOCK_K
            if USE_TMA:
                a = x.load([off_m, k0])
                bg = w.load([off_n, k0])
                if GATED:
                    bu = w.load([N + off_n, k0])
            else:
                k_ok = rk[None, :] < K - k0
                a = tl.load(x_ptrs, mask=k_ok, other=0.0)
                bg = tl.load(wg_ptrs, mask=k_ok, other=0.0)
                if GATED:
                    bu = tl.load(wu_ptrs, mask=k_ok, other=0.0)
                x_ptrs += BLOCK_K
                wg_ptrs += BLOCK_K
                wu_ptrs += BLOCK_K
            acc_g = mma(a, bg.T, acc_g, DOT_PRECISION)
            if GATED:
                acc_u = mma(a, bu.T, acc_u, DOT_PRECISION)

        # epilogue: bias, optional pre-activation store, activation (and product), one store of h
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)[:, None]
        if HAS_BIAS:
            acc_g += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(bias_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            pre = pre_ptr + rows * stride_pm + cols[None, :]
            tl.store(pre, to_storage(acc_g, pre_ptr.dtype.element_ty), mask=mask)
            if GATED:
                tl.store(pre + N, to_storage(acc_u, pre_ptr.dtype.element_ty), mask=mask)
        h = apply_act(acc_g, ACT)
        if GATED:
            h = h * acc_u
        tl.store(h_ptr + rows * stride_hm + cols[None, :], to_storage(h, h_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def m_bucket(M: int) -> int:
    """Autotune bucket of M: powers of two up to 16384 (decode sizes get their own buckets)."""
    return min(triton.next_power_of_2(max(M, 1)), 16384)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, persistent: bool,
         group: int = 8, ws: bool = False) -> triton.Config:
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "PERSISTENT": persistent,
          "WARP_SPEC": ws}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


_SMEM_BYTES = 220 * 1024  # H100: 227 KB per block, less the epilogue's scratch


def smem_bytes(cfg: triton.Config, elem_bytes: int, gated: bool) -> int:
    """Shared memory of the K pipeline: x and one or two weight tiles per stage."""
    k = cfg.kwargs
    return (k["BLOCK_M"] + (2 if gated else 1) * k["BLOCK_N"]) * k["BLOCK_K"] * elem_bytes * cfg.num_stages


# Large M, from the sweep in benchmarks/gemm_sweep.py (H100, bf16, 2026-11-25): 128x128x64,
# 3 stages, 8 warps, one program per tile is the best gated config (geglu-article 141 us vs 157
# persistent; 4 warps spill the two 128x128 fp32 accumulators and run 4-5x slower, so none are
# listed). The non-gated kernel does the same work as one 128x256 tile, best persistent (84 us).
_PREFILL = [
    _cfg(128, 128, 64, 8, 3, False),
    _cfg(128, 128, 64, 8, 3, False, ws=True),
    _cfg(128, 128, 64, 8, 4, False, ws=True),
    _cfg(128, 128, 64, 8, 3, True),
    _cfg(128, 256, 64, 8, 3, True),
    _cfg(128, 256, 64, 8, 4, True),
]
# Small M (decode) is weight-bandwidth-bound: BLOCK_M=16 (the smallest MMA), narrow BLOCK_N for
# enough programs to fill 132 SMs, long K tiles and 3-4 stages to keep loads in flight:
# 16x32x256 and 16x64x256 ran at 0.97-0.98x cuBLAS's time for the same GEMM at M=1 and M=16.
_DECODE = [
    _cfg(bm, bn, bk, 4, stages, False, group=1)
    for bm in (16, 32, 64)
    for bn, bk, stages in ((32, 256, 4), (64, 256, 3), (64, 128, 6), (128, 128, 4))
]
_FALLBACK = _cfg(64, 64, 32, 4, 2, False)  # fits any dtype (fp32 included)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    mb = named_args["M_BUCKET"]
    gated = bool(kwargs.get("GATED", named_args.get("GATED")))
    elem = named_args["h_ptr"].element_size()
    configs = [c for c in configs if smem_bytes(c, elem, gated) <= _SMEM_BYTES] or [_FALLBACK]
    if mb <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == max(16, mb)]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
        # two accumulators of 128x256 would spill: the 128x256 tile is for the non-gated kernel
        keep = [c for c in keep if not (gated and c.kwargs["BLOCK_N"] > 128)]
        keep = [c for c in keep if gated or c.kwargs["BLOCK_N"] > 128 or c.kwargs["WARP_SPEC"]]
    return keep or configs[:1]


def _set_descriptor_blocks(nargs: dict) -> None:
    """TMA descriptors carry their block shape, which depends on the config being tried."""
    if nargs["USE_TMA"]:
        nargs["x"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


_launch = Launcher(
    _gemm_act_kernel,
    _PREFILL + _DECODE,
    key=["M_BUCKET", "N", "K", "GATED", "HAS_BIAS", "STORE_PRE", "USE_TMA"],
    prune=_prune,
    set_blocks=_set_descriptor_blocks,
)


def chosen_configs() -> dict[str, str]:
    """The autotuner's pick per key, for benchmark records."""
    return {str(k): str(v) for k, v in _launch.tuned.items()}


def gemm_act(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    activation: Activation,
    gated: bool,
    store_preact: bool = False,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h, pre): h = act(x @ Wg^T + bg) * (x @ Wu^T + bu) when ``gated`` (w = [Wg; Wu]), else
    h = act(x @ W^T + b); ``pre`` = x @ w^T + bias when ``store_preact``, else None.

    x [M, K] and w [rows, K] must have unit-stride columns; fp32 inputs use TF32 only when
    ``allow_tf32``. ``config`` forces a kernel config on CUDA (no autotuning).
    """
    M, K = x.shape
    rows, k_w = w.shape
    if k_w != K:
        raise ValueError(f"x has {K} columns but the weight has {k_w}")
    if gated and rows % 2:
        raise ValueError(f"gated weight needs an even number of rows, got {rows}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w need unit-stride columns")
    N = rows // 2 if gated else rows
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, rows), dtype=x.dtype, device=x.device) if store_preact else None
    if M == 0 or N == 0:
        return h, pre
    if K == 0:
        raise ValueError("K = 0: nothing to multiply")
    # Decode sizes take the pointer path: as fast on the GPU (gemm_sweep: 93.0 vs 93.2 us at M=1)
    # and no tensor-map encoding on the host, which dominates a launch this short.
    use_tma = M > 64 and tma_ok(x, w)
    pre_or_h = pre if pre is not None else h
    args = (
        descriptor(x) if use_tma else x, descriptor(w) if use_tma else w,
        bias if bias is not None else w, h, pre_or_h,
        M, N, K, m_bucket(M),
        x.stride(0), w.stride(0), h.stride(0), pre_or_h.stride(0),
    )
    ieee = x.dtype == torch.float32 and not allow_tf32
    meta = {
        "ACT": activation.code, "GATED": gated, "HAS_BIAS": bias is not None, "STORE_PRE": store_preact,
        "USE_TMA": use_tma, "DOT_PRECISION": "ieee" if ieee else "tf32",
    }
    if not x.is_cuda:
        _launch.interpret(args, meta, M, N)
        return h, pre

    key = (args[8], N, K, x.dtype, gated, bias is not None, store_preact, use_tma, ieee)
    _launch(key, tile_grid(M, N, x.device), args, meta, config)
    return h, pre
