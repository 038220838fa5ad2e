"""Which implementation serves a call: the Triton kernels or the eager reference (reference.py).

The kernels serve CUDA tensors, and CPU tensors when Triton's interpreter is on (how CI runs
them); the reference serves every other device and dtype. The ops run one or the other, so a
machine without Triton still runs every op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import INTERPRETING

try:
    import triton  # noqa: F401  (the kernels' only requirement beyond torch)

    HAS_TRITON = True
except ImportError:  # no Triton on this platform: everything runs the reference path
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(*tensors: Tensor | None, traced: bool = False) -> bool:
    """Whether the Triton kernels serve these tensors (else the reference path does).
    ``traced``: the call is being traced for torch.compile, where only CUDA kernels can be
    launched (Inductor's CPU code runs no Triton, the interpreter included)."""
    ts = [t for t in tensors if t is not None]
    if not HAS_TRITON or not all(t.dtype in KERNEL_DTYPES for t in ts):
        return False
    if all(t.is_cuda for t in ts):
        return True
    return INTERPRETING and not traced and all(t.device.type == "cpu" for t in ts)


def fused_gemm_ok(dtype: torch.dtype) -> bool:
    """Whether the Triton GEMMs serve this dtype: bf16 and fp16. In fp32 Triton's dots missed the
    numerics contract on H100: IEEE fp32 with ~6x cuBLAS SGEMM's max error at K=64, TF32 with
    ~3x cuBLAS's TF32 error (Triton truncates the inputs to TF32, cuBLAS rounds them). fp32 takes
    cuBLAS for the projections and the Triton pointwise kernels for the activation instead."""
    return dtype in (torch.float16, torch.bfloat16)


def rows(t: Tensor) -> Tensor:
    """[..., N] -> a 2-D [M, N] view with unit-stride columns (copies only when it must)."""
    n = t.shape[-1]
    t2 = t.reshape(-1, n) if n else t.reshape(math.prod(t.shape[:-1]), 0)  # -1 is ambiguous at width 0
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()
