"""Pointwise (gated) activation, forward and backward: h = act(g) * u, or h = act(x).

Design limit: memory-bound elementwise work over 2-D row-major views [M, N] whose columns are
unit-stride and whose rows have any stride, so the gate and up halves of a merged [M, 2N]
gate|up buffer are read in place (row stride 2N) and the backward writes d(gate|up) straight
into the merged layout that the following GEMMs consume. Math is fp32, storage bf16/fp16/fp32.
The backward recomputes act(g) from g instead of saving it.

Row offsets are computed in int64: M * row_stride passes 2^31 for ordinary LLM shapes
(M=65536 tokens x 2*14336 columns), and one 64-bit multiply per row costs nothing in a
memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from .dropout import Dropout
from .epilogue import act, act_and_grad, dropout_keep
from .launch import PlannedKernel, plan_key, traced_launch
from .profile import KernelProfile
from .runtime import cdiv, next_power_of_2, to_storage


@triton.jit
def _act_fwd_kernel(
    # pointers
    x_ptr, up_ptr, h_ptr,
    # sizes
    M, N,
    # row strides (columns are unit-stride)
    stride_xm, stride_um, stride_hm,
    # dropout of h (DROPOUT): the seed's address, p, 1 / (1 - p), the mask's width and first column
    seed_ptr, drop_p, drop_scale, drop_width, drop_col0,
    # meta
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows[:, None]
    cols = cols[None, :]

    h = act(tl.load(x_ptr + rows * stride_xm + cols, mask=mask).to(tl.float32), ACT)
    if GATED:
        h = h * tl.load(up_ptr + rows * stride_um + cols, mask=mask).to(tl.float32)
    if DROPOUT:
        h = tl.where(dropout_keep(seed_ptr, rows, cols, drop_width, drop_col0, drop_p), h * drop_scale, 0.0)
    tl.store(h_ptr + rows * stride_hm + cols, to_storage(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    # pointers; h_ptr receives the recomputed forward output when STORE_H
    dh_ptr, x_ptr, up_ptr, dx_ptr, dup_ptr, h_ptr,
    # sizes
    M, N,
    # row strides (columns are unit-stride)
    stride_dhm, stride_xm, stride_um, stride_dxm, stride_dum, stride_hm,
    # dropout of h in the forward (DROPOUT): dh is the gradient of the dropped h; the mask is
    # regenerated (epilogue.dropout_keep), h stored dropped
    seed_ptr, drop_p, drop_scale, drop_width, drop_col0,
    # meta
    ACT: tl.constexpr, GATED: tl.constexpr, STORE_H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows[:, None]
    cols = cols[None, :]

    dh = tl.load(dh_ptr + rows * stride_dhm + cols, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + rows * stride_xm + cols, mask=mask).to(tl.float32)
    if DROPOUT:  # d h = d(dropped h) * keep / (1 - p), as torch's dropout backward computes it
        keep = dropout_keep(seed_ptr, rows, cols, drop_width, drop_col0, drop_p)
        dh = dh * tl.where(keep, drop_scale, 0.0)
    if GATED:
        u = tl.load(up_ptr + rows * stride_um + cols, mask=mask).to(tl.float32)
        a, dx = act_and_grad(x, dh * u, ACT)
        tl.store(dup_ptr + rows * stride_dum + cols, to_storage(dh * a, dup_ptr.dtype.element_ty), mask=mask)
        a = a * u
    else:
        a, dx = act_and_grad(x, dh, ACT)
    if STORE_H:
        if DROPOUT:  # the forward's dropped h: exactly 0 where dropped, as there
            a = tl.where(keep, a * drop_scale, 0.0)
        tl.store(h_ptr + rows * stride_hm + cols, to_storage(a, h_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + rows * stride_dxm + cols, to_storage(dx, dx_ptr.dtype.element_ty), mask=mask)


PROFILES = [
    KernelProfile("_act_fwd_kernel", "(gated) activation forward", gemm=False),
    KernelProfile("_act_bwd_kernel", "(gated) activation backward", gemm=False),
]


_FWD = PlannedKernel(_act_fwd_kernel)
_BWD = PlannedKernel(_act_bwd_kernel)


def _blocks(N: int) -> tuple[int, int, int]:
    # About 4096 elements per program: 8 warps each moving two 16-byte vectors per tensor, enough
    # bytes in flight per SM to run these kernels at copy bandwidth on H100.
    block_n = min(next_power_of_2(max(N, 1)), 1024)
    block_m = max(1, 4096 // block_n)
    return block_m, block_n, 8


def _check_rows(name: str, t: Tensor, M: int, N: int) -> None:
    if t.dim() != 2 or tuple(t.shape) != (M, N):
        raise ValueError(f"{name}: expected shape ({M}, {N}), got {tuple(t.shape)}")
    if t.stride(1) != 1 and N > 1 and M > 0:  # an empty tensor's strides mean nothing
        raise ValueError(f"{name}: columns must be unit-stride, got strides {t.stride()}")


def gated_act_forward(
    x: Tensor,
    up: Tensor | None,
    activation: Activation,
    out: Tensor | None = None,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> Tensor:
    """h = act(x) * up (or act(x) when up is None) over 2-D views [M, N]; returns h [M, N].
    ``traced``: launched from a triton_op body (torch.compile), through wrap_triton.
    ``dropout``: h dropped as nn.Dropout drops it (kernels/dropout.py)."""
    M, N = x.shape
    _check_rows("x", x, M, N)
    if up is not None:
        _check_rows("up", up, M, N)
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    _check_rows("out", h, M, N)
    if M == 0 or N == 0:
        return h
    block_m, block_n, warps = _blocks(N)
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    args = (
        x, x if up is None else up, h,
        M, N,
        x.stride(0), 0 if up is None else up.stride(0), h.stride(0),
        *(dropout.args() if dropout is not None else Dropout.no_args(x, N)),
    )
    meta = {
        "ACT": activation.code, "GATED": up is not None, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "DROPOUT": dropout is not None,
    }
    if traced:
        traced_launch(_act_fwd_kernel, grid, args, meta, num_warps=warps)
    else:
        _FWD.launch(plan_key(x, meta, args), grid, args, meta, num_warps=warps)
    return h


def gated_act_backward(
    dh: Tensor,
    x: Tensor,
    up: Tensor | None,
    activation: Activation,
    dx: Tensor,
    dup: Tensor | None,
    h: Tensor | None = None,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> None:
    """Writes dx (and dup when gated) of h = act(x) * up given dh, and h itself when given
    (the training backward needs it for the down-projection's weight gradient); 2-D views [M, N].
    ``traced``: as for :func:`gated_act_forward`. ``dropout``: the forward's dropout of h: dh is
    the gradient of the dropped h, the mask is regenerated, h is written dropped."""
    M, N = x.shape
    for name, t in (("dh", dh), ("x", x), ("up", up), ("dx", dx), ("dup", dup), ("h", h)):
        if t is not None:
            _check_rows(name, t, M, N)
    if (up is None) != (dup is None):
        raise ValueError("up and dup must be given together")
    if M == 0 or N == 0:
        return
    block_m, block_n, warps = _blocks(N)
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    args = (
        dh, x, x if up is None else up, dx, dx if dup is None else dup, dx if h is None else h,
        M, N,
        dh.stride(0), x.stride(0), 0 if up is None else up.stride(0), dx.stride(0),
        0 if dup is None else dup.stride(0), 0 if h is None else h.stride(0),
        *(dropout.args() if dropout is not None else Dropout.no_args(x, N)),
    )
    meta = {
        "ACT": activation.code, "GATED": up is not None, "STORE_H": h is not None,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "DROPOUT": dropout is not None,
    }
    if traced:
        traced_launch(_act_bwd_kernel, grid, args, meta, num_warps=warps)
    else:
        _BWD.launch(plan_key(x, meta, args), grid, args, meta, num_warps=warps)
