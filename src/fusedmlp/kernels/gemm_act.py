"""GEMM with the (gated) activation in its epilogue: h = act(x @ Wg^T + bg) * (x @ Wu^T + bu).

Design limit: one pass over x and the merged gate|up weight W [2N, K] (gate rows first, the
module's own layout), two fp32 accumulators per output tile (gate and up columns n..n+BN), the
bias, activation and product applied in registers, and only h [M, N] written: the
[M, 2N] gate|up intermediate never reaches memory unless the caller asks for it (training saves
it for the backward: ``store_preact``). With ``gated=False`` the same kernel computes
h = act(x @ W^T + b) for FusedMLP.

The K loop, tile order and loads are the shared skeleton (gemm.py): TMA descriptors on Hopper,
pointers elsewhere (Ampere, and bf16 under Triton's CPU interpreter, whose descriptor emulation
returns garbage for bf16 as of Triton 3.9). This file holds the epilogue and the tiling choices.
Autotuned per (M bucket, N, K): a new M inside a bucket never re-tunes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from ..options import kernel_options
from . import gemm
from .dropout import Dropout
from .epilogue import act, dropout_keep
from .gemm import mainloop, tile_coords
from .profile import Cost, KernelProfile
from .runtime import dot_precision, to_storage


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
    # dropout of h (DROPOUT): the seed's address, p, 1 / (1 - p), the mask's width and first column
    seed_ptr, drop_p, drop_scale, drop_width, drop_col0,
    # meta
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,  # one program per SM walking the tiles (else one per tile)
    WARP_SPEC: tl.constexpr,  # producer/consumer warp specialisation of the K loop
    DEVICE_DESC: tl.constexpr = False,  # x and w are pointers; TMA descriptors are made here
    DROPOUT: tl.constexpr = False,  # h dropped in the epilogue (kernels/dropout.py)
):
    if DEVICE_DESC:  # launches from traced code, which can pass no host descriptor
        x = tl.make_tensor_descriptor(x, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_rows = N
        if GATED:
            w_rows = 2 * N
        w = tl.make_tensor_descriptor(
            w, shape=[w_rows, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_g, acc_u = mainloop(
            x, w, off_m, off_n, M, N, K, stride_xm, stride_wn, N,
            USE_TMA, False, GATED, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPEC,
        )

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
        h = act(acc_g, ACT)
        if GATED:
            h = h * acc_u
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rows, cols[None, :], drop_width, drop_col0, drop_p)
            h = tl.where(keep, h * drop_scale, 0.0)
        tl.store(h_ptr + rows * stride_hm + cols[None, :], to_storage(h, h_ptr.dtype.element_ty), mask=mask)


def _gluon() -> Any:
    """kernels/gluon_gemm.py, imported on first use (only where the option asks for it)."""
    try:
        from . import gluon_gemm
    except ImportError as e:
        raise RuntimeError(
            f"KernelOptions.gluon needs a Triton with Gluon's Hopper ops (3.6 or later): {e}"
        ) from e
    return gluon_gemm


def _gluon_serves(x: Tensor, w: Tensor, activation: Activation, store_pre: bool, traced: bool) -> bool:
    return kernel_options().gluon and _gluon().serves(x, w, activation, store_pre, traced)


def cost(M: int, K: int, N: int, gated: bool, bias: bool, elem: int) -> Cost:
    """One forward launch: x [M, K] and W [(2)N, K] read, h [M, N] written (gate|up never)."""
    rows = 2 * N if gated else N
    return Cost(2 * M * K * rows, (M * K + rows * K + (rows if bias else 0) + M * N) * elem, M * N * elem)


PROFILES = [KernelProfile("_gemm_act_kernel", "GEMM with (gated) activation epilogue", gemm=True, cost=cost)]

# ---------------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------------
cfg = gemm.config

# Large M, from the sweep in benchmarks/gemm_sweep.py (H100, bf16, 2026-11-25): 128x128x64,
# 3 stages, 8 warps, one program per tile is the best gated config (geglu-article 141 us vs 157
# persistent; 4 warps spill the two 128x128 fp32 accumulators and run 4-5x slower, so none are
# listed). The non-gated kernel does the same work as one 128x256 tile, best persistent (84 us).
_PREFILL = [
    cfg(128, 128, 64, 8, 3, False),
    cfg(128, 128, 64, 8, 3, False, ws=True),
    cfg(128, 128, 64, 8, 4, False, ws=True),
    cfg(128, 128, 64, 8, 3, True),
    cfg(128, 256, 64, 8, 3, True),
    cfg(128, 256, 64, 8, 4, True),
]
# Small M (decode) is weight-bandwidth-bound: BLOCK_M=16 (the smallest MMA), narrow BLOCK_N for
# enough programs to fill 132 SMs, long K tiles and 3-4 stages to keep loads in flight:
# 16x32x256 and 16x64x256 ran at 0.97-0.98x cuBLAS's time for the same GEMM at M=1 and M=16.
_DECODE = [
    cfg(bm, bn, bk, 4, stages, False, group=1)
    for bm in (16, 32, 64)
    for bn, bk, stages in ((32, 256, 4), (64, 256, 3), (64, 128, 6), (128, 128, 4))
]
_FALLBACK = cfg(64, 64, 32, 4, 2, False)  # fits any dtype (fp32 included)


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    mb = named_args["M_BUCKET"]
    gated = bool(kwargs.get("GATED", named_args.get("GATED")))
    elem = named_args["h_ptr"].element_size()
    configs = gemm.fits(configs, elem, b_tiles=2 if gated else 1) or [_FALLBACK]
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


CONFIGS = _PREFILL + _DECODE
LAUNCHER = gemm.Launcher(
    _gemm_act_kernel,
    CONFIGS,
    key=["M_BUCKET", "N", "K", "GATED", "HAS_BIAS", "STORE_PRE", "USE_TMA"],
    prune=prune_configs,
    set_blocks=_set_descriptor_blocks,
)
chosen_configs = LAUNCHER.chosen


def gemm_act(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    activation: Activation,
    gated: bool,
    store_preact: bool = False,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
    traced: bool = False,
    out: Tensor | None = None,
    dropout: Dropout | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h, pre): h = act(x @ Wg^T + bg) * (x @ Wu^T + bu) when ``gated`` (w = [Wg; Wu]), else
    h = act(x @ W^T + b); ``pre`` = x @ w^T + bias when ``store_preact``, else None.

    x [M, K] and w [rows, K] must have unit-stride columns; fp32 inputs use TF32 only when
    ``allow_tf32``. ``config`` forces a kernel config on CUDA (no autotuning). ``traced``: called
    from a triton_op body (torch.compile): launched through wrap_triton, descriptors made on the
    device, the config picked without timing. ``out``: a [M, N] buffer (or view) for h.
    ``dropout``: h dropped in the epilogue, as nn.Dropout drops it (kernels/dropout.py); ``pre``
    is stored undropped.
    """
    M, K = x.shape
    rows, k_w = w.shape
    if k_w != K:
        raise ValueError(f"x has {K} columns but the weight has {k_w}")
    if gated and rows % 2:
        raise ValueError(f"gated weight needs an even number of rows, got {rows}")
    # one column, or no row: the column stride is never used
    if K > 1 and ((M > 0 and x.stride(1) != 1) or (rows > 0 and w.stride(1) != 1)):
        raise ValueError("x and w need unit-stride columns")
    N = rows // 2 if gated else rows
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    pre = torch.empty((M, rows), dtype=x.dtype, device=x.device) if store_preact else None
    if M == 0 or N == 0:
        return h, pre
    if K == 0:
        raise ValueError("K = 0: nothing to multiply")
    if config is None and dropout is None and _gluon_serves(x, w, activation, store_preact, traced):
        g = _gluon()
        bias_ = bias.contiguous() if bias is not None else None
        return g.gemm_act_fwd(x, w, bias_, activation, gated, False, g.fwd_config(gated, K), out=h)
    # Decode sizes take the pointer path: as fast on the GPU (gemm_sweep: 93.0 vs 93.2 us at M=1)
    # and no tensor-map encoding on the host, which dominates a launch this short.
    use_tma = M > 64 and gemm.tma_ok(x, w, traced=traced)
    pre_or_h = pre if pre is not None else h
    drop = dropout.args() if dropout is not None else Dropout.no_args(h, N)
    if traced:
        args = (x, w, bias if bias is not None else w, h, pre_or_h, M, N, K, gemm.m_bucket(M),
                x.stride(0), w.stride(0), h.stride(0), pre_or_h.stride(0), *drop)
        meta = {
            "ACT": activation.code, "GATED": gated, "HAS_BIAS": bias is not None, "STORE_PRE": store_preact,
            "USE_TMA": use_tma, "DOT_PRECISION": dot_precision(x.dtype, allow_tf32), "DEVICE_DESC": use_tma,
            "DROPOUT": dropout is not None,
        }
        key = (args[8], N, K, x.dtype, gated, bias is not None, store_preact, use_tma,
               meta["DOT_PRECISION"], x.device.index)
        LAUNCHER.traced(key, gemm.tile_grid(M, N, x.device), args, meta)
        return h, pre
    args = (
        gemm.descriptor(x) if use_tma else x, gemm.descriptor(w) if use_tma else w,
        bias if bias is not None else w, h, pre_or_h,
        M, N, K, gemm.m_bucket(M),
        x.stride(0), w.stride(0), h.stride(0), pre_or_h.stride(0),
        *drop,
    )
    precision = dot_precision(x.dtype, allow_tf32)
    meta = {
        "ACT": activation.code, "GATED": gated, "HAS_BIAS": bias is not None, "STORE_PRE": store_preact,
        "USE_TMA": use_tma, "DOT_PRECISION": precision, "DROPOUT": dropout is not None,
    }
    if not x.is_cuda:
        LAUNCHER.interpret(args, meta, M, N)
        return h, pre

    key = (args[8], N, K, x.dtype, gated, bias is not None, store_preact, use_tma, precision, x.device.index)
    LAUNCHER(key, gemm.tile_grid(M, N, x.device), args, meta, config)
    return h, pre
