"""Device helpers every kernel shares."""

import os

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
