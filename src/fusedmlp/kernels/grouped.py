"""Grouped GEMMs for mixture-of-experts layers: one launch multiplies every expert's rows by its
own weight, tokens already sorted by expert.

Design limit: the rows of expert e are rows ``offsets[e] .. offsets[e+1]-1`` of the row-sorted
inputs, ``offsets`` a device tensor of E+1 int64 that the host never reads (no .item(), no
synchronisation: the launch path sizes everything from the host-known N and E). A row tile of
BLOCK_M rows never spans two experts, so expert e takes cdiv(n_e, BLOCK_M) tiles and all of
them together take at most N // BLOCK_M + min(E, N): the grid is sized by that bound and the
programs past the real tile count return at once. Each program finds its expert in the kernel:
it loads the E+1 offsets (one vector load, L2-resident, well under 1% of the bytes a tile of
a realistic GEMM reads), clamps them into [0, N] (so that bad offsets give wrong numbers, never an access
outside the tensors), takes the inclusive cumsum of the per-expert tile counts, and counts the
experts whose tiles end at or before its own tile. No prologue kernel, no torch ops in between.

Kernels (all portable pointer-path Triton, fp32 accumulation in registers, bias, activation,
routing weight applied in registers, one rounding to the storage dtype on store):

- ``_grouped_gate_up_kernel``: h = act(x @ Wg[e]^T + bg[e]) * (x @ Wu[e]^T + bu[e]) with two
  accumulators against one x tile (as gemm_act.py's gated path), or gpt-oss's clamped SwiGLU;
  optionally stores gate|up before the activation (training keeps it for the backward).
- ``_grouped_matmul_kernel``: c = (a @ B[e] + bias[e]) * row_scale, for the down projection
  (row_scale: the routing weight) and the input gradients. B is read through its three strides,
  so [E, Nout, K] (F.linear's layout), [E, K, Nout] and transposed views of either serve without
  a copy; Triton specializes a stride equal to 1, so the contiguous direction loads vectorised.
- ``_grouped_weight_grad_kernel``: out[e] = a[rows_e]^T @ b[rows_e], a program per (output
  tile, expert) reducing over the expert's rows (zeros for an expert without rows).
- ``_segment_sum_kernel``: the per-expert column sums (bias gradients).

Precision: bf16/fp16 operands multiply exactly into fp32 accumulators; fp32 operands use IEEE
dots unless TF32 is allowed for matmuls (``torch.backends.cuda.matmul.allow_tf32``, as eager),
``runtime.dot_precision``. Note that dispatch.fused_gemm_ok routes fp32 GEMMs of the dense MLP
to cuBLAS because Triton's fp32 dots missed the contract on H100; these kernels serve fp32 for
completeness and are checked under the interpreter only.

Dispatch: the kernels serve fp16, bf16 and fp32 tensors on CUDA, and on the CPU under Triton's
interpreter (how CI runs them; :func:`kernels_serve`). Anything else (float64, a CPU without the
interpreter) runs the grouped references in fusedmlp/reference.py, which loop over the experts on the host
and so read ``offsets`` there (a synchronisation on a GPU).

Configs are fixed (no autotuning): BLOCK_N 128, BLOCK_K 64 (32 for fp32, to fit 3 stages in
shared memory), BLOCK_M 128 with 8 warps, or 64 with 4 warps where experts average fewer than
128 rows (a partial last tile per expert wastes less). Under the interpreter, small blocks.
Launches go through launch plans (launch.py) after the first call per specialization.
Future work: the Hopper-speed path (TMA loads, warp-specialised wgmma pipelines, a persistent
scheduler over all experts' tiles, autotuned configs), split-K over rows for the weight and
bias gradients when few experts hold many rows, an fp32 (or accumulate-into) output for weight
gradients, and torch.library registration with fake kernels (ops/).

Compiled for sm_90a (Triton 3.6, bf16): the gate|up kernel uses 255 registers with 0-172 bytes
of spill stores (gemm_act.py's gated kernel: 250-255, 0-32), the others 110-226 and none.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..activations import Activation, resolve
from . import INTERPRETING
from .epilogue import act
from .gemm import SMEM_PIPELINE_BUDGET
from .launch import PlannedKernel, plan_key
from .profile import KernelProfile
from .runtime import cdiv, dot_precision, mma, next_power_of_2, to_storage

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expert_bounds(offsets, e, N):
    """(first row, end row) of expert ``e`` (any shape of int), clamped into [0, N] and ordered:
    whatever ``offsets`` holds, no row outside the tensors is touched."""
    lo = tl.load(offsets + e)
    hi = tl.load(offsets + e + 1)
    lo = tl.minimum(tl.maximum(lo, 0), N)
    hi = tl.minimum(tl.maximum(hi, lo), N)
    return lo, hi


@triton.jit
def _tile_expert(tile, offsets, N, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of row tile ``tile``, the expert >= E for a tile past the
    last real one. Expert e's tiles follow those of experts < e, cdiv(n_e, BLOCK_M) of them."""
    e = tl.arange(0, E_POW2)
    in_range = e < E
    lo, hi = _expert_bounds(offsets, tl.where(in_range, e, 0), N)
    lo = tl.where(in_range, lo, 0)
    hi = tl.where(in_range, hi, 0)
    tiles = ((hi - lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    ends = tl.cumsum(tiles, 0)  # inclusive: expert e's tiles end where expert e+1's begin
    expert = tl.sum((ends <= tile).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (tile - first_tile).to(tl.int64) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row0, row_end


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order (gemm.tile_coords with the row tile count given): GROUP_M consecutive
    row tiles sweep the column tiles together, for L2 reuse of x rows and expert weights."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _k_loop(
    a, b, rows, off_n, Nout, K,
    stride_am, stride_bn, stride_bk,
    B1,  # TWO_B: the second B operand starts this many elements after the first
    TWO_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(A @ B0, A @ B1) in fp32 over A's first ``rows`` rows (A unit-stride columns) and B's
    columns off_n..off_n+BLOCK_N (B element (k, n) at b + n * stride_bn + k * stride_bk). A's
    rows past the end are clamped to the first (its contiguous axis is K, which a clamp of the
    rows leaves vectorisable); B's columns past the end are masked, not clamped: B may be
    contiguous along n (the backward's un-transposed weights), and a clamped index hides that
    from Triton's contiguity analysis (scalar loads: 7x slower, measured on the H200). Results
    past the ends land where the epilogue stores nothing. The second result is zeros unless
    TWO_B."""
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rm = tl.arange(0, BLOCK_M)
    rm = tl.where(rm < rows, rm, 0).to(tl.int64)
    rn = off_n + tl.arange(0, BLOCK_N)
    n_ok = rn < Nout
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    for kt in range(tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kt * BLOCK_K
        b_ok = k_ok[:, None] & n_ok[None, :]
        ta = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        tb = tl.load(b_ptrs, mask=b_ok, other=0.0)
        acc0 = mma(ta, tb, acc0, PRECISION)
        if TWO_B:
            tb1 = tl.load(b_ptrs + B1, mask=b_ok, other=0.0)
            acc1 = mma(ta, tb1, acc1, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc0, acc1


@triton.jit
def _grouped_gate_up_kernel(
    # tensors: x [N, D]; w [E, 2, H, D] (expert e's gate rows, then its up rows); bias [E, 2, H];
    # offsets [E + 1] int64; h [N, H]; pre [N, 2H] receives gate|up when STORE_PRE
    x, w, bias_ptr, offsets, h_ptr, pre_ptr,
    # sizes; M_TILES bounds the row tiles (N // BLOCK_M + min(E, N))
    N, H, D, E, M_TILES,
    # strides: x, h, pre rows (unit-stride columns); w all four; bias expert and gate->up
    stride_xm, stride_we, stride_wg, stride_wh, stride_wd, stride_be, stride_bg, stride_hm, stride_pm,
    # gpt-oss clamped SwiGLU (GPT_OSS): h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g),
    # g = min(gate, limit)
    alpha, limit,
    # meta
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, GPT_OSS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,  # next power of two >= E: the width of the expert search
):
    pid_m, pid_n = _swizzle(tl.program_id(0), M_TILES, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert, row0, row_end = _tile_expert(pid_m, offsets, N, E, BLOCK_M, E_POW2)
    if expert >= E:  # past the last real tile
        return
    off_n = pid_n * BLOCK_N
    w_e = w + expert.to(tl.int64) * stride_we
    acc_g, acc_u = _k_loop(
        x + row0 * stride_xm, w_e, row_end - row0, off_n, H, D,
        stride_xm, stride_wh, stride_wd, stride_wg,
        True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )

    # epilogue: bias, optional pre-activation store, gated activation, one store of h
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    mask = (rows < row_end)[:, None] & col_ok[None, :]
    rows = rows[:, None]
    if HAS_BIAS:
        b_e = bias_ptr + expert.to(tl.int64) * stride_be + cols
        acc_g += tl.load(b_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_e + stride_bg, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        pre = pre_ptr + rows * stride_pm + cols[None, :]
        tl.store(pre, to_storage(acc_g, pre_ptr.dtype.element_ty), mask=mask)
        tl.store(pre + H, to_storage(acc_u, pre_ptr.dtype.element_ty), mask=mask)
    if GPT_OSS:
        # selects, not tl.minimum/maximum: a NaN passes through, as through torch.clamp
        g = tl.where(acc_g > limit, limit, acc_g)
        u = tl.where(acc_u > limit, limit, tl.where(acc_u < -limit, -limit, acc_u))
        h = g * tl.sigmoid(g * alpha) * (u + 1.0)
    else:
        h = act(acc_g, ACT) * acc_u
    tl.store(h_ptr + rows * stride_hm + cols[None, :], to_storage(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_matmul_kernel(
    # tensors: a [N, K]; b: expert e's element (k, n) at b + e*stride_be + n*stride_bn + k*stride_bk;
    # bias [E, Nout]; scale [N] (the routing weight); offsets [E + 1] int64; c [N, Nout];
    # c_rows [N] int64 (SCATTER): row r of the result is stored at row c_rows[r] of c
    a, b, bias_ptr, scale_ptr, offsets, c_ptr, c_rows_ptr,
    # sizes; M_TILES bounds the row tiles (N // BLOCK_M + min(E, N))
    N, Nout, K, E, M_TILES,
    # strides: a and c rows (unit-stride columns); b all three; bias expert and column; scale
    stride_am, stride_be, stride_bn, stride_bk, stride_biase, stride_biasn, stride_s, stride_cm,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SCATTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,  # next power of two >= E: the width of the expert search
):
    pid_m, pid_n = _swizzle(tl.program_id(0), M_TILES, tl.cdiv(Nout, BLOCK_N), GROUP_M)
    expert, row0, row_end = _tile_expert(pid_m, offsets, N, E, BLOCK_M, E_POW2)
    if expert >= E:  # past the last real tile
        return
    off_n = pid_n * BLOCK_N
    acc, _ = _k_loop(
        a + row0 * stride_am, b + expert.to(tl.int64) * stride_be, row_end - row0, off_n, Nout, K,
        stride_am, stride_bn, stride_bk, 0,
        False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )

    # epilogue: bias, then the routing weight, one store
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    col_ok = cols < Nout
    row_ok = rows < row_end
    if HAS_BIAS:
        b_e = bias_ptr + expert.to(tl.int64) * stride_biase + cols * stride_biasn
        acc += tl.load(b_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_rows = tl.load(c_rows_ptr + rows, mask=row_ok, other=0) if SCATTER else rows
    c = c_ptr + out_rows[:, None] * stride_cm + cols[None, :]
    tl.store(c, to_storage(acc, c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
    # tensors: a [N, Ka], b [N, Kb] (unit-stride columns); offsets [E + 1] int64; out [E, Ka, Kb]
    a, b, offsets, out_ptr,
    # sizes
    N, Ka, Kb,
    # strides: a and b rows; out expert and row (unit-stride columns)
    stride_am, stride_bm, stride_oe, stride_om,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[e] tile (pid_m, pid_n) = sum over the expert's rows r of a[r, m]^T b[r, n]; the rows
    are the reduction axis, BLOCK_K at a time (masked to the expert, so zeros past its end).
    The columns, a's and b's contiguous axis, are masked rather than clamped so that the loads
    stay vectorised (see _k_loop)."""
    expert = tl.program_id(1)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(Ka, BLOCK_M), tl.cdiv(Kb, BLOCK_N), GROUP_M)
    lo, hi = _expert_bounds(offsets, expert, N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < Ka
    n_ok = rn < Kb
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a + (lo + rk)[:, None] * stride_am + rm[None, :]
    b_ptrs = b + (lo + rk)[:, None] * stride_bm + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(tl.cdiv(hi - lo, BLOCK_K).to(tl.int32)):
        r_ok = rk < hi - lo - kt * BLOCK_K
        ta = tl.load(a_ptrs, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        tb = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(tl.trans(ta), tb, acc, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_am
        b_ptrs += BLOCK_K * stride_bm
    out = out_ptr + expert.to(tl.int64) * stride_oe + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, to_storage(acc, out_ptr.dtype.element_ty), mask=(rm < Ka)[:, None] & (rn < Kb)[None, :])


@triton.jit
def _segment_sum_kernel(
    # tensors: g [N, C] (unit-stride columns); offsets [E + 1] int64; out [E, C]
    g, offsets, out_ptr,
    # sizes, strides (rows)
    N, C, stride_gm, stride_oe,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[e, cols] = the sum of g over expert e's rows, a [BLOCK_M, BLOCK_N] fp32 partial per
    step (BLOCK_M independent sums per column), reduced once at the end."""
    expert = tl.program_id(1)
    lo, hi = _expert_bounds(offsets, expert, N)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    rk = tl.arange(0, BLOCK_M)
    ptrs = g + (lo + rk)[:, None] * stride_gm + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(tl.cdiv(hi - lo, BLOCK_M).to(tl.int32)):
        r_ok = rk < hi - lo - kt * BLOCK_M
        acc += tl.load(ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        ptrs += BLOCK_M * stride_gm
    total = tl.sum(acc, 0)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + cols, to_storage(total, out_ptr.dtype.element_ty),
             mask=col_ok)


PROFILES = [
    KernelProfile("_grouped_gate_up_kernel", "MoE grouped gate|up GEMM with gated activation", gemm=True),
    KernelProfile("_grouped_matmul_kernel", "MoE grouped GEMM (bias, routing weight)", gemm=True),
    KernelProfile("_grouped_weight_grad_kernel", "MoE grouped weight-gradient GEMM", gemm=True),
    KernelProfile("_segment_sum_kernel", "MoE per-expert bias gradient", gemm=False),
]

# ---------------------------------------------------------------------------------------------
# host side: configs, checks, launchers
# ---------------------------------------------------------------------------------------------

_GATE_UP = PlannedKernel(_grouped_gate_up_kernel)
_MATMUL = PlannedKernel(_grouped_matmul_kernel)
_WEIGHT_GRAD = PlannedKernel(_grouped_weight_grad_kernel)
_SEGMENT_SUM = PlannedKernel(_segment_sum_kernel)

# Under the interpreter: small tiles (numpy time grows with the tile), several tiles per expert.
_INTERPRETER_TILES = {
    "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1,
}


def kernels_serve(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors of ``dtype`` on ``device`` (as
    ``ops.dispatch.use_triton``): fp16/bf16/fp32 on CUDA, or on the CPU under Triton's
    interpreter. Everything else takes the grouped references in fusedmlp/reference.py."""
    if dtype not in KERNEL_DTYPES:
        return False
    return device.type == "cuda" or (INTERPRETING and device.type == "cpu")


def _gemm_tiles(dtype: torch.dtype, device: torch.device, n_rows: int, n_experts: int, b_tiles: int) -> dict:
    """The fixed config of a grouped GEMM over row tiles, ``b_tiles`` B tiles per A tile."""
    if device.type != "cuda":
        return dict(_INTERPRETER_TILES)
    # Each expert's last row tile is partial: with fewer than 128 rows per expert on average,
    # 64-row tiles waste less.
    bm, warps = (128, 8) if n_rows >= 128 * n_experts else (64, 4)
    bn, bk, stages = 128, 64, 3
    elem = torch.empty((), dtype=dtype).element_size()
    while (bm + b_tiles * bn) * bk * elem * stages > SMEM_PIPELINE_BUDGET:
        bk //= 2  # fp32: 32
    return {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages,
    }


def _weight_grad_tiles(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(_INTERPRETER_TILES)
    bk = 64 if dtype != torch.float32 else 32  # (128 + 128) x BK x 3 stages of shared memory
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _row_tiles(n_rows: int, n_experts: int, block_m: int) -> int:
    """The most row tiles any offsets can need: sum_e cdiv(n_e, BLOCK_M) over at most
    min(E, N) non-empty experts."""
    return n_rows // block_m + min(n_experts, n_rows)


def _search_width(n_experts: int) -> int:
    return max(16, next_power_of_2(n_experts))


def _check_offsets(offsets: Tensor, n_experts: int, device: torch.device) -> None:
    """Offsets' type, shape and device; never their values (that would synchronise)."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be a tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != n_experts + 1:
        raise ValueError(
            f"offsets must be 1-D with num_experts + 1 = {n_experts + 1} entries, "
            f"got shape {tuple(offsets.shape)}"
        )
    if offsets.device != device:
        raise ValueError(f"offsets are on {offsets.device}, the inputs on {device}")


def _check_rows(name: str, t: Tensor, cols: int | None = None) -> None:
    """A 2-D activation-like tensor with unit-stride columns."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} needs unit-stride columns, got strides {t.stride()}")


def _check_same(name: str, t: Tensor, like: Tensor, like_name: str, shape: tuple[int, ...]) -> None:
    """``t`` of ``shape``, on ``like``'s device, in ``like``'s dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must be {like.dtype} like {like_name}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, {like_name} on {like.device}")


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _output(out: Tensor | None, shape: tuple[int, int], like: Tensor) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    _check_same("out", out, like, "the input", shape)
    _check_rows("out", out)
    return out


def _check_gpt_oss(gpt_oss: tuple[float, float] | None, activation: Activation) -> tuple[float, float]:
    if gpt_oss is None:
        return 0.0, 0.0
    try:
        alpha, limit = (float(v) for v in gpt_oss)
    except (TypeError, ValueError) as e:
        raise TypeError(f"gpt_oss must be a pair of numbers (alpha, limit), got {gpt_oss!r}") from e
    if not (math.isfinite(alpha) and math.isfinite(limit) and limit > 0):
        raise ValueError(f"gpt_oss needs a finite alpha and a finite limit > 0, got {gpt_oss!r}")
    if activation is not Activation.SILU:
        raise ValueError(f"gpt_oss is a clamped SwiGLU: pass Activation.SILU with it, got {activation.value}")
    return alpha, limit


def grouped_gate_up_act(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    activation: Activation | str,
    *,
    gpt_oss: tuple[float, float] | None = None,
    store_pre: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h, pre) of a mixture-of-experts gate|up projection over expert-sorted rows.

    For the rows of expert e (``offsets[e]:offsets[e+1]``): gate = x @ w[e, 0]^T + bias[e, 0],
    up = x @ w[e, 1]^T + bias[e, 1] (fp32 accumulators), h = act(gate) * up, or with
    ``gpt_oss=(alpha, limit)`` gpt-oss's clamped SwiGLU h = (clamp(up, -limit, limit) + 1) *
    g * sigmoid(alpha * g), g = min(gate, limit) (``activation`` must then be SILU).

    x [N, D] (unit-stride columns, any row stride); w [E, 2, H, D] (any strides; contiguous
    is fastest); bias [E, 2, H] or None, all in x's dtype and on its device; offsets [E + 1]
    int64 on that device, never read on the host (offsets[0] = 0, non-decreasing,
    offsets[E] = N; rows outside them are not written). Returns h [N, H] in x's dtype, rounded
    once from fp32, written into ``out`` if given ([N, H], unit-stride columns), and
    pre [N, 2H] = [gate | up] (before any clamp) when ``store_pre``, else None.
    """
    activation = resolve(activation)
    _check_rows("x", x)
    _check_float("x", x)
    if not isinstance(w, Tensor) or w.dim() != 4 or w.shape[1] != 2:
        raise ValueError(f"w must be [E, 2, H, D], got {tuple(w.shape) if isinstance(w, Tensor) else w!r}")
    N, D = x.shape
    E, _, H, d_w = w.shape
    if d_w != D:
        raise ValueError(f"x has {D} columns but w is [E, 2, H, D] with D = {d_w}")
    if E == 0:
        raise ValueError("w has no experts (E = 0)")
    _check_same("w", w, x, "x", (E, 2, H, D))
    if bias is not None:
        _check_same("bias", bias, x, "x", (E, 2, H))
    _check_offsets(offsets, E, x.device)
    alpha, limit = _check_gpt_oss(gpt_oss, activation)
    h = _output(out, (N, H), x)
    pre = torch.empty((N, 2 * H), dtype=x.dtype, device=x.device) if store_pre else None
    if N == 0 or H == 0:
        return h, pre
    if not kernels_serve(x.dtype, x.device):
        r_h, r_pre = reference.grouped_gate_up_act(x, w, bias, offsets, activation, gpt_oss=gpt_oss)
        h.copy_(r_h)
        if pre is not None:
            pre.copy_(r_pre)
        return h, pre

    tiles = _gemm_tiles(x.dtype, x.device, N, E, b_tiles=2)
    m_tiles = _row_tiles(N, E, tiles["BLOCK_M"])
    pre_or_h = pre if pre is not None else h
    bias_ = bias if bias is not None else w
    args = (
        x, w, bias_, offsets, h, pre_or_h,
        N, H, D, E, m_tiles,
        x.stride(0), w.stride(0), w.stride(1), w.stride(2), w.stride(3),
        bias_.stride(0) if bias is not None else 0, bias_.stride(1) if bias is not None else 0,
        h.stride(0), pre_or_h.stride(0),
        alpha, limit,
    )
    meta = {
        "ACT": activation.code, "HAS_BIAS": bias is not None, "STORE_PRE": store_pre,
        "GPT_OSS": gpt_oss is not None,
        "DOT_PRECISION": dot_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32),
        **tiles, "E_POW2": _search_width(E),
    }
    grid = (m_tiles * cdiv(H, tiles["BLOCK_N"]),)
    _GATE_UP.launch(plan_key(x, meta, args), grid, args, meta)
    return h, pre


def grouped_matmul(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    *,
    trans_b: bool,
    bias: Tensor | None = None,
    row_scale: Tensor | None = None,
    out: Tensor | None = None,
    scatter_rows: Tensor | None = None,
) -> Tensor:
    """c = (a @ B[e] + bias[e]) * row_scale over the rows of each expert e.

    a [N, K] (unit-stride columns); b [E, Nout, K] with ``trans_b`` (c = a @ b[e]^T, as
    F.linear) else [E, K, Nout] (c = a @ b[e]), any strides (a transposed view reads in place);
    bias [E, Nout] or None, in a's dtype; row_scale [N] in fp32 or a's dtype (the routing
    weight, applied after the bias) or None; offsets [E + 1] int64, as for
    :func:`grouped_gate_up_act`. Returns c [N, Nout] in a's dtype, rounded once from fp32, in
    ``out`` if given ([N, Nout], unit-stride columns). ``scatter_rows`` [N] int64: row r of the
    product is stored at row scatter_rows[r] of c (the experts' rows back in token order, with no
    extra pass); it must be a permutation of 0..N-1, which is not checked (that would
    synchronise): out-of-range entries write out of bounds.
    """
    _check_rows("a", a)
    _check_float("a", a)
    if not isinstance(b, Tensor) or b.dim() != 3:
        raise ValueError(f"b must be 3-D, got {tuple(b.shape) if isinstance(b, Tensor) else b!r}")
    N, K = a.shape
    E = b.shape[0]
    n_out, k_b = (b.shape[1], b.shape[2]) if trans_b else (b.shape[2], b.shape[1])
    if k_b != K:
        layout = "[E, Nout, K] (trans_b=True)" if trans_b else "[E, K, Nout] (trans_b=False)"
        raise ValueError(f"a has {K} columns but b {tuple(b.shape)} read as {layout} has K = {k_b}")
    if E == 0:
        raise ValueError("b has no experts (E = 0)")
    _check_same("b", b, a, "a", tuple(b.shape))
    if bias is not None:
        _check_same("bias", bias, a, "a", (E, n_out))
    if row_scale is not None:
        if not isinstance(row_scale, Tensor) or tuple(row_scale.shape) != (N,):
            got = tuple(row_scale.shape) if isinstance(row_scale, Tensor) else row_scale
            raise ValueError(f"row_scale must have shape ({N},), got {got}")
        if row_scale.dtype not in (torch.float32, a.dtype):
            raise TypeError(f"row_scale must be float32 or {a.dtype} like a, got {row_scale.dtype}")
        if row_scale.device != a.device:
            raise ValueError(f"row_scale is on {row_scale.device}, a on {a.device}")
    if scatter_rows is not None:
        if not isinstance(scatter_rows, Tensor) or tuple(scatter_rows.shape) != (N,):
            got = tuple(scatter_rows.shape) if isinstance(scatter_rows, Tensor) else scatter_rows
            raise ValueError(f"scatter_rows must have shape ({N},), got {got}")
        if scatter_rows.dtype != torch.int64 or scatter_rows.device != a.device:
            got = f"{scatter_rows.dtype} on {scatter_rows.device}"
            raise TypeError(f"scatter_rows must be int64 on {a.device}, got {got}")
    _check_offsets(offsets, E, a.device)
    c = _output(out, (N, n_out), a)
    if N == 0 or n_out == 0:
        return c
    if not kernels_serve(a.dtype, a.device):
        ref = reference.grouped_matmul(a, b, offsets, trans_b=trans_b, bias=bias, row_scale=row_scale)
        if scatter_rows is None:
            c.copy_(ref)
        else:
            c[scatter_rows] = ref
        return c

    tiles = _gemm_tiles(a.dtype, a.device, N, E, b_tiles=1)
    m_tiles = _row_tiles(N, E, tiles["BLOCK_M"])
    stride_bn, stride_bk = (b.stride(1), b.stride(2)) if trans_b else (b.stride(2), b.stride(1))
    args = (
        a, b, bias if bias is not None else b, row_scale if row_scale is not None else a, offsets, c,
        scatter_rows if scatter_rows is not None else offsets,
        N, n_out, K, E, m_tiles,
        a.stride(0), b.stride(0), stride_bn, stride_bk,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        row_scale.stride(0) if row_scale is not None else 0, c.stride(0),
    )
    meta = {
        "HAS_BIAS": bias is not None, "HAS_SCALE": row_scale is not None, "SCATTER": scatter_rows is not None,
        "DOT_PRECISION": dot_precision(a.dtype, torch.backends.cuda.matmul.allow_tf32),
        **tiles, "E_POW2": _search_width(E),
    }
    grid = (m_tiles * cdiv(n_out, tiles["BLOCK_N"]),)
    _MATMUL.launch(plan_key(a, meta, args), grid, args, meta)
    return c


def grouped_weight_grad(a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """out [E, Ka, Kb], out[e] = a[rows_e]^T @ b[rows_e] (fp32 accumulation, zeros for an expert
    without rows), in a's dtype: the weight gradient of a grouped GEMM. a [N, Ka] and b [N, Kb]
    share dtype and device and have unit-stride columns; offsets [E + 1] int64, as for
    :func:`grouped_gate_up_act`. The gate|up weight's gradient is
    ``grouped_weight_grad(d_pre, x, ...).view(E, 2, H, D)``."""
    _check_rows("a", a)
    _check_float("a", a)
    _check_rows("b", b)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"a and b must have the same rows, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_same("b", b, a, "a", tuple(b.shape))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_offsets(offsets, num_experts, a.device)
    N, Ka = a.shape
    Kb = b.shape[1]
    if not kernels_serve(a.dtype, a.device):
        return reference.grouped_weight_grad(a, b, offsets, num_experts)
    out = torch.empty((num_experts, Ka, Kb), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    tiles = _weight_grad_tiles(a.dtype, a.device)
    args = (a, b, offsets, out, N, Ka, Kb, a.stride(0), b.stride(0), out.stride(0), out.stride(1))
    meta = {"DOT_PRECISION": dot_precision(a.dtype, torch.backends.cuda.matmul.allow_tf32), **tiles}
    grid = (cdiv(Ka, tiles["BLOCK_M"]) * cdiv(Kb, tiles["BLOCK_N"]), num_experts)
    _WEIGHT_GRAD.launch(plan_key(a, meta, args), grid, args, meta)
    return out


def grouped_bias_grad(g: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """out [E, C]: out[e] = the sum of g's rows of expert e (fp32 accumulation, zeros for an
    expert without rows), in g's dtype: the bias gradient of a grouped GEMM. g [N, C] with
    unit-stride columns; offsets [E + 1] int64, as for :func:`grouped_gate_up_act`."""
    _check_rows("g", g)
    _check_float("g", g)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_offsets(offsets, num_experts, g.device)
    N, C = g.shape
    if not kernels_serve(g.dtype, g.device):
        return reference.grouped_bias_grad(g, offsets, num_experts)
    out = torch.empty((num_experts, C), dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    # 64 x 64 fp32 partials on 4 warps: 32 registers a thread; narrow column blocks give a
    # skewed routing (one expert, all rows) C / 64 programs to spread over.
    bm, bn = (16, 32) if not g.is_cuda else (64, 64)
    args = (g, offsets, out, N, C, g.stride(0), out.stride(0))
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4}
    _SEGMENT_SUM.launch(plan_key(g, meta, args), (cdiv(C, bn), num_experts), args, meta)
    return out
