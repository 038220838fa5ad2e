"""Device helpers every kernel shares, and the device facts the launchers size themselves by.

Two bf16 defects of Triton's CPU interpreter (seen in 3.6 and 3.9) are worked around here, only
when it runs, so that CI checks the numbers the GPU produces; compiled for a GPU these branches
are constexpr-false and cost nothing:
- fp32 -> bf16 converts by truncation (runtime/interpreter.py, _convert_float without a rounding
  mode) where the GPU rounds to nearest-even: up to 1 ulp instead of 0.5. We round by hand.
- tl.dot of bf16 operands multiplies their raw uint16 bits (garbage, ~1e10). bf16 x bf16
  products are exact in fp32, so upcasting the operands and accumulating in fp32 is what the
  GPU's bf16 MMA computes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRETING

_INTERPRETING: tl.constexpr = tl.constexpr(INTERPRETING)

# Shared memory one program may use on sm_90 (H100/H200: 227 KB per block). Kernels whose
# working set is modelled on the host (narrow_mlp) check against it; the GEMM configs leave the
# epilogue's scratch on top of their pipeline stages (gemm.SMEM_PIPELINE_BUDGET).
SMEM_PER_PROGRAM = 227 * 1024


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
    """acc + a @ b with fp32 accumulation (``PRECISION`` applies to fp32 operands; pass a zero
    ``acc`` for a plain product)."""
    if _INTERPRETING and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The tl.dot input precision for ``dtype`` operands: fp32 runs full-precision dots unless the
    user opted in to TF32 for matmuls, the switch eager follows too (so the numerics contract
    compares like with like); ignored for bf16/fp16 operands."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (a may be a torch.SymInt): triton.cdiv is a constexpr function
    in Triton 3.6, whose Python wrapper costs microseconds per call on a launch path."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code (as cdiv)."""
    return 1 << (n - 1).bit_length()


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def persistent_programs(work_items: int, device: torch.device, per_sm: int = 1) -> int:
    """Programs of a persistent grid: ``per_sm`` per SM, never more than there is work; under the
    interpreter two, so that the persistent loop still runs more than once."""
    if device.type != "cuda":
        return min(work_items, 2)
    return min(work_items, per_sm * num_sms(device.index or 0))
