"""Eager references: every fused op written the obvious way in torch, plus the eager modules.

Tests compare the kernels against these (run in float64 for the ground truth), benchmarks use
the modules as the "eager" variant, and the ops (ops/) fall back to these functions on devices
and dtypes the Triton kernels do not cover. Activations are taken resolved
(:class:`~fusedmlp.activations.Activation`); the modules resolve names.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, resolve


def split_gate_up(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """Views of the gate and up halves of a merged [..., 2H] gate|up tensor (gate first)."""
    return gate_up.chunk(2, dim=-1)


def merge_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """The merged [..., 2H] gate|up tensor of its two halves (the inverse of split_gate_up)."""
    return torch.cat([gate, up], dim=-1)


def gated_act(gate: Tensor, up: Tensor, act: Activation) -> Tensor:
    """h = act(gate) * up."""
    return act(gate) * up


def gated_act_backward(grad_h: Tensor, gate: Tensor, up: Tensor, act: Activation) -> tuple[Tensor, Tensor]:
    """(d gate, d up) of h = act(gate) * up."""
    return act.backward(grad_h * up, gate), grad_h * act(gate)


def act_backward(grad_h: Tensor, x: Tensor, act: Activation) -> Tensor:
    """d x of h = act(x)."""
    return act.backward(grad_h, x)


def gated_mlp(
    x: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    act: Activation,
) -> Tensor:
    """y = down(act(gate(x)) * up(x)) with gate|up stored as one [2H, D] weight (gate rows first)."""
    gate, up = split_gate_up(F.linear(x, gate_up_weight, gate_up_bias))
    return F.linear(gated_act(gate, up, act), down_weight, down_bias)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    act: Activation,
) -> Tensor:
    """y = fc2(act(fc1(x)))."""
    return F.linear(act(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


class GatedMLP(nn.Module):
    """The eager gated MLP of Llama/Gemma/Mistral: 3 GEMMs, the activation and the multiply."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)
        self.activation = resolve(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """The eager GPT-2/BERT/ViT MLP: fc1, the activation, fc2."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)
        self.activation = resolve(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# narrow MLP: a stack of Linear layers, each followed by its activation (identity for none)
# ---------------------------------------------------------------------------------------------


def narrow_mlp(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    activations: list[Activation],
) -> Tensor:
    """h_l = act_l(h_{l-1} @ W_l^T + b_l) for l = 1..L, from h_0 = x."""
    for w, b, act in zip(weights, biases, activations, strict=True):
        x = act(F.linear(x, w, b))
    return x


def narrow_mlp_backward(
    grad: Tensor,
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    activations: list[Activation],
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(dx, [dW_l], [db_l]) of :func:`narrow_mlp` (db_l as if every layer had a bias)."""
    hs, zs = [x], []
    for w, b, a in zip(weights, biases, activations, strict=True):
        zs.append(F.linear(hs[-1], w, b))
        hs.append(a(zs[-1]))
    dws: list[Tensor] = []
    dbs: list[Tensor] = []
    for w, z, h, a in reversed(list(zip(weights, zs, hs, activations, strict=False))):
        dz = a.backward(grad, z)
        dws.append(dz.reshape(-1, dz.shape[-1]).t() @ h.reshape(-1, h.shape[-1]))
        dbs.append(dz.reshape(-1, dz.shape[-1]).sum(0))
        grad = dz @ w
    return grad, dws[::-1], dbs[::-1]


# ---------------------------------------------------------------------------------------------
# grouped (mixture-of-experts) GEMMs: rows offsets[e]..offsets[e+1] belong to expert e; one
# expert at a time, every op in the inputs' dtype (run them in float64 for the ground truth).
# They read the offsets on the host. kernels/grouped.py and ops/experts.py fall back to these.
# ---------------------------------------------------------------------------------------------


def gpt_oss_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's clamped SwiGLU, as its reference implementation computes it."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _expert_bounds(offsets: Tensor) -> list[tuple[int, int]]:
    return list(itertools.pairwise(offsets.tolist()))


def grouped_gate_up_act(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    activation: Activation | str,
    *,
    gpt_oss: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(h [N, H], pre [N, 2H]): pre = x @ [Wg[e]; Wu[e]]^T + b[e] per expert, then the gated
    activation of its two halves."""
    H, D = w.shape[2], w.shape[3]
    pre = x.new_zeros(x.shape[0], 2 * H)
    for e, (lo, hi) in enumerate(_expert_bounds(offsets)):
        b = bias[e].reshape(2 * H) if bias is not None else None
        pre[lo:hi] = F.linear(x[lo:hi], w[e].reshape(2 * H, D), b)
    gate, up = pre.chunk(2, dim=-1)
    h = gpt_oss_swiglu(gate, up, *gpt_oss) if gpt_oss is not None else resolve(activation)(gate) * up
    return h, pre


def grouped_matmul(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    *,
    trans_b: bool,
    bias: Tensor | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """c [N, Nout]: c[rows_e] = a[rows_e] @ (b[e]^T if trans_b else b[e]) + bias[e], times
    row_scale per row."""
    c = a.new_zeros(a.shape[0], b.shape[1] if trans_b else b.shape[2])
    for e, (lo, hi) in enumerate(_expert_bounds(offsets)):
        c[lo:hi] = a[lo:hi] @ (b[e].T if trans_b else b[e])
        if bias is not None:
            c[lo:hi] += bias[e]
    return c if row_scale is None else (c * row_scale[:, None]).to(a.dtype)


def grouped_weight_grad(a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """out [E, Ka, Kb]: out[e] = a[rows_e]^T @ b[rows_e]."""
    out = a.new_zeros(num_experts, a.shape[1], b.shape[1])
    for e, (lo, hi) in enumerate(_expert_bounds(offsets)):
        out[e] = a[lo:hi].T @ b[lo:hi]
    return out


def grouped_bias_grad(g: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """out [E, C]: out[e] = the sum of g[rows_e]."""
    out = g.new_zeros(num_experts, g.shape[1])
    for e, (lo, hi) in enumerate(_expert_bounds(offsets)):
        out[e] = g[lo:hi].sum(0)
    return out
