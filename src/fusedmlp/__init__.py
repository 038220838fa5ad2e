"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed."""

from . import functional, ops
from .activations import Activation
from .fuse import FoldReport, FuseReport, fold, fuse, unfuse
from .modules import FusedGatedMLP, FusedLinearAct, FusedMLP, StateLayout
from .ops import Recompute

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "FoldReport",
    "FuseReport",
    "FusedGatedMLP",
    "FusedLinearAct",
    "FusedMLP",
    "Recompute",
    "StateLayout",
    "fold",
    "functional",
    "fuse",
    "ops",
    "unfuse",
]
