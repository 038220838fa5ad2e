"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed."""

from . import functional, ops
from .activations import Activation
from .modules import FusedGatedMLP, FusedMLP, StateLayout

__version__ = "0.1.0"

__all__ = ["Activation", "FusedGatedMLP", "FusedMLP", "StateLayout", "functional", "ops"]
