"""Device helpers every kernel shares."""

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

# Two bf16 defects of Triton's CPU interpreter (seen in 3.6 and 3.9), worked around only when it
# runs, so that CI checks the numbers the GPU produces; compiled for a GPU these branches are
# constexpr-false and cost nothing:
# - fp32 -> bf16 converts by truncation (runtime/interpreter.py, _convert_float without a rounding
#   mode) where the GPU rounds to nearest-even: up to 1 ulp instead of 0.5. We round by hand.
# - tl.dot of bf16 operands returns garbage (~1e10). bf16 x bf16 products are exact in fp32, so
#   upcasting the operands and accumulating in fp32 is what the GPU's bf16 MMA computes.
_INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to the storage dtype, rounding to nearest-even on every backend."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (``PRECISION`` applies to fp32 operands)."""
    if _INTERPRETING and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# launching the GEMM kernels: TMA eligibility, tune once per shape bucket, then launch directly
# ---------------------------------------------------------------------------------------------

try:  # Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer path only
    TensorDescriptor = None

# Tests set this False to skip tuning every odd shape they try; the first config the prune
# function keeps for the shape runs instead.
AUTOTUNE = True

# One small fixed config under the interpreter (autotuning there would time numpy).
INTERPRETER_CONFIG = {
    "BLOCK_M": 16,
    "BLOCK_N": 32,
    "BLOCK_K": 32,
    "GROUP_M": 4,
    "PERSISTENT": True,
    "WARP_SPEC": False,
}


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether these 2-D tensors can be read through TMA descriptors: Hopper (or the interpreter,
    except bf16, whose descriptor emulation returns garbage in Triton 3.9), 16-byte aligned base
    pointers and row strides."""
    if TensorDescriptor is None:
        return False
    first = tensors[0]
    if first.is_cuda:
        if torch.cuda.get_device_capability(first.device)[0] < 9:
            return False
    elif first.dtype == torch.bfloat16:
        return False
    es = first.element_size()
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in tensors)


def descriptor(t: torch.Tensor) -> object:
    """A TMA descriptor for ``t``; its block shape is set per config by the kernel's pre-hook."""
    return TensorDescriptor.from_tensor(t, [16, 16])


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_grid(M: int, N: int, device: torch.device) -> Callable[[dict], tuple[int]]:
    """The launch grid for a config: one program per [BLOCK_M, BLOCK_N] output tile, or one per SM
    walking the tiles when the config is PERSISTENT."""

    def grid(cfg: dict) -> tuple[int]:
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        return (min(tiles, num_sms(device.index or 0)) if cfg["PERSISTENT"] else tiles,)

    return grid


class Launcher:
    """Autotunes a kernel once per key, then launches the JIT kernel directly with the pick: the
    autotuner's own per-call bookkeeping costs ~25 us of host time (H100 host), a sixth of a
    decode-sized forward. ``set_blocks(nargs)`` gives TMA descriptors the config's block shapes;
    ``prune(configs, nargs, **meta)`` keeps the configs that suit a call."""

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
        self.tuned: dict[tuple, triton.Config] = {}

    def __call__(
        self,
        key: tuple,
        grid: Callable[[dict], tuple[int]],
        args: tuple,
        meta: dict,
        config: triton.Config | None = None,
    ) -> None:
        nargs = dict(zip(self.kernel.arg_names, args, strict=False))
        chosen = config or self.tuned.get(key)
        if chosen is None and AUTOTUNE:
            self.autotuned[grid](*args, **meta)
            self.tuned[key] = self.autotuned.best_config
            return
        if chosen is None:
            chosen = self.prune(self.configs, nargs, **meta)[0]
        self.set_blocks({**nargs, **meta, **chosen.kwargs})
        self.kernel[grid(chosen.kwargs)](
            *args, **meta, **chosen.kwargs, num_warps=chosen.num_warps, num_stages=chosen.num_stages
        )

    def interpret(self, args: tuple, meta: dict, M: int, N: int) -> None:
        """Under Triton's CPU interpreter: the fixed small config, on at most 4 programs (fewer than
        the tiles, so the persistent tile loop runs too)."""
        cfg = INTERPRETER_CONFIG
        programs = min(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), 4)
        self.set_blocks({**dict(zip(self.kernel.arg_names, args, strict=False)), **meta, **cfg})
        self.kernel[(programs,)](*args, **meta, **cfg)
