"""Triton kernels, one op per file: the @triton.jit kernels, then the launcher.

No nn.Module and no autograd here; ``fusedmlp.ops`` wraps the launchers as torch ops.

- ``runtime.py``: what every kernel shares (storage casts, the dot, the interpreter's workarounds);
- ``epilogue.py``: the activations as Triton device functions, a forward/backward pair each;
- ``gemm.py``: the GEMM skeleton (tile scheduler, K loop, configs, shared-memory budget, launcher)
  that ``gemm_act.py`` (forward) and ``gemm_act_bwd.py`` (backward) fill with their epilogues;
- ``pointwise.py``: the (gated) activation as an elementwise kernel;
- ``narrow_mlp.py``: a whole stack of narrow layers as one kernel.

Each kernel file declares its ``PROFILES``: how its kernels appear in a profiler trace.
This module imports no Triton, so the library loads where Triton is missing.
"""

from __future__ import annotations

import importlib
import os

from .profile import KernelProfile

# Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors. Triton reads the
# variable when a kernel is decorated; this is the one place fusedmlp reads it.
INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_KERNEL_MODULES = ("gemm_act", "gemm_act_bwd", "pointwise", "narrow_mlp", "grouped")


def profiles() -> list[KernelProfile]:
    """Every fusedmlp kernel's profiler description (empty where Triton cannot be imported)."""
    out: list[KernelProfile] = []
    for name in _KERNEL_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            return []
        out.extend(module.PROFILES)
    return out
