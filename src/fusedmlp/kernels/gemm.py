"""The GEMM skeleton every matmul kernel of fusedmlp shares; each kernel file adds only its
epilogue and its tiling choices.

Device side: :func:`tile_coords` (grouped tile order for L2 reuse) and :func:`mainloop` (the K
loop, with TMA descriptor or pointer loads, one or two B operands read against one A tile, fp32
accumulators). A kernel is then

    for tile in tl.range(pid, num_tiles, num_programs, flatten=PERSISTENT):
        pid_m, pid_n = tile_coords(...)
        acc0, acc1 = mainloop(...)
        <epilogue>

Host side: configs and their shared-memory cost, TMA eligibility and descriptors, the launch
grid, and :class:`Launcher`, which autotunes once per shape bucket and then launches directly.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ..options import kernel_options
from .launch import PlannedKernel, spec, traced_launch
from .runtime import SMEM_PER_PROGRAM, capability, cdiv, mma, next_power_of_2, num_sms

# ---------------------------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M consecutive row blocks sweep the column blocks together."""
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def mainloop(
    # A [M, K] row-major; B [rows, K] row-major (B_KN False: tiles [BN, BK], used transposed) or
    # [K, N] row-major (B_KN True: tiles [BK, BN] as they lie). TMA descriptors when USE_TMA.
    a, b,
    off_m, off_n, M, N, K,
    stride_am, stride_b,  # row strides (pointer path only; columns are unit-stride)
    B1_ROW,  # TWO_B: the second B operand's tiles start this many rows further (gate|up: N)
    USE_TMA: tl.constexpr, B_KN: tl.constexpr, TWO_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WARP_SPEC: tl.constexpr,  # producer/consumer warp specialisation of the K loop
):
    """(A @ B0, A @ B1) over the [BLOCK_M, BLOCK_N] output tile at (off_m, off_n), in fp32; the
    second is zeros unless TWO_B (the gated forward: gate and up columns against one x tile)."""
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        # Out-of-range rows/columns are clamped to 0 rather than masked, so the loads stay full
        # width; their results land in rows/columns the epilogue does not store. Not B's columns
        # when they are its contiguous axis (B_KN): a clamped index hides the contiguity from
        # Triton's analysis and every load goes scalar (7x slower, measured on the grouped MoE
        # kernels on the H200), so those are masked.
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        rm = tl.where(rm < M, rm, 0).to(tl.int64)
        n_ok = rn < N
        a_ptrs = a + rm[:, None] * stride_am + rk[None, :]
        if B_KN:
            b0_ptrs = b + rk[:, None].to(tl.int64) * stride_b + rn[None, :]
        else:
            rn = tl.where(n_ok, rn, 0)
            b0_ptrs = b + rn.to(tl.int64)[:, None] * stride_b + rk[None, :]
        b1_ptrs = b0_ptrs + B1_ROW * stride_b
    for kt in tl.range(tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPEC):
        k0 = kt * BLOCK_K
        if USE_TMA:
            ta = a.load([off_m, k0])
            if B_KN:
                tb0 = b.load([k0, off_n])
            else:
                tb0 = b.load([off_n, k0])
                if TWO_B:
                    tb1 = b.load([B1_ROW + off_n, k0])
        else:
            ta = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
            a_ptrs += BLOCK_K
            if B_KN:
                tb0 = tl.load(b0_ptrs, mask=(rk[:, None] < K - k0) & n_ok[None, :], other=0.0)
                b0_ptrs += BLOCK_K * stride_b
            else:
                tb0 = tl.load(b0_ptrs, mask=rk[None, :] < K - k0, other=0.0)
                b0_ptrs += BLOCK_K
                if TWO_B:
                    tb1 = tl.load(b1_ptrs, mask=rk[None, :] < K - k0, other=0.0)
                    b1_ptrs += BLOCK_K
        if B_KN:
            acc0 = mma(ta, tb0, acc0, PRECISION)
        else:
            acc0 = mma(ta, tb0.T, acc0, PRECISION)
            if TWO_B:
                acc1 = mma(ta, tb1.T, acc1, PRECISION)
    return acc0, acc1


# ---------------------------------------------------------------------------------------------
# host side: configs, shared memory, TMA, grid
# ---------------------------------------------------------------------------------------------

