"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed."""

from . import functional, ops
from .activations import Activation
from .modules import FusedGatedMLP, FusedMLP, FusedSequentialMLP, StateLayout, can_fuse_sequential

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "FusedGatedMLP",
    "FusedMLP",
    "FusedSequentialMLP",
    "StateLayout",
    "can_fuse_sequential",
    "functional",
    "ops",
]
