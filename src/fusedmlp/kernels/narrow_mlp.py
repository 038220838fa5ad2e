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

Backward: one persistent launch of G programs (one per SM by default). Each program walks its row
blocks; per block it recomputes the forward from x, parking each layer's pre-activation z_l
(storage dtype, as eager saves it) in a private scratch slice [L, BLOCK_M, P] that is reused by
every block of the program, so the scratch (G * L * BLOCK_M * P elements: 19 MB for the
2^20 x 64-wide case at one program per SM on H100) can live in L2, instead of the L * M * width
elements eager saves. It then walks back through the layers: dz_l, db_l,
dW_l += dz_l^T h_{l-1} into the program's fp32 partial sums, and dh_{l-1} = dz_l W_l, ending in
dx. The G partials are summed by torch afterwards: deterministic, and a second small launch.
Math is fp32 (tl.dot accumulates in fp32); the operands of each dot are rounded to the storage
dtype as eager rounds them, once per layer.

Row offsets are int64: M * row_stride passes 2^31 at these batch sizes (2^25 rows x 64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation
from .activation import apply_act, apply_act_bwd
from .common import to_storage

MAX_WIDTH = 256

# Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (garbage, on
# the order of 1e10). bf16 -> fp32 is exact and the GPU accumulates in fp32, so under the
# interpreter bf16 operands are upcast first; compiled for a GPU this is constexpr-false.
_UPCAST_BF16_DOT: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _linear(a, w_ptr, b_ptr, l, P: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ W_l^T + b_l in fp32 for a [BLOCK_M, P] operand in the storage dtype."""
    offs = tl.arange(0, P)
    w = tl.load(w_ptr + l * P * P + offs[:, None] * P + offs[None, :])
    b = tl.load(b_ptr + l * P + offs).to(tl.float32)
    return _dot(a, tl.trans(w), DOT_PRECISION) + b[None, :]


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
            h = apply_act(_linear(a, w_ptr, b_ptr, l, P, DOT_PRECISION), ACTS[l])
            h = tl.where((cols < WIDTHS[l + 1])[None, :], h, 0.0)
            a = to_storage(h, dtype)
        tl.store(
            y_ptr + rows[:, None] * stride_ym + cols[None, :], a, mask=row_ok & (cols < WIDTHS[L])[None, :]
        )


@triton.jit
def _narrow_mlp_bwd_kernel(
    # pointers: x [M, D0], dy [M, D_L], packed w [L, P, P] and b [L, P], dx [M, D0] (unit columns);
    # per-program fp32 partials dw [G, L, P, P] and db [G, L, P] (zeroed); scratch z [G, L, BLOCK_M, P]
    x_ptr, dy_ptr, w_ptr, b_ptr, dx_ptr, dw_ptr, db_ptr, z_ptr,
    # sizes
    M, num_blocks,
    # strides of x and dy (any), dx (unit columns)
    stride_xm, stride_xk, stride_dym, stride_dyk, stride_dxm,
    # meta, as in the forward
    L: tl.constexpr, P: tl.constexpr, WIDTHS: tl.constexpr, ACTS: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, P)
    r = tl.arange(0, BLOCK_M)
    # this program's private slices of the partial sums and the scratch
    dw_ptr += pid.to(tl.int64) * L * P * P + cols[:, None] * P + cols[None, :]
    db_ptr += pid.to(tl.int64) * L * P + cols
    z_ptr += pid.to(tl.int64) * L * BLOCK_M * P + r[:, None] * P + cols[None, :]

    for blk in range(pid, num_blocks, num_programs):
        rows = blk * BLOCK_M + r.to(tl.int64)  # blk * BLOCK_M < M fits int32; row * stride may not
        row_ok = (rows < M)[:, None]
        x_mask = row_ok & (cols < WIDTHS[0])[None, :]
        x_ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk

        # forward, parking the pre-activations of all but the last layer, whose z stays in
        # registers (rows past M hold act(b) and get dy = 0 below)
        a = tl.load(x_ptrs, mask=x_mask, other=0.0)
        for l in tl.static_range(L):
            z = to_storage(_linear(a, w_ptr, b_ptr, l, P, DOT_PRECISION), dtype)
            if l + 1 < L:
                tl.store(z_ptr + l * BLOCK_M * P, z)
                h = apply_act(z.to(tl.float32), ACTS[l])
                a = to_storage(tl.where((cols < WIDTHS[l + 1])[None, :], h, 0.0), dtype)
        # the walk may read a z element with another thread than the one that stored it
        tl.debug_barrier()

        # backward: g is dL/dh_l in fp32; z_l is carried from one step to the next
        g = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyk,
            mask=row_ok & (cols < WIDTHS[L])[None, :],
            other=0.0,
        ).to(tl.float32)
        z = z.to(tl.float32)
        for l in tl.static_range(L - 1, -1, -1):
            _, dz = apply_act_bwd(z, g, ACTS[l])
            dz = tl.where((cols < WIDTHS[l + 1])[None, :], dz, 0.0)
            tl.store(db_ptr + l * P, tl.load(db_ptr + l * P) + tl.sum(dz, axis=0))
            dz = to_storage(dz, dtype)
            if l > 0:
                z = tl.load(z_ptr + (l - 1) * BLOCK_M * P).to(tl.float32)
                h = apply_act(z, ACTS[l - 1])
                a = to_storage(tl.where((cols < WIDTHS[l])[None, :], h, 0.0), dtype)
            else:
                a = tl.load(x_ptrs, mask=x_mask, other=0.0)
            dw = _dot(tl.trans(dz), a, DOT_PRECISION)
            tl.store(dw_ptr + l * P * P, tl.load(dw_ptr + l * P * P) + dw)
            w = tl.load(w_ptr + l * P * P + cols[:, None] * P + cols[None, :])
            g = _dot(dz, w, DOT_PRECISION)
        tl.store(
            dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
            to_storage(g, dtype),
            mask=x_mask,
        )
        # the next block's scratch stores and partial-sum loads must follow this block's, in
        # every thread (a layout change may hand an element to another thread)
        tl.debug_barrier()


def kernel_fits(padded: int, dtype: torch.dtype) -> bool:
    """Whether the forward and backward kernels at padded width P = ``padded`` fit sm_90's 227 KB
    of shared memory per program. From compiling the default configs for sm_90a (L=3; at P=64,
    L=9 needs the same):
    bf16/fp16 forward 24 KB at P=64, 164 KB at P=256; backward 48 KB at P=64, 96 KB at P=128,
    144 KB at P=256 (BLOCK_M=32, 4 warps; 320 KB at BLOCK_M=64, 8 warps). fp32 (ieee FMA dots)
    forward 128 KB at P=128 but 321 KB at P=256 (the [256, 256] fp32 weight tile alone is 256 KB);
    backward 64 KB at P=64, 96 KB at P=128. The ops run the torch reference where this is False,
    on every device alike, so CI under the interpreter tests the path a GPU takes.
    """
    return padded <= (128 if dtype == torch.float32 else MAX_WIDTH)


def padded_width(widths: Sequence[int]) -> int:
    """P: the one padded width of every layer (a power of two, at least tl.dot's 16)."""
    return max(16, triton.next_power_of_2(max(widths)))


def _default_config(P: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps). Untuned guesses from register arithmetic, to be replaced by the H100
    sweep in benchmarks/narrow_mlp_bench.py (docs/perf-notes-narrow.md): the fp32 [BLOCK_M, P]
    activation costs BLOCK_M * P / (32 * warps) registers per thread, and the backward holds ~4."""
    if P <= 64:
        return (128, 8) if backward else (128, 4)
    if P <= 128:
        return (64, 8) if backward else (128, 8)
    return (32, 4) if backward else (64, 8)  # backward: 144 KB of shared memory; 320 KB at (64, 8)


# num_stages=1 on every launch: the software pipeliner multi-buffers the loop-invariant weight
# tiles of the fp32 (FMA) dots across the persistent loop, 589 KB of shared memory at P=128
# against 128 KB with one stage; for bf16 the sm_90a compiles use the same shared memory either
# way (24 KB forward, 48 KB backward at P=64), i.e. nothing there was being pipelined.


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 storage: full-precision fp32 dots unless the user opted in to TF32 for matmuls, the
    # switch eager follows too (so the numerics contract compares like with like).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for bf16/fp16 operands


def _grid_programs(num_blocks: int, device: torch.device, per_sm: int) -> int:
    """Persistent programs: ``per_sm`` per SM (0: one program per row block)."""
    if per_sm == 0:
        return num_blocks
    if device.type != "cuda":
        return min(num_blocks, 2)  # the interpreter: still several blocks per program
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(num_blocks, per_sm * sms)


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
) -> Tensor:
    """y [M, D_L] of the stack over a 2-D x [M, D0]; ``block_m``/``num_warps`` override the config;
    ``programs_per_sm`` 0 launches one program per row block instead of a persistent grid."""
    P = _check(x, w, b, widths, acts)
    M = x.shape[0]
    y = torch.empty((M, widths[-1]), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    bm, warps = _default_config(P, backward=False)
    bm, warps = block_m or bm, num_warps or warps
    num_blocks = triton.cdiv(M, bm)
    _narrow_mlp_fwd_kernel[(_grid_programs(num_blocks, x.device, programs_per_sm),)](
        x, w, b, y,
        M, num_blocks,
        x.stride(0), x.stride(1), y.stride(0),
        L=len(acts), P=P, WIDTHS=tuple(widths), ACTS=tuple(a.code for a in acts),
        BLOCK_M=bm, DOT_PRECISION=_dot_precision(x.dtype), num_warps=warps,
        num_stages=1,
    )
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
    programs_per_sm: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, D0], dw [L, P, P], db [L, P]) in the storage dtype; padded entries of dw/db are 0.

    ``programs_per_sm``: persistent programs per SM. More hide more latency but each adds an fp32
    partial [L, P, P] to sum and a scratch slice, and all of them should stay in L2 (50 MB on H100).
    Default 1: at P=64 the default (128 rows, 8 warps) takes 255 registers/thread, i.e. the whole
    register file, so a second program per SM could not be resident anyway.
    """
    P = _check(x, w, b, widths, acts)
    M, L = x.shape[0], len(acts)
    if tuple(dy.shape) != (M, widths[-1]):
        raise ValueError(f"dy must be [{M}, {widths[-1]}], got {tuple(dy.shape)}")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M == 0:
        return dx, torch.zeros_like(w), torch.zeros_like(b)
    bm, warps = _default_config(P, backward=True)
    bm, warps = block_m or bm, num_warps or warps
    num_blocks = triton.cdiv(M, bm)
    G = _grid_programs(num_blocks, x.device, programs_per_sm)
    dw = torch.zeros((G, L, P, P), dtype=torch.float32, device=x.device)
    db = torch.zeros((G, L, P), dtype=torch.float32, device=x.device)
    scratch = torch.empty((G, L, bm, P), dtype=x.dtype, device=x.device)
    _narrow_mlp_bwd_kernel[(G,)](
        x, dy, w, b, dx, dw, db, scratch,
        M, num_blocks,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0),
        L=L, P=P, WIDTHS=tuple(widths), ACTS=tuple(a.code for a in acts),
        BLOCK_M=bm, DOT_PRECISION=_dot_precision(x.dtype), num_warps=warps,
        num_stages=1,
    )
    return dx, dw.sum(0).to(w.dtype), db.sum(0).to(b.dtype)
