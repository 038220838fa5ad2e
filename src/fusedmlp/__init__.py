"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed."""

from . import functional, ops
from .activations import Activation
from .fuse import FoldReport, FuseReport, fold, fuse, unfuse
from .modules import (
    FusedGatedMLP,
    FusedLinearAct,
    FusedMLP,
    FusedSequentialMLP,
    StateLayout,
    can_fuse_sequential,
)
from .ops import Recompute

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "FoldReport",
    "FuseReport",
    "FusedGatedMLP",
    "FusedLinearAct",
    "FusedMLP",
    "FusedSequentialMLP",
    "Recompute",
    "StateLayout",
    "can_fuse_sequential",
    "fold",
    "functional",
    "fuse",
    "ops",
    "unfuse",
]
