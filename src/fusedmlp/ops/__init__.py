"""The kernels as torch ops: custom ops with fake implementations and registered autograd (so
``torch.compile(fullgraph=True)`` traces through them), their eager autograd.Function twins, and
the dispatch between the Triton kernels and the eager reference. One file per op family,
mirroring kernels/:

- ``pointwise.py``: the (gated) activation, h = act(gate) * up or act(x) (kernels/pointwise.py);
- ``fused_mlp.py``: the whole MLP, forward and backward (kernels/gemm_act.py, gemm_act_bwd.py);
- ``narrow.py``: a stack of narrow layers as one kernel (kernels/narrow_mlp.py);
- ``dispatch.py``: which implementation serves a call.
"""

from . import fused_mlp, narrow, pointwise
from .dispatch import use_triton
from .fused_mlp import LinearActFunction, MLPFunction, linear_act, linear_act_backward, mlp, mlp_backward
from .narrow import NarrowMLPFunction, PackNarrowFunction, narrow_mlp, narrow_mlp_backward
from .pointwise import act, act_backward, gated_act, gated_act_backward

# How the ops appear in a CPU trace, where they stand in for the kernels they launch.
PROFILES = [*pointwise.PROFILES, *fused_mlp.PROFILES, *narrow.PROFILES]

__all__ = [
    "PROFILES",
    "LinearActFunction",
    "MLPFunction",
    "NarrowMLPFunction",
    "PackNarrowFunction",
    "act",
    "act_backward",
    "gated_act",
    "gated_act_backward",
    "linear_act",
    "linear_act_backward",
    "mlp",
    "mlp_backward",
    "narrow_mlp",
    "narrow_mlp_backward",
    "use_triton",
]
