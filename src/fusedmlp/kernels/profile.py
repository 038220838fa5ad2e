"""How a kernel shows up in a profiler trace: declared by each kernel file next to its kernel,
read by ``fusedmlp.profiler`` (which therefore knows no fusedmlp kernel by name)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one launch must do at the least: FLOPs, bytes through device memory (each input read
    once, each output written once), and the part of those bytes that is [tokens, intermediate]
    tensors (what fusion exists to remove)."""

    flops: int
    bytes: int
    intermediate_bytes: int


@dataclasses.dataclass(frozen=True)
class KernelProfile:
    """``name``: the kernel's name in traces (the @triton.jit function's name, or a custom op's
    qualified name). ``op``: what it computes, in words. ``gemm``: matrix work (else it moves
    memory). ``cost``: its :class:`Cost` for given sizes (the arguments are the kernel's own)."""

    name: str
    op: str
    gemm: bool
    library: str = "fusedmlp"
    cost: Callable[..., Cost] | None = dataclasses.field(default=None, compare=False)
