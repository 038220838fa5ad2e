"""Drop-in nn.Modules: the fused MLPs (mlp.py), the narrow stack (narrow.py), mixture-of-experts
experts (experts.py), and the state_dict presentation they share (state.py)."""

from .experts import ExpertsLayout, FusedGatedExperts
from .mlp import WITH_OUTPUT_DROPOUT, FusedGatedMLP, FusedLinearAct, FusedMLP
from .narrow import FusedSequentialMLP, can_fuse_sequential, sequential_unsupported_reason
from .state import StateLayout, linear_params

__all__ = [
    "WITH_OUTPUT_DROPOUT",
    "ExpertsLayout",
    "FusedGatedExperts",
    "FusedGatedMLP",
    "FusedLinearAct",
    "FusedMLP",
    "FusedSequentialMLP",
    "StateLayout",
    "can_fuse_sequential",
    "linear_params",
    "sequential_unsupported_reason",
]