# What the K pipeline's stages may take: the per-program shared memory, less the epilogue's
# scratch (its layout conversions), measured on sm_90a compiles of the 128x128 configs.
SMEM_PIPELINE_BUDGET = SMEM_PER_PROGRAM - 7 * 1024


def config(
    bm: int, bn: int, bk: int, warps: int, stages: int, persistent: bool, group: int = 8, ws: bool = False
) -> triton.Config:
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "PERSISTENT": persistent,
          "WARP_SPEC": ws}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def smem_bytes(cfg: triton.Config, elem_bytes: int, b_tiles: int) -> int:
    """Shared memory of the K pipeline: an A tile and ``b_tiles`` B tiles per stage."""
    k = cfg.kwargs
    return (k["BLOCK_M"] + b_tiles * k["BLOCK_N"]) * k["BLOCK_K"] * elem_bytes * cfg.num_stages


def fits(configs: list[triton.Config], elem_bytes: int, b_tiles: int) -> list[triton.Config]:
    return [c for c in configs if smem_bytes(c, elem_bytes, b_tiles) <= SMEM_PIPELINE_BUDGET]


def m_bucket(M: int) -> int:
    """Autotune bucket of M: powers of two up to 16384 (decode sizes get their own buckets). M may
    be symbolic (torch.compile with dynamic shapes): its size hint decides, without a guard."""
    return min(next_power_of_2(max(hint(M), 1)), 16384)


def hint(v: int) -> int:
    """An int for a size that may be a torch.SymInt: its hint (a performance choice such as a
    bucket needs no guard), else 4096 where there is none."""
    if isinstance(v, int):
        return v
    value = getattr(getattr(v, "node", None), "hint", None)
    return int(value) if value is not None else 4096


try:  # Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer path only
    TensorDescriptor = None


def tma_ok(*tensors: torch.Tensor, traced: bool = False) -> bool:
    """Whether these 2-D tensors can be read through TMA descriptors: Hopper (or the interpreter,
    except bf16, whose descriptor emulation returns garbage in Triton 3.9), 16-byte aligned base
    pointers and row strides. ``traced``: the tensors have no address yet (torch.compile's fake
    tensors): their storage offsets stand in, the storage itself being aligned as torch allocates."""
    if TensorDescriptor is None:
        return False
    first = tensors[0]
    if first.is_cuda:
        if capability(first.device.index or 0)[0] < 9:
            return False
    elif first.dtype == torch.bfloat16:
        return False
    es = first.element_size()
    if any(t.stride(1) != 1 for t in tensors):  # a one-column tensor may carry any column stride
        return False
    if traced:
        return all((t.storage_offset() * es) % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in tensors)
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in tensors)


def descriptor(t: torch.Tensor) -> object:
    """A TMA descriptor for ``t``; its block shape is set per config by the launcher's pre-hook."""
    return TensorDescriptor.from_tensor(t, [16, 16])


def tile_grid(M: int, N: int, device: torch.device) -> Callable[[dict], tuple[int]]:
    """The launch grid for a config: one program per [BLOCK_M, BLOCK_N] output tile, or one per SM
    walking the tiles when the config is PERSISTENT."""

    def grid(cfg: dict) -> tuple[int]:
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        return (min(tiles, num_sms(device.index or 0)) if cfg["PERSISTENT"] else tiles,)

    return grid


# One small fixed config under the interpreter (autotuning there would time numpy), on at most
# 4 programs (fewer than the tiles, so the persistent tile loop runs too).
INTERPRETER_CONFIG = config(16, 32, 32, 4, 1, persistent=True, group=4)
INTERPRETER_PROGRAMS = 4


