"""A narrow MLP (every width <= 256) as ONE kernel: forward, and a fused backward.

Design limit: every layer's weight fits on chip as one [P, P] tile, P = next power of two of the
widest layer (>= 16, tl.dot's smallest tile), so each program runs the whole stack over its row
block with the activations held in registers between layers; only x is read and y written.
Where that tile (or the backward's working set) exceeds shared memory, ``kernel_fits`` says so
and the ops run the torch reference instead. Eager and torch.compile run one GEMM per layer and
round-trip every [M, width] activation through GPU memory (4.3 GB for batch 2^20,
32 -> 64 x8 -> 16); fused, the stack moves ~0.1 GB.

Weights come packed: ``w`` [L, P, P] (layer l's [out, in] weight in the top-left corner, zeros
elsewhere) and ``b`` [L, P] (zeros where a layer has no bias or past its width). One padded
width for all layers gives the unrolled loop body one shape; the zero padding makes padded
columns contribute nothing, and the activations are masked to each layer's width, because a
padded column of sigmoid(0) = 0.5, or 0 * Inf = NaN, must not leak into the next layer.

The per-layer activation codes and widths are constexpr tuples and the layer loop is a
``tl.static_range``: each layer compiles to straight-line code with its own activation and no
runtime select over all activations (a runtime code per layer would evaluate erf, exp and the
rest for every element of every layer). The price is one compilation per architecture, which a
model pays once.

The forward may run persistent too (``programs_per_sm``): the same kernel, looping over blocks.

Backward: one persistent launch of G programs (two per SM at P <= 64). Each program walks its
row blocks; per block it recomputes the forward from x, keeping in registers/shared memory only
the input of every recompute segment (SEGMENT layers each, ~sqrt(L)) and the last segment's
pre-activations z_l (storage dtype, as eager saves them). It then walks back segment by segment,
recomputing each earlier segment's z from its input: dz_l, db_l and dW_l += dz_l^T h_{l-1} by
fire-and-forget atomic reductions into the program's own fp32 partial sums (one thread owns each
element, so the order of additions is fixed), and dh_{l-1} = dz_l W_l, ending in dx. Nothing
per layer goes through memory (an earlier design parked every z_l in an L2 scratch: measured
1.6x slower, benchmarks/results/narrow-bwd-variants-v1). The G partials are summed by torch
afterwards: deterministic, and a second small launch. Math is fp32 (tl.dot accumulates in fp32);
the operands of each dot are rounded to the storage dtype as eager rounds them, once per layer.

Row offsets are int64: M * row_stride passes 2^31 at these batch sizes (2^25 rows x 64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from .epilogue import act, act_and_grad
from .launch import PlannedKernel, plan_key, traced_launch
from .narrow_pack import MAX_WIDTH, padded_width
from .profile import Cost, KernelProfile
from .runtime import SMEM_PER_PROGRAM, cdiv, dot_precision, mma, persistent_programs, to_storage


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation."""
    return mma(a, b, None, DOT_PRECISION)


