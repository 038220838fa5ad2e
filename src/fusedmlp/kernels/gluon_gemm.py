"""Hopper (sm_90a) GEMMs with the (gated) activation in the epilogue, written in Gluon, Triton's
lower-level dialect: the forward h = act(x Wg^T + bg) * (x Wu^T + bu) (or act(x W^T + b)) and the
backward dh GEMM with the activation derivative in its epilogue.

Why: the portable tl.dot kernel (kernels/gemm_act.py) runs the merged gate|up GEMM at ~81% of
cuBLAS on the GeGLU article shape (H200, bf16); this one at 0.97-1.02x (docs/perf-notes.md,
benchmarks/results/gluon-check-v1-20261202.json). Where it serves (:func:`serves`) is an
opt-in kernel option (``fusedmlp.options.configure(gluon=True)``): the forward without a
pre-activation store on sm_90 in bf16/fp16 for the activations below; everything else, and
every machine without Hopper, keeps the tl.dot kernel (which CI tests under the interpreter;
Gluon does not run there). The backward kernel measured slower than cuBLAS dh + the pointwise
kernel, so nothing dispatches to it yet; it is kept, tested on the GPU, for the next round.

Schedule: persistent grid (one CTA per SM), grouped tile order, warp specialised
(gl.warp_specialize): a 1-warp TMA producer fills a STAGES-deep shared-memory ring (ready/empty
mbarrier pair per slot) and runs ahead into the next tile while the consumers run an epilogue;
consumers issue async warpgroup_mma into fp32 registers, one group in flight. Forward schedules:
cooperative (one 8-warp consumer, two warpgroups x 64 rows of a 128-row tile) and ping-pong
(two 4-warp consumers owning alternate tiles, mainloops ordered by an mbarrier pair so one's
epilogue overlaps the other's MMAs). One accumulator per tile holds [gate | up] (the B ring slot
is [gate rows; up rows]): one wgmma per k16 step, split in registers afterwards. Epilogues store
through shared memory with TMA (pointer stores where a row stride is not 16-byte aligned); TMA
zero-fills out-of-bounds loads and clips stores, so M, N, K need not be tile multiples. The
backward TMA-loads each output tile's saved gate|up into shared memory during that tile's K loop.

Numerics: fp32 accumulation, epilogue math in fp32 with the formulas of kernels/epilogue.py, one
rounding to the storage dtype. Measured on the H200 (30 correctness cases, every activation,
odd M/N/K, bias, pre store, in place): within the numerics contract.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..activations import Activation
from ..options import kernel_options
from .runtime import capability, num_sms

# The activations the Gluon epilogues implement; their codes are Activation.code (enum order).
SUPPORTED = (
    Activation.SILU, Activation.GELU, Activation.GELU_TANH, Activation.RELU, Activation.RELU2,
    Activation.SIGMOID, Activation.IDENTITY,
)
assert [a.code for a in SUPPORTED] == list(range(len(SUPPORTED))), "Gluon codes follow Activation.code"
# Below this many rows the pointer kernel's launch costs less host time and the persistent grid
# would idle most SMs (decode sizes stay on kernels/gemm_act.py).
MIN_ROWS = 512
# At K <= this the ping-pong schedule (epilogue hidden behind the other consumer's MMAs) measured
# faster (GeGLU K=768: 118.5 vs 120.5 us); above it the cooperative one (K=4096: 1361 vs 1514 us).
PINGPONG_MAX_K = 1024

SILU: gl.constexpr = gl.constexpr(0)
GELU: gl.constexpr = gl.constexpr(1)
GELU_TANH: gl.constexpr = gl.constexpr(2)
RELU: gl.constexpr = gl.constexpr(3)
RELU2: gl.constexpr = gl.constexpr(4)
SIGMOID: gl.constexpr = gl.constexpr(5)

_TANH_C: gl.constexpr = gl.constexpr(0.044715)
_3_TANH_C: gl.constexpr = gl.constexpr(3 * 0.044715)
_TWO_SQRT_2_OVER_PI: gl.constexpr = gl.constexpr(2 * 0.7978845608028654)
_INV_SQRT_2: gl.constexpr = gl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: gl.constexpr = gl.constexpr(0.3989422804014327)


# ---------------------------------------------------------------------------------------------
# activation math (fp32), the same formulas as fusedmlp.kernels.activation.apply_act(_bwd);
# tl.sigmoid(z) is 1 / (1 + exp(-z)) in Triton 3.6, written out here.
# ---------------------------------------------------------------------------------------------


@gluon.jit
def _sigmoid(x):
    return 1.0 / (1.0 + gl.exp(-x))


@gluon.jit
def _act(x, ACT: gl.constexpr):
    if ACT == SILU:
        return x * _sigmoid(x)
    elif ACT == GELU:
        return 0.5 * x * (1.0 + gl.erf(x * _INV_SQRT_2))
    elif ACT == GELU_TANH:
        return x * _sigmoid((x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI)
    elif ACT == RELU:
        return gl.where(x < 0.0, 0.0, x)
    elif ACT == RELU2:
        r = gl.where(x < 0.0, 0.0, x)
        return r * r
    elif ACT == SIGMOID:
        return _sigmoid(x)
    else:
        return x


@gluon.jit
def _act_bwd(x, grad_a, ACT: gl.constexpr):
    """(act(x), grad_a * act'(x)), fp32."""
    if ACT == SILU:
        s = _sigmoid(x)
        return x * s, grad_a * s * (1.0 + x * _sigmoid(-x))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + gl.erf(x * _INV_SQRT_2))
        return x * cdf, grad_a * (cdf + x * gl.exp(-0.5 * x * x) * _INV_SQRT_2PI)
    elif ACT == GELU_TANH:
        z = (x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI
        s = _sigmoid(z)
        d = s + x * s * _sigmoid(-z) * (1.0 + x * x * _3_TANH_C) * _TWO_SQRT_2_OVER_PI
        return x * s, grad_a * d
    elif ACT == RELU:
        return gl.where(x < 0.0, 0.0, x), gl.where(x <= 0.0, 0.0, grad_a)
    elif ACT == RELU2:
        r = gl.where(x < 0.0, 0.0, x)
        return r * r, gl.where(x <= 0.0, 0.0, 2.0 * r * grad_a)
    elif ACT == SIGMOID:
        s = _sigmoid(x)
        return s, grad_a * s * _sigmoid(-x)
    else:
        return x, grad_a


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


@gluon.jit
def _tile_mn(t, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """Grouped order: GROUP_M consecutive row blocks sweep the column blocks together."""
    per_group = GROUP_M * num_pid_n
    first_m = (t // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % size_m
    pid_n = (t % per_group) // size_m
    return pid_m, pid_n


@gluon.jit
def _halves(x):
    """[R, 2C] -> ([R, :C], [R, C:]); register-local for the wgmma accumulator layout."""
    R: gl.constexpr = x.shape[0]
    C2: gl.constexpr = x.shape[1]
    return x.reshape([R, 2, C2 // 2]).permute((0, 2, 1)).split()


@gluon.jit
def _col_chunks(x, PARTS: gl.constexpr):
    """Split [R, C] into PARTS (a power of two) column chunks, in column order."""
    xs = (x,)
    n: gl.constexpr = PARTS.bit_length() - 1
    for _ in gl.static_range(n):
        nxt = ()
        for j in gl.static_range(len(xs)):
            lo, hi = _halves(xs[j])
            nxt = nxt + (lo, hi)
        xs = nxt
    return xs


@gluon.jit
def _store_ptr(val, ptr, stride_m, off_m, col0, M, ncols):
    """Masked pointer store of a [BM, W] register tile at rows off_m.., columns col0.. of a
    row-major matrix; columns >= col0 + ncols and rows >= M are masked.  Offsets are int64
    (row * stride can pass 2^31).  Used when the output cannot be a TMA target (row stride not
    a multiple of 16 bytes)."""
    L: gl.constexpr = val.type.layout
    BMv: gl.constexpr = val.shape[0]
    W: gl.constexpr = val.shape[1]
    rows = off_m + gl.arange(0, BMv, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    offs = rows.to(gl.int64)[:, None] * stride_m + (col0 + cols)[None, :]
    mask = (rows < M)[:, None] & (cols < ncols)[None, :]
    gl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _load_ptr(ptr, stride_m, off_m, col0, M, ncols, BMv: gl.constexpr, W: gl.constexpr, L: gl.constexpr):
    """Masked load (as fp32) of a [BMv, W] tile in layout L; masked elements read 0."""
    rows = off_m + gl.arange(0, BMv, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, L))
    offs = rows.to(gl.int64)[:, None] * stride_m + (col0 + cols)[None, :]
    mask = (rows < M)[:, None] & (cols < ncols)[None, :]
    return gl.load(ptr + offs, mask=mask, other=0.0).to(gl.float32)


@gluon.jit
def _emit(val, desc, ptr, stride_m, off_m, col, ncols, M, epi_bufs, c: gl.constexpr, EPI_TMA: gl.constexpr,
          NB: gl.constexpr = 0, BUF0: gl.constexpr = 0):
    """Store one fp32 register chunk ``val`` [BM, EPI_N] at rows off_m.., columns col.. .

    EPI_TMA: through the staging ring ``epi_bufs`` [NB, BM, EPI_N] and a TMA store (``desc``
    clips rows >= M and columns past the logical width).  ``c`` is the static index of this
    chunk within the tile; chunk c uses buffer BUF0 + c % NB (this consumer's NB buffers start
    at BUF0), and before a buffer is rewritten store_wait(NB - 1) retires the store that last
    read it (all of this consumer's TMA stores go through its ring in order, and bulk-async
    groups are per issuing thread; the tile's first chunk is preceded by store_wait(0)).
    Else: a masked pointer store of columns < col + ncols (``ptr`` row stride ``stride_m``)."""
    if EPI_TMA:
        if c >= NB:
            tma.store_wait(NB - 1)
        buf = epi_bufs.index(BUF0 + c % NB)
        buf.store(val.to(buf.dtype))
        fence_async_shared()  # generic-proxy smem writes -> visible to the TMA engine
        tma.async_copy_shared_to_global(desc, [off_m, col], buf)
    else:
        _store_ptr(val, ptr, stride_m, off_m, col, M, ncols)


# ---------------------------------------------------------------------------------------------
# forward: h = act(x W^T + b) [* up]
# ---------------------------------------------------------------------------------------------


@gluon.jit
def _fwd_producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                  GATED: gl.constexpr, GROUP_M: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    if GATED:
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
    else:
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BK)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_mn(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        for kk in range(k_tiles):
            s = it % STAGES
            # slot free? (fresh barrier: parity-1 wait passes, so the ring fills at once)
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES)
            k = kk * BK
            tma.async_copy_global_to_shared(x_desc, [off_m, k], bar, a_bufs.index(s))
            if GATED:
                b = b_bufs.index(s)
                # gate rows off_n.. and up rows N + off_n..; rows past 2N are zero-filled, gate
                # rows past N read up rows into columns >= N, which are never stored.
                tma.async_copy_global_to_shared(w_desc, [off_n, k], bar, b.slice(0, BN))
                tma.async_copy_global_to_shared(w_desc, [N + off_n, k], bar, b.slice(BN, BN))
            else:
                tma.async_copy_global_to_shared(w_desc, [off_n, k], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _mainloop(a_bufs, b_bufs, ready, empty, acc, it, k_tiles, B_KMAJOR: gl.constexpr,
              done_bar, SIGNAL_DONE: gl.constexpr):
    """acc = A_tile @ B_tile over k_tiles ring slots starting at ring position ``it``.

    One wgmma group stays in flight; slot s is released (empty[s] arrive) once every warp of
    the partition has retired the wgmma that read it: each warpgroup's wgmma.wait, then a
    partition-wide barrier, then one arrive by thread 0 (the empty barriers have count 1).
    SIGNAL_DONE (ping-pong): after the last K step is issued, arrive on ``done_bar`` so the
    other consumer may start its mainloop (it then never waits on a ring position before this
    consumer has waited on the one STAGES earlier: no mbarrier phase aliasing)."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    for kk in range(k_tiles):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        if B_KMAJOR:
            b = b_bufs.index(s).permute((1, 0))
        else:
            b = b_bufs.index(s)
        acc = warpgroup_mma(a_bufs.index(s), b, acc, use_acc=kk > 0, is_async=True)
        # <= 1 group in flight: the wgmma of step kk-1 has retired in this warpgroup
        acc = warpgroup_mma_wait(1, deps=(acc,))
        gl.thread_barrier()  # ... and in every warpgroup of the partition
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)
        it += 1
    if SIGNAL_DONE:
        mbarrier.arrive(done_bar)  # all warps passed their last ready-wait (barrier above)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    gl.thread_barrier()
    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
    return acc, it


@gluon.jit
def _fwd_consumer(x_desc, w_desc, h_desc, pg_desc, pu_desc, bias_ptr, h_ptr, pre_ptr,
                  a_bufs, b_bufs, ready, empty, order_bars, epi_bufs, M, N, K, stride_hm, stride_pm,
                  ACT: gl.constexpr, GATED: gl.constexpr, HAS_BIAS: gl.constexpr,
                  STORE_PRE: gl.constexpr, EPI_TMA: gl.constexpr, EPI_N: gl.constexpr,
                  GROUP_M: gl.constexpr, NUM_CONSUMERS: gl.constexpr, WG: gl.constexpr,
                  CONSUMER_WARPS: gl.constexpr):
    """One consumer: NUM_CONSUMERS == 1 -> the cooperative schedule (this partition has 8
    warps, two warpgroups on the same 128-row tile); NUM_CONSUMERS == 2 -> ping-pong (this is
    consumer WG of two 4-warp partitions; it takes the CTA's tiles i = WG, WG + 2, ... and
    its own epilogue staging buffers, so one consumer's epilogue overlaps the other's MMAs).
    Ping-pong order: consumer w starts the mainloop of tile i only after the other consumer has
    issued all of tile i-1's K steps (order_bars[1-w], one completion per tile of the other
    consumer): the two mainloops alternate, and each ring position is waited on in order."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    if GATED:
        ACC_N: gl.constexpr = 2 * BN
    else:
        ACC_N: gl.constexpr = BN
    if EPI_TMA:
        PARTS: gl.constexpr = BN // EPI_N
    else:
        PARTS: gl.constexpr = 1  # pointer stores: no staging buffer, one store per output
    NB: gl.constexpr = epi_bufs.shape[0] // NUM_CONSUMERS  # this consumer's staging buffers
    B0: gl.constexpr = WG * NB  # ... starting here
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, ACC_N, 16])
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BK)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    my_tiles = gl.cdiv(num_tiles - pid, nprog)  # the grid never exceeds num_tiles
    acc = gl.zeros([BM, ACC_N], gl.float32, acc_layout)
    for i in range(WG, my_tiles, NUM_CONSUMERS):
        pid_m, pid_n = _tile_mn(pid + i * nprog, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        if NUM_CONSUMERS == 2:
            # wait for the other consumer's mainloop of tile i-1 (its local tile (i-1)//2)
            mbarrier.wait(order_bars.index(1 - WG), ((i - 1) // 2) & 1, pred=i > 0)
        # the producer fills the ring with the CTA's tiles in order: tile i is at i * k_tiles
        acc, _ = _mainloop(a_bufs, b_bufs, ready, empty, acc, i * k_tiles, k_tiles, True,
                            order_bars.index(WG), NUM_CONSUMERS == 2)

        # ---- epilogue (the producer is already loading the next tile's K slices) ----
        if HAS_BIAS:
            c = gl.arange(0, ACC_N, layout=gl.SliceLayout(0, acc_layout))
            n = off_n + (c % BN)
            if GATED:
                bidx = n + (c // BN) * N  # gate bias, then up bias at N + n
            else:
                bidx = n
            bias = gl.load(bias_ptr + bidx, mask=n < N, other=0.0).to(gl.float32)
            y = acc + bias[None, :]
        else:
            y = acc
        if EPI_TMA:
            tma.store_wait(0)  # this consumer's previous stores (drained during the mainloop)
        # Column chunks of EPI_N keep the live set at the accumulator plus one chunk.
        E: gl.constexpr = EPI_TMA
        if GATED:
            g, u = _halves(y)
            gs = _col_chunks(g, PARTS)
            us = _col_chunks(u, PARTS)
            for j in gl.static_range(PARTS):
                col = off_n + j * (BN // PARTS)
                rem = N - col
                if STORE_PRE:
                    _emit(gs[j], pg_desc, pre_ptr, stride_pm, off_m, col, rem, M, epi_bufs, 3 * j, E, NB, B0)
                    _emit(us[j], pu_desc, pre_ptr + N, stride_pm, off_m, col, rem, M, epi_bufs, 3 * j + 1,
                          E, NB, B0)
                    hv = _act(gs[j], ACT) * us[j]
                    _emit(hv, h_desc, h_ptr, stride_hm, off_m, col, rem, M, epi_bufs, 3 * j + 2, E, NB, B0)
                else:
                    hv = _act(gs[j], ACT) * us[j]
                    _emit(hv, h_desc, h_ptr, stride_hm, off_m, col, rem, M, epi_bufs, j, E, NB, B0)
        else:
            ys = _col_chunks(y, PARTS)
            for j in gl.static_range(PARTS):
                col = off_n + j * (BN // PARTS)
                rem = N - col
                if STORE_PRE:
                    _emit(ys[j], pg_desc, pre_ptr, stride_pm, off_m, col, rem, M, epi_bufs, 2 * j, E, NB, B0)
                    hv = _act(ys[j], ACT)
                    _emit(hv, h_desc, h_ptr, stride_hm, off_m, col, rem, M, epi_bufs, 2 * j + 1, E, NB, B0)
                else:
                    hv = _act(ys[j], ACT)
                    _emit(hv, h_desc, h_ptr, stride_hm, off_m, col, rem, M, epi_bufs, j, E, NB, B0)
    if EPI_TMA:
        tma.store_wait(0)


@gluon.jit
def _fwd_kernel(x_desc, w_desc, h_desc, pg_desc, pu_desc, bias_ptr, h_ptr, pre_ptr,
                M, N, K, stride_hm, stride_pm,
                ACT: gl.constexpr, GATED: gl.constexpr, HAS_BIAS: gl.constexpr,
                STORE_PRE: gl.constexpr, EPI_TMA: gl.constexpr, STAGES: gl.constexpr,
                EPI_N: gl.constexpr, EPI_BUFS: gl.constexpr, GROUP_M: gl.constexpr,
                PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                num_warps: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    dtype: gl.constexpr = x_desc.dtype
    if GATED:
        ACC_N: gl.constexpr = 2 * BN
    else:
        ACC_N: gl.constexpr = BN
    if PINGPONG:
        NUM_CONSUMERS: gl.constexpr = 2
    else:
        NUM_CONSUMERS: gl.constexpr = 1
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, ACC_N, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order_bars.index(i), count=1)
    if EPI_TMA:
        epi_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, EPI_N], dtype)
        epi_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS * EPI_BUFS, BM, EPI_N], epi_layout)
    else:
        epi_bufs = ready  # unused placeholder
    fence_async_shared()  # barrier inits visible to the async proxy (TMA complete_tx)

    if PINGPONG:
        # num_warps == 4: default partition = consumer 0; worker 0 = consumer 1 (4 warps);
        # worker 1 = the TMA producer (1 warp)
        gl.warp_specialize([
            (_fwd_consumer, (x_desc, w_desc, h_desc, pg_desc, pu_desc, bias_ptr, h_ptr, pre_ptr,
                             a_bufs, b_bufs, ready, empty, order_bars, epi_bufs, M, N, K,
                             stride_hm, stride_pm,
                             ACT, GATED, HAS_BIAS, STORE_PRE, EPI_TMA, EPI_N, GROUP_M, NUM_CONSUMERS, 0,
                             num_warps)),
            (_fwd_consumer, (x_desc, w_desc, h_desc, pg_desc, pu_desc, bias_ptr, h_ptr, pre_ptr,
                             a_bufs, b_bufs, ready, empty, order_bars, epi_bufs, M, N, K,
                             stride_hm, stride_pm,
                             ACT, GATED, HAS_BIAS, STORE_PRE, EPI_TMA, EPI_N, GROUP_M, NUM_CONSUMERS, 1,
                             num_warps)),
            (_fwd_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GATED, GROUP_M)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        # num_warps == 8: default partition = both consumer warpgroups; worker = producer
        gl.warp_specialize([
            (_fwd_consumer, (x_desc, w_desc, h_desc, pg_desc, pu_desc, bias_ptr, h_ptr, pre_ptr,
                             a_bufs, b_bufs, ready, empty, order_bars, epi_bufs, M, N, K,
                             stride_hm, stride_pm,
                             ACT, GATED, HAS_BIAS, STORE_PRE, EPI_TMA, EPI_N, GROUP_M, NUM_CONSUMERS, 0,
                             num_warps)),
            (_fwd_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GATED, GROUP_M)),
        ], [1], [PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------
# backward: dh = dy @ W_out, then the dgated (or d-act) epilogue
# ---------------------------------------------------------------------------------------------


@gluon.jit
def _bwd_release_points(k_tiles, STAGES: gl.constexpr):
    """The K steps of a tile at which the epilogue buffers change hands.

    rc: the consumer, at K step rc of tile t, waits (store_wait(0)) until tile t-1's TMA stores
        have read pg/pu/h_smem, then arrives on pre_empty (one arrival per tile).
    rp: the producer, right after issuing K load rp of tile t, waits on pre_empty (arrival t)
        and TMA-loads tile t's gate|up into pg/pu_smem (completing pre_ready phase t).
    rp >= rc: the arrival never depends on a load the producer has not issued (no deadlock).
    rp = rc + STAGES - 1: the producer can only issue load rp once the consumer has released
    step rp - STAGES, i.e. reached step rc, so the pre_empty wait costs the producer little and
    the K loads are not held up; the gate|up load then has the rest of the K loop to land.
    The stores of tile t-1 drain during the first rc K steps of tile t (rc = 1)."""
    rc = gl.minimum(k_tiles - 1, 1)
    rp = gl.minimum(k_tiles - 1, rc + STAGES - 1)
    return rc, rp


@gluon.jit
def _bwd_producer(dy_desc, w_desc, pg_desc, pu_desc, a_bufs, b_bufs, pg_smem, pu_smem,
                  ready, empty, pre_ready, pre_empty, M, N, K,
                  GATED: gl.constexpr, PRE_TMA: gl.constexpr, GROUP_M: gl.constexpr):
    BM: gl.constexpr = dy_desc.block_type.shape[0]
    BK: gl.constexpr = dy_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    NBYTES: gl.constexpr = dy_desc.block_type.nbytes + w_desc.block_type.nbytes
    if GATED:
        PRE_BYTES: gl.constexpr = 2 * pg_desc.block_type.nbytes
    else:
        PRE_BYTES: gl.constexpr = pg_desc.block_type.nbytes
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BK)
    rc, rp = _bwd_release_points(k_tiles, STAGES)
    it = 0
    tcount = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_mn(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES)
            k = kk * BK
            tma.async_copy_global_to_shared(dy_desc, [off_m, k], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [k, off_n], bar, b_bufs.index(s))
            it += 1
            if PRE_TMA:
                if kk == rp:
                    # the saved gate|up tile of this tile's epilogue, into the (freed) buffers
                    mbarrier.wait(pre_empty, tcount & 1)
                    mbarrier.expect(pre_ready, PRE_BYTES)
                    tma.async_copy_global_to_shared(pg_desc, [off_m, off_n], pre_ready, pg_smem)
                    if GATED:
                        tma.async_copy_global_to_shared(pu_desc, [off_m, off_n], pre_ready, pu_smem)
        tcount += 1


@gluon.jit
def _bwd_consumer(dy_desc, w_desc, dg_desc, du_desc, h_desc, pre_ptr, dpre_ptr, h_ptr,
                  a_bufs, b_bufs, pg_smem, pu_smem, h_smem, ready, empty, pre_ready, pre_empty,
                  M, N, K, stride_pm, stride_dm, stride_hm,
                  ACT: gl.constexpr, GATED: gl.constexpr, STORE_H: gl.constexpr, PRE_TMA: gl.constexpr,
                  EPI_SPLIT: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = dy_desc.block_type.shape[0]
    BK: gl.constexpr = dy_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = gl.cdiv(K, BK)
    rc, rp = _bwd_release_points(k_tiles, STAGES)
    acc = gl.zeros([BM, BN], gl.float32, acc_layout)
    CW: gl.constexpr = BN // EPI_SPLIT
    CL: gl.constexpr = _col_chunks(acc, EPI_SPLIT)[0].type.layout  # layout of one chunk
    it = 0
    tcount = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_mn(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        # ---- mainloop: dh tile = dy[off_m.., :] @ W_out[:, off_n..] (B tiles [BK, BN] as they lie)
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))
            if PRE_TMA:
                if kk == rc:
                    # the previous tile's epilogue stores have read pg/pu/h_smem: free them
                    tma.store_wait(0)
            gl.thread_barrier()  # both warpgroups past their wgmma wait (and the store wait)
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)
            if PRE_TMA:
                mbarrier.arrive(pre_empty, pred=kk == rc)
            it += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))

        # ---- epilogue: dh (acc) meets the saved pre-activation of this tile, in EPI_SPLIT
        # column chunks (live set: the accumulator + one chunk of gate, up and results)
        if PRE_TMA:
            mbarrier.wait(pre_ready, tcount & 1)
        dhs = _col_chunks(acc, EPI_SPLIT)
        for i in gl.static_range(EPI_SPLIT):
            dh = dhs[i]
            col = off_n + i * CW
            if PRE_TMA:
                g = pg_smem.slice(i * CW, CW, dim=1).load(CL).to(gl.float32)
                if GATED:
                    u = pu_smem.slice(i * CW, CW, dim=1).load(CL).to(gl.float32)
            else:
                g = _load_ptr(pre_ptr, stride_pm, off_m, col, M, N - col, BM, CW, CL)
                if GATED:
                    u = _load_ptr(pre_ptr + N, stride_pm, off_m, col, M, N - col, BM, CW, CL)
            if GATED:
                a, dg = _act_bwd(g, dh * u, ACT)
                du = dh * a
                if STORE_H:
                    hv = a * u
            else:
                a, dg = _act_bwd(g, dh, ACT)
                if STORE_H:
                    hv = a
            if PRE_TMA:
                # d(gate|up) overwrite the gate|up chunk in shared memory: the compiler's
                # barrier orders every thread's reads of the chunk before the writes
                pg_smem.slice(i * CW, CW, dim=1).store(dg.to(pg_smem.dtype))
                if GATED:
                    pu_smem.slice(i * CW, CW, dim=1).store(du.to(pu_smem.dtype))
                if STORE_H:
                    h_smem.slice(i * CW, CW, dim=1).store(hv.to(h_smem.dtype))
            else:
                _store_ptr(dg, dpre_ptr, stride_dm, off_m, col, M, N - col)
                if GATED:
                    _store_ptr(du, dpre_ptr + N, stride_dm, off_m, col, M, N - col)
                if STORE_H:
                    _store_ptr(hv, h_ptr, stride_hm, off_m, col, M, N - col)
        if PRE_TMA:
            fence_async_shared()  # generic-proxy smem writes -> visible to the TMA engine
            tma.async_copy_shared_to_global(dg_desc, [off_m, off_n], pg_smem)
            if GATED:
                tma.async_copy_shared_to_global(du_desc, [off_m, off_n], pu_smem)
            if STORE_H:
                tma.async_copy_shared_to_global(h_desc, [off_m, off_n], h_smem)
            # no wait here: the stores drain during the next tile's first K steps (see rc)
        tcount += 1
    if PRE_TMA:
        tma.store_wait(0)


@gluon.jit
def _bwd_kernel(dy_desc, w_desc, pg_desc, pu_desc, dg_desc, du_desc, h_desc, pre_ptr, dpre_ptr, h_ptr,
                M, N, K, stride_pm, stride_dm, stride_hm,
                ACT: gl.constexpr, GATED: gl.constexpr, STORE_H: gl.constexpr, PRE_TMA: gl.constexpr,
                STAGES: gl.constexpr, EPI_SPLIT: gl.constexpr, GROUP_M: gl.constexpr,
                PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = dy_desc.block_type.shape[0]
    BK: gl.constexpr = dy_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    dtype: gl.constexpr = dy_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], dy_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BK, BN], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    pre_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(pre_bars.index(i), count=1)
    pre_ready = pre_bars.index(0)
    pre_empty = pre_bars.index(1)
    if PRE_TMA:
        pg_smem = gl.allocate_shared_memory(dtype, [BM, BN], pg_desc.layout)
        if GATED:
            pu_smem = gl.allocate_shared_memory(dtype, [BM, BN], pu_desc.layout)
        else:
            pu_smem = pg_smem
        if STORE_H:
            h_smem = gl.allocate_shared_memory(dtype, [BM, BN], h_desc.layout)
        else:
            h_smem = pg_smem
    else:  # placeholders, never used
        pg_smem = a_bufs
        pu_smem = a_bufs
        h_smem = a_bufs
    fence_async_shared()  # barrier inits visible to the async proxy

    gl.warp_specialize([
        (_bwd_consumer, (dy_desc, w_desc, dg_desc, du_desc, h_desc, pre_ptr, dpre_ptr, h_ptr,
                         a_bufs, b_bufs, pg_smem, pu_smem, h_smem, ready, empty, pre_ready, pre_empty,
                         M, N, K, stride_pm, stride_dm, stride_hm,
                         ACT, GATED, STORE_H, PRE_TMA, EPI_SPLIT, GROUP_M, num_warps)),
        (_bwd_producer, (dy_desc, w_desc, pg_desc, pu_desc, a_bufs, b_bufs, pg_smem, pu_smem,
                         ready, empty, pre_ready, pre_empty, M, N, K, GATED, PRE_TMA, GROUP_M)),
    ], [1], [PRODUCER_REGS])


# =============================================================================================
# host side
# =============================================================================================

_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

# Shared memory per block on H100/H200 (sm_90): 227 KB opt-in.
SMEM_LIMIT = 232448


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward kernel configuration.

    cooperative (pingpong=False): one 8-warp consumer partition = 2 warpgroups x 64 rows of a
      BM=128 tile; accumulator 128 x ACC_N fp32 = 128 x 256 -> 128 registers/thread.
    ping-pong (pingpong=True): two 4-warp consumer partitions, each owning a whole 128-row tile
      (alternate tiles of the CTA); accumulator 128 x ACC_N = 128 x 128 fp32 -> 128
      registers/thread; one consumer's epilogue overlaps the other's mainloop.
    """
    BM: int = 128
    BN: int = 128  # columns of h per tile (the accumulator is 2*BN wide when gated)
    BK: int = 64
    STAGES: int = 4
    EPI_N: int = 64  # epilogue TMA-store chunk width
    EPI_BUFS: int = 2  # epilogue staging buffers per consumer (ring)
    GROUP_M: int = 8
    pingpong: bool = False
    num_warps: int = 8  # warps per consumer partition (8 cooperative, 4 ping-pong)
    consumer_regs: int = 232  # ping-pong: registers of the second consumer (worker) partition
    producer_regs: int = 40
    maxnreg: int = 168  # 12 warps (3 warpgroups) x 32 threads x 168 <= 64K registers

    def smem_bytes(self, gated: bool, elem: int = 2) -> int:
        acc_n = 2 * self.BN if gated else self.BN
        consumers = 2 if self.pingpong else 1
        return (self.STAGES * (self.BM + acc_n) * self.BK * elem
                + consumers * self.EPI_BUFS * self.BM * self.EPI_N * elem)


# cooperative: 4 x 48 KB ring + 2 x 16 KB staging = 224 KB
GATED_FWD_CONFIG = FwdConfig(BN=128)
PLAIN_FWD_CONFIG = FwdConfig(BN=256)
# ping-pong: gated 6 x 32 KB ring + 2 consumers x 2 x 8 KB staging = 224 KB,
#            plain 5 x 32 KB ring + 2 consumers x 2 x 16 KB staging = 224 KB
GATED_FWD_PINGPONG = FwdConfig(BN=64, STAGES=6, EPI_N=32, pingpong=True, num_warps=4)
PLAIN_FWD_PINGPONG = FwdConfig(BN=128, STAGES=5, pingpong=True, num_warps=4)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    BM: int = 128
    BN: int = 128
    BK: int = 64
    STAGES: int = 4
    EPI_SPLIT: int = 2  # epilogue column chunks
    GROUP_M: int = 8
    num_warps: int = 8
    producer_regs: int = 40
    maxnreg: int = 168


GATED_BWD_CONFIG = BwdConfig()
PLAIN_BWD_CONFIG = BwdConfig()


def _sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index or 0) if t.is_cuda else 132  # 132: the H200's, for compiling off-GPU


def _tma_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0)


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t itself when TMA can read it, else a copy with a 16-byte aligned row stride (the view has
    t's logical shape; TMA zero-fills past it, so the padding is never read)."""
    if _tma_ok(t):
        return t
    rows, cols = t.shape
    es = t.element_size()
    pad = -(-cols * es // 16) * 16 // es
    buf = torch.empty((rows, pad), dtype=t.dtype, device=t.device)
    view = buf[:, :cols]
    view.copy_(t)
    return view


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPE[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _act_code(activation: Activation | str) -> int:
    act = Activation(activation)
    if act not in SUPPORTED:
        raise ValueError(f"the Gluon epilogues do not implement {act.value}")
    return act.code


def _launch(kernel, grid, args, kw):
    """The one place kernels are launched (benchmarks/gluon_compile_check.py swaps it for an
    sm_90a compile on a machine without a GPU)."""
    kernel[grid](*args, **kw)


def fwd_launch(x, w, bias, activation, gated, store_pre, h, pre, cfg: FwdConfig | None = None):
    """(kernel, args, kwargs, grid) for the forward; h [M, N] and pre [M, 2N or N] (or None)
    are the outputs, already allocated (contiguous or at least unit column stride)."""
    M, K = x.shape
    rows = w.shape[0]
    N = rows // 2 if gated else rows
    cfg = cfg or (GATED_FWD_CONFIG if gated else PLAIN_FWD_CONFIG)
    assert cfg.smem_bytes(gated, x.element_size()) <= SMEM_LIMIT - 1024, "config exceeds shared memory"
    x_t = _tma_operand(x)
    w_t = _tma_operand(w)
    x_desc = _desc(x_t, [cfg.BM, cfg.BK])
    w_desc = _desc(w_t, [cfg.BN, cfg.BK])
    outs = [h] + ([pre] if store_pre else [])
    # TMA stores need 16-byte aligned rows; the up half of pre starts N elements in.
    up_aligned = (N * h.element_size()) % 16 == 0
    epi_tma = all(_tma_ok(o) for o in outs) and (not (store_pre and gated) or up_aligned)
    if epi_tma:
        h_desc = _desc(h, [cfg.BM, cfg.EPI_N])
        if store_pre:
            pg_desc = _desc(pre[:, :N], [cfg.BM, cfg.EPI_N])
            pu_desc = _desc(pre[:, N:], [cfg.BM, cfg.EPI_N]) if gated else pg_desc
        else:
            pg_desc = pu_desc = h_desc
    else:  # placeholders, never dereferenced
        h_desc = pg_desc = pu_desc = x_desc
    pre_t = pre if store_pre else h
    num_tiles = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
    grid = (max(1, min(num_tiles, _sms(x))),)
    args = (x_desc, w_desc, h_desc, pg_desc, pu_desc, bias if bias is not None else h, h, pre_t,
            M, N, K, h.stride(0), pre_t.stride(0))
    kw = dict(ACT=_act_code(activation), GATED=bool(gated), HAS_BIAS=bias is not None,
              STORE_PRE=bool(store_pre),
              EPI_TMA=epi_tma, STAGES=cfg.STAGES, EPI_N=cfg.EPI_N, EPI_BUFS=cfg.EPI_BUFS, GROUP_M=cfg.GROUP_M,
              PINGPONG=cfg.pingpong, CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs,
              num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
    return _fwd_kernel, args, kw, grid


def _check_fwd(x, w, bias, gated):
    if x.dtype not in _GL_DTYPE or w.dtype != x.dtype:
        raise TypeError(f"bf16/fp16 inputs of one dtype expected, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    if gated and w.shape[0] % 2:
        raise ValueError("gated weight needs an even number of rows")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0] or bias.stride(0) != 1):
        raise ValueError("bias must be a contiguous vector with one entry per weight row")


def gemm_act_fwd(x, w, bias=None, activation="silu", gated=True, store_pre=False,
                 cfg: FwdConfig | None = None, out: torch.Tensor | None = None):
    """h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)  (gated; w = [Wg; Wu] is [2N, K]) or
    h = act(x @ w^T + b) (plain).  Returns (h, pre), pre = x @ w^T + bias when ``store_pre``.
    ``out``: a [M, N] buffer (or view with unit-stride columns) for h."""
    _check_fwd(x, w, bias, gated)
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    pre = torch.empty((M, w.shape[0]), dtype=x.dtype, device=x.device) if store_pre else None
    if M == 0 or N == 0:
        return h, pre
    if K == 0:
        raise ValueError("K = 0")
    kernel, args, kw, grid = fwd_launch(x, w, bias, activation, gated, store_pre, h, pre, cfg)
    _launch(kernel, grid, args, kw)
    return h, pre



def bwd_launch(dy, w_out, pre, activation, gated, dpre, h, cfg: BwdConfig | None = None):
    """(kernel, args, kwargs, grid) for the backward.  dy [M, D], w_out [D, N], pre and dpre
    [M, 2N] (gated) or [M, N]; dpre may be pre; h [M, N] or None (STORE_H off)."""
    M, D = dy.shape
    N = w_out.shape[1]
    cfg = cfg or (GATED_BWD_CONFIG if gated else PLAIN_BWD_CONFIG)
    dy_t = _tma_operand(dy)
    w_t = _tma_operand(w_out)  # N % 8 != 0: a copy with 16-byte aligned rows
    dy_desc = _desc(dy_t, [cfg.BM, cfg.BK])
    w_desc = _desc(w_t, [cfg.BK, cfg.BN])
    es = pre.element_size()
    outs = [pre, dpre] + ([h] if h is not None else [])
    pre_tma = all(_tma_ok(o) for o in outs) and (not gated or (N * es) % 16 == 0)
    blk = [cfg.BM, cfg.BN]
    if pre_tma:
        pg_desc = _desc(pre[:, :N], blk)
        dg_desc = _desc(dpre[:, :N], blk)
        pu_desc = _desc(pre[:, N:], blk) if gated else pg_desc
        du_desc = _desc(dpre[:, N:], blk) if gated else dg_desc
        h_desc = _desc(h, blk) if h is not None else pg_desc
    else:  # placeholders with the right block shape (never dereferenced)
        ph = torch.empty((cfg.BM, cfg.BN), dtype=dy.dtype, device=dy.device)
        pg_desc = pu_desc = dg_desc = du_desc = h_desc = _desc(ph, blk)
    h_t = h if h is not None else dpre
    num_tiles = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
    grid = (max(1, min(num_tiles, _sms(dy))),)
    args = (dy_desc, w_desc, pg_desc, pu_desc, dg_desc, du_desc, h_desc, pre, dpre, h_t,
            M, N, D, pre.stride(0), dpre.stride(0), h_t.stride(0))
    kw = dict(ACT=_act_code(activation), GATED=bool(gated), STORE_H=h is not None, PRE_TMA=pre_tma,
              STAGES=cfg.STAGES, EPI_SPLIT=cfg.EPI_SPLIT, GROUP_M=cfg.GROUP_M,
              PRODUCER_REGS=cfg.producer_regs, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
    return _bwd_kernel, args, kw, grid


def gemm_act_bwd(dy, w_out, pre, activation="silu", gated=True, dpre=None, store_h=True,
                 cfg: BwdConfig | None = None):
    """dh = dy @ w_out (never stored); returns (dpre, h or None):
    gated: dpre = [dh * up * act'(gate) | dh * act(gate)], h = act(gate) * up;
    plain: dpre = dh * act'(z), h = act(z).  ``dpre`` may be ``pre`` (in place)."""
    if dy.dtype not in _GL_DTYPE or w_out.dtype != dy.dtype or pre.dtype != dy.dtype:
        raise TypeError("bf16/fp16 operands of one dtype expected")
    M, D = dy.shape
    if w_out.dim() != 2 or w_out.shape[0] != D:
        raise ValueError(f"dy {tuple(dy.shape)} and w_out {tuple(w_out.shape)} do not match")
    N = w_out.shape[1]
    if tuple(pre.shape) != (M, (2 if gated else 1) * N):
        raise ValueError(f"pre has shape {tuple(pre.shape)}; expected {(M, (2 if gated else 1) * N)}")
    dpre = torch.empty_like(pre) if dpre is None else dpre
    if dpre.shape != pre.shape or dpre.dtype != pre.dtype:
        raise ValueError("dpre must match pre")
    for name, t in (("pre", pre), ("dpre", dpre)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} needs unit-stride columns")
    h = torch.empty((M, N), dtype=dy.dtype, device=dy.device) if store_h else None
    if M == 0 or N == 0:
        return dpre, h
    if D == 0:
        raise ValueError("D = 0")
    kernel, args, kw, grid = bwd_launch(dy, w_out, pre, activation, gated, dpre, h, cfg)
    _launch(kernel, grid, args, kw)
    return dpre, h


def fwd_config(gated: bool, K: int) -> FwdConfig:
    """The forward schedule for a reduction length K (PINGPONG_MAX_K)."""
    if K <= PINGPONG_MAX_K:
        return GATED_FWD_PINGPONG if gated else PLAIN_FWD_PINGPONG
    return GATED_FWD_CONFIG if gated else PLAIN_FWD_CONFIG


def serves(x: torch.Tensor, w: torch.Tensor, activation: Activation, store_pre: bool, traced: bool) -> bool:
    """Whether the Gluon forward serves this call: opted in (KernelOptions.gluon), eager (traced
    code launches through wrap_triton, which these kernels have not been tried with), Hopper
    (sm_90: its wgmma and TMA ops), bf16/fp16, an activation it implements, no pre-activation
    store (measured slower than the tl.dot kernel's), enough rows (MIN_ROWS)."""
    return (
        kernel_options().gluon
        and not traced
        and not store_pre
        and x.is_cuda
        and x.dtype in _GL_DTYPE
        and x.shape[0] >= MIN_ROWS
        and activation in SUPPORTED
        and capability(x.device.index or 0) == (9, 0)
    )
