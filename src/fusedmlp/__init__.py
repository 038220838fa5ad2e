"""fusedmlp: fused Triton MLP blocks for PyTorch, and the profiler that shows what fusion changed."""

from . import functional, ops
from .activations import Activation
from .modules import FusedGatedMLP, FusedMLP, StateLayout
from .ops import Recompute

__version__ = "0.1.0"

__all__ = ["Activation", "FusedGatedMLP", "FusedMLP", "Recompute", "StateLayout", "functional", "ops"]