@triton.jit
def _linear(a, w_ptr, b_ptr, l, P: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ W_l^T + b_l in fp32 for a [BLOCK_M, P] operand in the storage dtype."""
    offs = tl.arange(0, P)
    w = tl.load(w_ptr + l * P * P + offs[:, None] * P + offs[None, :])
    b = tl.load(b_ptr + l * P + offs).to(tl.float32)
    return _dot(a, tl.trans(w), DOT_PRECISION) + b[None, :]


@triton.jit
def _hidden(z, ACT: tl.constexpr, WIDTH: tl.constexpr, cols, dtype: tl.constexpr):
    """h = act(z) in the storage dtype, zero past the layer's width: the next layer's operand."""
    return to_storage(tl.where((cols < WIDTH)[None, :], act(z.to(tl.float32), ACT), 0.0), dtype)


@triton.jit
def _narrow_mlp_fwd_kernel(
    # pointers: x [M, D0], packed w [L, P, P] and b [L, P] (contiguous), y [M, D_L]
    x_ptr, w_ptr, b_ptr, y_ptr,
    # sizes
    M, num_blocks,
    # strides of x (any) and y (unit columns)
    stride_xm, stride_xk, stride_ym,
    # meta: L layers; WIDTHS (D0, ..., D_L) and ACTS (one code per layer) are constexpr tuples
    L: tl.constexpr, P: tl.constexpr, WIDTHS: tl.constexpr, ACTS: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Persistent when launched with fewer programs than row blocks: the weight loads are then
    # loop-invariant (the compiler may keep them in registers across blocks) and the next block's
    # x can be prefetched while this one computes. With one program per block, one iteration.
    dtype = y_ptr.dtype.element_ty
    cols = tl.arange(0, P)
    for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = (rows < M)[:, None]
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=row_ok & (cols < WIDTHS[0])[None, :],
            other=0.0,
        )
        for l in tl.static_range(L):
            h = act(_linear(a, w_ptr, b_ptr, l, P, DOT_PRECISION), ACTS[l])
            h = tl.where((cols < WIDTHS[l + 1])[None, :], h, 0.0)
            a = to_storage(h, dtype)
        tl.store(
            y_ptr + rows[:, None] * stride_ym + cols[None, :], a, mask=row_ok & (cols < WIDTHS[L])[None, :]
        )


@triton.jit
def _narrow_mlp_bwd_kernel(
    # pointers: x [M, D0], dy [M, D_L], packed w [L, P, P] and b [L, P], dx [M, D0] (unit columns);
    # per-program fp32 partials dw [G, L, P, P] and db [G, L, P] (zeroed)
    x_ptr, dy_ptr, w_ptr, b_ptr, dx_ptr, dw_ptr, db_ptr,
    # sizes
    M, num_blocks,
    # strides of x and dy (any), dx (unit columns)
    stride_xm, stride_xk, stride_dym, stride_dyk, stride_dxm,
    # meta, as in the forward; SEGMENT: layers per recompute segment
    L: tl.constexpr, P: tl.constexpr, WIDTHS: tl.constexpr, ACTS: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, SEGMENT: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, P)
    r = tl.arange(0, BLOCK_M)
    # this program's private slices of the partial sums
    dw_ptr += pid.to(tl.int64) * L * P * P + cols[:, None] * P + cols[None, :]
    db_ptr += pid.to(tl.int64) * L * P + cols
    LAST: tl.constexpr = (L - 1) // SEGMENT * SEGMENT  # first layer of the last segment

    for blk in range(pid, num_blocks, num_programs):
        rows = blk * BLOCK_M + r.to(tl.int64)  # blk * BLOCK_M < M fits int32; row * stride may not
        row_ok = (rows < M)[:, None]
        x_mask = row_ok & (cols < WIDTHS[0])[None, :]
        x_ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk

        # forward, keeping in registers the input of every segment but the first (x is reloaded)
        # and the last segment's pre-activations (rows past M hold act(b) and get dy = 0 below)
        a = tl.load(x_ptrs, mask=x_mask, other=0.0)
        inputs = ()
        zs = ()
        for l in tl.static_range(L):
            if l % SEGMENT == 0 and l > 0:
                inputs = inputs + (a,)  # noqa: RUF005 - Triton's frontend takes no starred tuples
            z = to_storage(_linear(a, w_ptr, b_ptr, l, P, DOT_PRECISION), dtype)
            if l >= LAST:
                zs = zs + (z,)  # noqa: RUF005
            if l + 1 < L:
                a = _hidden(z, ACTS[l], WIDTHS[l + 1], cols, dtype)

        # backward, segment by segment from the last: g is dL/dh in fp32
        g = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyk,
            mask=row_ok & (cols < WIDTHS[L])[None, :],
            other=0.0,
        ).to(tl.float32)
        for s in tl.static_range(LAST, -1, -SEGMENT):
            if s == 0:  # noqa: SIM108
                seg_in = tl.load(x_ptrs, mask=x_mask, other=0.0)
            else:
                seg_in = inputs[s // SEGMENT - 1]
            if s < LAST:  # recompute this segment's pre-activations from its input
                zs = ()
                a = seg_in
                for i in tl.static_range(SEGMENT):
                    z = to_storage(_linear(a, w_ptr, b_ptr, s + i, P, DOT_PRECISION), dtype)
                    zs = zs + (z,)  # noqa: RUF005
                    if i + 1 < SEGMENT:
                        a = _hidden(z, ACTS[s + i], WIDTHS[s + i + 1], cols, dtype)
            for i in tl.static_range(SEGMENT - 1, -1, -1):
                if s + i < L:
                    out_ok = cols < WIDTHS[s + i + 1]
                    _, dz = act_and_grad(zs[i].to(tl.float32), g, ACTS[s + i])
                    dz = tl.where(out_ok[None, :], dz, 0.0)
                    # fire-and-forget reductions into this program's own slice (no load to wait
                    # for; one thread owns each element, so the order of its additions is fixed),
                    # only the layer's own [out, in] corner: padding would add zeros (and at
                    # 64-row blocks the partials' volume, not their math, is what these cost)
                    tl.atomic_add(db_ptr + (s + i) * P, tl.sum(dz, axis=0), mask=out_ok, sem="relaxed")
                    dz = to_storage(dz, dtype)
                    a = _hidden(zs[i - 1], ACTS[s + i - 1], WIDTHS[s + i], cols, dtype) if i > 0 else seg_in
                    dw = _dot(tl.trans(dz), a, DOT_PRECISION)
                    dw_ok = out_ok[:, None] & (cols < WIDTHS[s + i])[None, :]
                    tl.atomic_add(dw_ptr + (s + i) * P * P, dw, mask=dw_ok, sem="relaxed")
                    w = tl.load(w_ptr + (s + i) * P * P + cols[:, None] * P + cols[None, :])
                    g = _dot(dz, w, DOT_PRECISION)
        tl.store(
            dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
            to_storage(g, dtype),
            mask=x_mask,
        )


def forward_cost(M: int, shapes: Sequence[tuple[int, int]], bias: bool, elem: int) -> Cost:
    """One forward launch over layers of (in, out) ``shapes``: x read, y written, every weight
    read once; no intermediate reaches memory."""
    flops = sum(2 * M * k * n for k, n in shapes)
    weights = sum(k * n + (n if bias else 0) for k, n in shapes)
    return Cost(flops, (M * (shapes[0][0] + shapes[-1][1]) + weights) * elem, 0)


_FWD = PlannedKernel(_narrow_mlp_fwd_kernel)
_BWD = PlannedKernel(_narrow_mlp_bwd_kernel)

PROFILES = [
    KernelProfile("_narrow_mlp_fwd_kernel", "narrow MLP stack forward, one kernel", True, cost=forward_cost),
    KernelProfile("_narrow_mlp_bwd_kernel", "narrow MLP stack backward, one kernel", gemm=True),
]

# The backward keeps a segment's inputs and pre-activations live across the walk; the compiler
# parks them in shared memory as dot operands, one [BLOCK_M, P] tile each, on top of a base for
# the weight and the dot operands. sm_90a compiles (triton 3.6, bf16, default configs):
# P=64, BLOCK_M=64: 48 KB at L=9 (5 tiles), 90 KB with 9; P=128, BLOCK_M=64: 128 KB at L=9
# (5 tiles), 160 KB at L=16 (7); P=256, BLOCK_M=32: 192 KB at L=9 (5), 224 KB at L=16 (7),
# 368 KB at L=16 with segments of one layer (16). Bases with margin, per P, in bytes of bf16:
_BWD_SMEM_BASE = {16: 16 * 1024, 32: 24 * 1024, 64: 40 * 1024, 128: 64 * 1024, 256: 128 * 1024}


def live_tiles(layers: int, segment: int) -> int:
    """[BLOCK_M, P] tiles the backward holds at once: the inputs of every segment but the first,
    and one segment's pre-activations."""
    return -(-layers // segment) - 1 + segment


def default_segment(layers: int) -> int:
    """Layers per recompute segment of the backward: the fewest live tiles (~2 sqrt(L)), then
    the fewest recomputed layers (all before the last segment, which the forward leaves live)."""
    return min(range(1, layers + 1), key=lambda s: (live_tiles(layers, s), (layers - 1) // s * s))


def backward_smem_bytes(padded: int, dtype: torch.dtype, layers: int, segment: int | None = None) -> int:
    """Estimated shared memory of the backward kernel at its default config (model above)."""
    block_m, _ = _default_config(padded, backward=True)
    e = torch.finfo(dtype).bits // 8
    seg = default_segment(layers) if segment is None else segment
    return _BWD_SMEM_BASE[padded] * e // 2 + live_tiles(layers, seg) * block_m * padded * e


def kernel_fits(padded: int, dtype: torch.dtype, layers: int | None = None) -> bool:
    """Whether the forward kernel at padded width P = ``padded`` fits sm_90's 227 KB of shared
    memory per program, and, given ``layers``, the backward too. Forward (sm_90a compiles):
    bf16/fp16 24 KB at P=64, 164 KB at P=256; fp32 (ieee FMA dots) 128 KB at P=128 but 321 KB
    at P=256 (the [256, 256] fp32 weight tile alone is 256 KB). Backward:
    :func:`backward_smem_bytes`. The ops run the torch reference where this is False, on every
    device alike, so CI under the interpreter tests the path a GPU takes.
    """
    if padded > (128 if dtype == torch.float32 else MAX_WIDTH):
        return False
    if layers is None:
        return True
    # fp32 backward: the FMA dots of the recompute-segment kernel spill catastrophically (sm_90a,
    # L=9: 55 KB of stack per thread at P=64, 122 KB at P=128, minutes to compile), so fp32
    # training takes the torch path until the kernel has an fp32 design of its own.
    return dtype != torch.float32 and backward_smem_bytes(padded, dtype, layers) <= SMEM_PER_PROGRAM


def _default_config(P: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps). P <= 64 from the H200 sweeps of benchmarks/narrow_mlp_bench.py
    (docs/perf-notes-narrow.md): forward (128, 4) one program per row block, 190 us; backward
    (64, 4) at 2 programs per SM, 1782 us against 1998 at (128, 8) and 2934 at (64, 8). Wider P
    are untuned guesses from register arithmetic (an fp32 [BLOCK_M, P] tile costs
    BLOCK_M * P / (32 * warps) registers per thread) and shared memory (backward_smem_bytes)."""
    if P <= 64:
        return (64, 4) if backward else (128, 4)
    if P <= 128:
        return (64, 8) if backward else (128, 8)
    return (32, 4) if backward else (64, 8)


def _backward_programs_per_sm(P: int) -> int:
    """Two resident programs per SM where two fit (4 warps x 255 registers and 48 KB of shared
    memory each at P <= 64); wider backward programs take most of an SM's shared memory, and a
    persistent program that is not resident would only start when another ends."""
    return 2 if P <= 64 else 1


# num_stages=1 on every launch: the software pipeliner multi-buffers the loop-invariant weight
# tiles of the fp32 (FMA) dots across the persistent loop, 589 KB of shared memory at P=128
# against 128 KB with one stage; for bf16 the sm_90a compiles use the same shared memory either
# way (24 KB forward, 48 KB backward at P=64), i.e. nothing there was being pipelined.


def _check(x: Tensor, w: Tensor, b: Tensor, widths: Sequence[int], acts: Sequence[Activation]) -> int:
    L = len(acts)
    P = padded_width(widths)
    if len(widths) != L + 1 or L == 0:
        raise ValueError(f"need L >= 1 activations and L + 1 widths, got {len(acts)} and {len(widths)}")
    if max(widths) > MAX_WIDTH or min(widths) <= 0:
        raise ValueError(f"widths must be in [1, {MAX_WIDTH}], got {list(widths)}")
    packed_ok = tuple(w.shape) == (L, P, P) and tuple(b.shape) == (L, P)
    if not (packed_ok and w.is_contiguous() and b.is_contiguous()):
        raise ValueError(f"packed weights must be contiguous [{L}, {P}, {P}] and [{L}, {P}]")
    if x.dim() != 2 or x.shape[1] != widths[0]:
        raise ValueError(f"x must be [M, {widths[0]}], got {tuple(x.shape)}")
    if not (x.dtype == w.dtype == b.dtype):
        raise ValueError(f"x, w and b must share a dtype, got {x.dtype}, {w.dtype}, {b.dtype}")
    return P


def narrow_mlp_forward(
    x: Tensor,
    w: Tensor,
    b: Tensor,
    widths: Sequence[int],
    acts: Sequence[Activation],
    block_m: int | None = None,
    num_warps: int | None = None,
    # One program per row block: 192.6 us vs 224.7 us persistent at 2 per SM (H100, bf16, 2^20
    # rows, 32 -> 64 x8 -> 16; benchmarks/results/narrow-mlp-v1-20261125.json).
    programs_per_sm: int = 0,
    traced: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """y [M, D_L] of the stack over a 2-D x [M, D0]; ``block_m``/``num_warps`` override the config;
    ``programs_per_sm`` 0 launches one program per row block instead of a persistent grid."""
    P = _check(x, w, b, widths, acts)
    M = x.shape[0]
    y = torch.empty((M, widths[-1]), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y
    bm, warps = _default_config(P, backward=False)
    bm, warps = block_m or bm, num_warps or warps
    num_blocks = cdiv(M, bm)
    precision = dot_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32)
    programs = persistent_programs(num_blocks, x.device, programs_per_sm) if programs_per_sm else num_blocks
    args = (x, w, b, y, M, num_blocks, x.stride(0), x.stride(1), y.stride(0))
    meta = {
        "L": len(acts), "P": P, "WIDTHS": tuple(widths), "ACTS": tuple(a.code for a in acts),
        "BLOCK_M": bm, "DOT_PRECISION": precision, "num_warps": warps,
    }
    if traced:
        traced_launch(_narrow_mlp_fwd_kernel, (programs,), args, meta, num_stages=1)
    else:
        _FWD.launch(plan_key(x, meta, args), (programs,), args, meta, num_stages=1)
    return y


def narrow_mlp_backward(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    b: Tensor,
    widths: Sequence[int],
    acts: Sequence[Activation],
    block_m: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    segment: int | None = None,
    traced: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, D0], dw [L, P, P], db [L, P]) in the storage dtype; padded entries of dw/db are 0.

    ``programs_per_sm``: persistent programs per SM (default: two where two fit); each adds an
    fp32 partial [L, P, P] to sum.
    ``segment``: layers per recompute segment (default :func:`default_segment`; L keeps every
    pre-activation of the forward in registers and recomputes nothing).
    """
    P = _check(x, w, b, widths, acts)
    M, L = x.shape[0], len(acts)
    if tuple(dy.shape) != (M, widths[-1]):
        raise ValueError(f"dy must be [{M}, {widths[-1]}], got {tuple(dy.shape)}")
    seg = default_segment(L) if segment is None else segment
    if not 1 <= seg <= L:
        raise ValueError(f"segment must be in [1, {L}], got {seg}")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M == 0:
        return dx, torch.zeros_like(w), torch.zeros_like(b)
    bm, warps = _default_config(P, backward=True)
    bm, warps = block_m or bm, num_warps or warps
    num_blocks = cdiv(M, bm)
    per_sm = _backward_programs_per_sm(P) if programs_per_sm is None else programs_per_sm
    precision = dot_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32)
    G = persistent_programs(num_blocks, x.device, per_sm) if per_sm else num_blocks
    dw = torch.zeros((G, L, P, P), dtype=torch.float32, device=x.device)
    db = torch.zeros((G, L, P), dtype=torch.float32, device=x.device)
    args = (
        x, dy, w, b, dx, dw, db,
        M, num_blocks,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0),
    )
    meta = {
        "L": L, "P": P, "WIDTHS": tuple(widths), "ACTS": tuple(a.code for a in acts),
        "BLOCK_M": bm, "DOT_PRECISION": precision, "SEGMENT": seg, "num_warps": warps,
    }
    if traced:
        traced_launch(_narrow_mlp_bwd_kernel, (G,), args, meta, num_stages=1)
    else:
        _BWD.launch(plan_key(x, meta, args), (G,), args, meta, num_stages=1)
    return dx, dw.sum(0).to(w.dtype), db.sum(0).to(b.dtype)
