"""Device helpers every kernel shares."""

import os

import triton
import triton.language as tl

# Triton's CPU interpreter converts fp32 -> bf16 by truncation (runtime/interpreter.py,
# _convert_float without a rounding mode) where the GPU rounds to nearest-even: up to 1 ulp
# instead of 0.5. Under the interpreter we round by hand, so that CI checks the numbers the GPU
# produces; compiled for a GPU this branch is constexpr-false and costs nothing.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to the storage dtype, rounding to nearest-even on every backend."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