class Launcher:
    """Autotunes a kernel once per key, then launches the pick through a launch plan (launch.py):
    the autotuner's own per-call bookkeeping cost ~25 us of host time (H100 host) and the JIT's
    another 15-20, together more than a decode-sized forward runs on the GPU.
    ``set_blocks(nargs)`` gives TMA descriptors the config's block shapes (a plan's launcher takes
    them from the compiled kernel); ``prune(configs, nargs, **meta)`` keeps the configs that suit
    a call, the first of which runs when autotuning is off (KernelOptions.autotune)."""

    def __init__(
        self,
        kernel: Any,
        configs: list[triton.Config],
        key: list[str],
        prune: Callable[..., list[triton.Config]],
        set_blocks: Callable[[dict], None],
    ) -> None:
        for c in configs:
            c.pre_hook = set_blocks
        cache = (
            {"cache_results": True}
            if "cache_results" in inspect.signature(triton.autotune).parameters
            else {}
        )
        self.kernel, self.configs, self.prune, self.set_blocks = kernel, configs, prune, set_blocks
        self.autotuned = triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **cache
        )(kernel)
        self.planned = PlannedKernel(kernel)
        # the pick per key: autotuned, or the first config pruning keeps (autotuning off); the
        # dicts keep the configs alive, so id(config) names one in a plan's key
        self.tuned: dict[tuple, triton.Config] = {}
        self.untuned: dict[tuple, triton.Config] = {}
        # Triton's autotuner keeps its call's arguments and its pick on itself (nargs,
        # best_config), shared by every key: two threads tuning at once could read each other's
        # pick or give one call's descriptors the other's block shapes. Tuning (a first call
        # per key) is serialised; launches of tuned keys take no lock.
        self._tuning = threading.Lock()

    def __call__(
        self,
        key: tuple,
        grid: Callable[[dict], tuple[int]],
        args: tuple,
        meta: dict,
        config: triton.Config | None = None,
    ) -> None:
        """Launch with runtime ``args`` and constexprs ``meta``; ``key`` names the shape bucket and
        everything but the config that selects a compiled kernel (dtypes, flags, the device).
        ``config`` forces a config (sweeps): no tuning, no plan."""
        if config is not None:
            self._through_jit(None, grid(config.kwargs), args, meta, config)
            return
        tuning = kernel_options().autotune
        chosen = (self.tuned if tuning else self.untuned).get(key)
        if chosen is None:
            if tuning:
                with self._tuning:
                    chosen = self.tuned.get(key)  # tuned by another thread while this one waited
                    if chosen is None:
                        self.autotuned[grid](*args, **meta)
                        self.tuned[key] = self.autotuned.best_config
                        return
            else:
                nargs = dict(zip(self.kernel.arg_names, args, strict=False))
                chosen = self.untuned[key] = self.prune(self.configs, nargs, **meta)[0]
        plan_key = (key, id(chosen), tuple(meta.values()), spec(args))
        launch_grid = grid(chosen.kwargs)
        if not self.planned.try_launch(plan_key, launch_grid, args):
            self._through_jit(plan_key, launch_grid, args, meta, chosen)

    def pick(self, key: tuple, args: tuple, meta: dict) -> triton.Config:
        """The config for ``key`` without timing anything: the autotuned pick where eager calls
        made one, else the first that pruning keeps (what traced code launches: it must decide
        at trace time)."""
        chosen = self.tuned.get(key) or self.untuned.get(key)
        if chosen is None:
            nargs = dict(zip(self.kernel.arg_names, args, strict=False))
            chosen = self.untuned[key] = self.prune(self.configs, nargs, **meta)[0]
        return chosen

    def traced(self, key: tuple, grid: Callable[[dict], tuple], args: tuple, meta: dict) -> None:
        """Launch from traced code (a torch.library.triton_op body): through wrap_triton, so that
        Inductor launches the kernel from its generated code; no plan, no autotuning, no
        pre-hook (descriptors are made on the device: meta's DEVICE_DESC)."""
        cfg = self.pick(key, args, meta)
        constexprs = {**meta, **cfg.kwargs}
        traced_launch(self.kernel, grid(cfg.kwargs), args, constexprs, cfg.num_warps, cfg.num_stages)

    def _through_jit(
        self, plan_key: tuple | None, grid: tuple[int], args: tuple, meta: dict, cfg: triton.Config
    ) -> None:
        constexprs = {**meta, **cfg.kwargs}
        self.set_blocks({**dict(zip(self.kernel.arg_names, args, strict=False)), **constexprs})
        self.planned.launch(plan_key, grid, args, constexprs, cfg.num_warps, cfg.num_stages)

    def interpret(self, args: tuple, meta: dict, M: int, N: int) -> None:
        """Under Triton's CPU interpreter: the fixed small config."""
        cfg = INTERPRETER_CONFIG.kwargs
        programs = min(cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), INTERPRETER_PROGRAMS)
        self.set_blocks({**dict(zip(self.kernel.arg_names, args, strict=False)), **meta, **cfg})
        self.kernel[(programs,)](*args, **meta, **cfg)

    def chosen(self) -> dict[str, str]:
        """The autotuner's pick per key, for benchmark records."""
        return {str(k): str(v) for k, v in self.tuned.items()}
