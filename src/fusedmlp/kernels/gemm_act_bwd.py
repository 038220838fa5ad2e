"""Backward GEMM with the activation's derivative in its epilogue: d(gate|up) from dy.

Design limit: dh = dy @ W_out is computed tile by tile and never stored; the epilogue loads the
saved (or recomputed) gate|up values of its tile and writes d(gate|up) straight into the merged
[M, 2N] layout that the two weight-gradient GEMMs read, and, unless h was saved, h itself for
W_out's gradient. d(gate|up) may overwrite gate|up in place: each element is read, then written,
by the one program that owns it. With ``gated=False`` the same kernel gives dz = dh * act'(z).

Shapes: dy [M, D] (the GEMM's K is D), W_out [D, N] row-major (so B tiles are [BK, BN] slices of
it, loaded as they lie), pre and dpre [M, 2N] (or [M, N]), h [M, N].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from . import gemm
from .epilogue import act_and_grad
from .gemm import mainloop, tile_coords
from .profile import KernelProfile
from .runtime import dot_precision, to_storage


@triton.jit
def _gemm_act_bwd_kernel(
    # tensors: dy [M, K]; w [K, N] (W_out); pre, dpre [M, 2N] gate|up (or [M, N]); h [M, N]
    dy, w, pre_ptr, dpre_ptr, h_ptr,
    # sizes: N is the intermediate width, K the model width
    M, N, K,
    M_BUCKET,  # autotune key only
    # row strides (columns unit-stride); dy and w strides serve the pointer path only
    stride_dym, stride_wk, stride_pm, stride_dpm, stride_hm,
    # meta
    ACT: tl.constexpr, GATED: tl.constexpr, STORE_H: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, WARP_SPEC: tl.constexpr,
    DEVICE_DESC: tl.constexpr = False,  # dy and w are pointers; TMA descriptors are made here
):
    if DEVICE_DESC:  # launches from traced code, which can pass no host descriptor
        dy = tl.make_tensor_descriptor(
            dy, shape=[M, K], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
        w = tl.make_tensor_descriptor(w, shape=[K, N], strides=[stride_wk, 1], block_shape=[BLOCK_K, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc, _ = mainloop(
            dy, w, off_m, off_n, M, N, K, stride_dym, stride_wk, 0,
            USE_TMA, True, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPEC,
        )

        # epilogue: dh (in acc) meets the saved pre-activation of this tile
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows = rows.to(tl.int64)[:, None]
        cols = cols[None, :]
        pre = pre_ptr + rows * stride_pm + cols
        dpre = dpre_ptr + rows * stride_dpm + cols
        h_out = h_ptr + rows * stride_hm + cols
        g = tl.load(pre, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            u = tl.load(pre + N, mask=mask, other=0.0).to(tl.float32)
            a, dg = act_and_grad(g, acc * u, ACT)
            tl.store(dpre + N, to_storage(acc * a, dpre_ptr.dtype.element_ty), mask=mask)
            if STORE_H:
                tl.store(h_out, to_storage(a * u, h_ptr.dtype.element_ty), mask=mask)
        else:
            a, dg = act_and_grad(g, acc, ACT)
            if STORE_H:
                tl.store(h_out, to_storage(a, h_ptr.dtype.element_ty), mask=mask)
        tl.store(dpre, to_storage(dg, dpre_ptr.dtype.element_ty), mask=mask)


PROFILES = [
    KernelProfile("_gemm_act_bwd_kernel", "backward GEMM with activation-derivative epilogue", gemm=True)
]
cfg = gemm.config

# One fp32 accumulator per tile plus an epilogue that reads 2 and writes 2-3 tiles: the forward's
# 128x128x64 / 8 warps shape, and a 128x256 tile for more reuse of each dy tile.
CONFIGS = [
    cfg(128, 128, 64, 8, 3, False),
    cfg(128, 128, 64, 8, 4, False),
    cfg(128, 256, 64, 8, 3, False),
    cfg(128, 128, 64, 8, 3, True),
    cfg(64, 128, 64, 4, 4, False),
]
_SMALL = cfg(32, 64, 64, 4, 3, False, group=1)  # M <= 64


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    elem = named_args["h_ptr"].element_size()
    keep = gemm.fits(configs, elem, b_tiles=1)
    return (keep if named_args["M_BUCKET"] > 64 else [_SMALL]) or [_SMALL]


def _set_blocks(nargs: dict) -> None:
    if nargs["USE_TMA"]:
        nargs["dy"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


LAUNCHER = gemm.Launcher(
    _gemm_act_bwd_kernel,
    [*CONFIGS, _SMALL],
    key=["M_BUCKET", "N", "K", "GATED", "STORE_H", "USE_TMA"],
    prune=_prune,
    set_blocks=_set_blocks,
)


def gemm_act_backward(
    dy: Tensor,
    w_out: Tensor,
    pre: Tensor,
    activation: Activation,
    gated: bool,
    dpre: Tensor | None = None,
    store_h: bool = True,
    allow_tf32: bool = False,
    traced: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(d pre, h or None) for dh = dy @ w_out: d(gate|up) [M, 2N] (or dz [M, N]), and h [M, N]
    when ``store_h``. ``dpre`` may be ``pre`` itself (in place). fp32 operands use TF32 only
    when ``allow_tf32``. ``traced``: as for gemm_act.gemm_act."""
    M, K = dy.shape
    k_w, N = w_out.shape
    if k_w != K:
        raise ValueError(f"dy has {K} columns but w_out has {k_w} rows")
    if tuple(pre.shape) != (M, (2 if gated else 1) * N):
        raise ValueError(f"pre has shape {tuple(pre.shape)}; expected ({M}, {(2 if gated else 1) * N})")
    dpre = torch.empty_like(pre) if dpre is None else dpre
    h = torch.empty((M, N), dtype=dy.dtype, device=dy.device) if store_h else None
    if M == 0 or N == 0:
        return dpre, h
    for name, t in (("dy", dy), ("w_out", w_out), ("pre", pre), ("dpre", dpre)):
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name} needs unit-stride columns")
    use_tma = M > 64 and gemm.tma_ok(dy, w_out, traced=traced)
    hh = h if h is not None else dpre
    if traced:
        args = (dy, w_out, pre, dpre, hh, M, N, K, gemm.m_bucket(M),
                dy.stride(0), w_out.stride(0), pre.stride(0), dpre.stride(0), hh.stride(0))
        precision = dot_precision(dy.dtype, allow_tf32)
        meta = {"ACT": activation.code, "GATED": gated, "STORE_H": store_h, "USE_TMA": use_tma,
                "DOT_PRECISION": precision, "DEVICE_DESC": use_tma}
        key = (args[8], N, K, dy.dtype, gated, store_h, use_tma, precision, dy.device.index)
        LAUNCHER.traced(key, gemm.tile_grid(M, N, dy.device), args, meta)
        return dpre, h
    args = (
        gemm.descriptor(dy) if use_tma else dy, gemm.descriptor(w_out) if use_tma else w_out, pre, dpre, hh,
        M, N, K, gemm.m_bucket(M),
        dy.stride(0), w_out.stride(0), pre.stride(0), dpre.stride(0), hh.stride(0),
    )
    precision = dot_precision(dy.dtype, allow_tf32)
    meta = {"ACT": activation.code, "GATED": gated, "STORE_H": store_h, "USE_TMA": use_tma,
            "DOT_PRECISION": precision}
    if not dy.is_cuda:
        LAUNCHER.interpret(args, meta, M, N)
        return dpre, h

    key = (args[8], N, K, dy.dtype, gated, store_h, use_tma, precision, dy.device.index)
    LAUNCHER(key, gemm.tile_grid(M, N, dy.device), args, meta)
    return dpre, h
