"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed.

Layers (each imports only the ones listed before it; docs/design.md has the map):
activations, options, families, reference, numerics -> kernels -> ops -> functional -> modules
-> fuse -> cases, bench, profiler, cli.
"""

from . import functional, ops, options
from .activations import Activation
from .fuse import FoldReport, FuseReport, fold, fuse, unfuse
from .modules import (
    FusedGatedExperts,
    FusedGatedMLP,
    FusedLinearAct,
    FusedMLP,
    FusedSequentialMLP,
    StateLayout,
    can_fuse_sequential,
    sequential_unsupported_reason,
)
from .options import KernelOptions, Recompute

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "FoldReport",
    "FuseReport",
    "FusedGatedExperts",
    "FusedGatedMLP",
    "FusedLinearAct",
    "FusedMLP",
    "FusedSequentialMLP",
    "KernelOptions",
    "Recompute",
    "StateLayout",
    "can_fuse_sequential",
    "fold",
    "functional",
    "fuse",
    "ops",
    "options",
    "sequential_unsupported_reason",
    "unfuse",
]
