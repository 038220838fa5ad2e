"""Eager references: every fused op written the obvious way in torch, plus the eager modules.

Tests compare the kernels against these (run in float64 for the ground truth), benchmarks use
the modules as the "eager" variant, and the ops (ops/) fall back to these functions on devices
and dtypes the Triton kernels do not cover. Activations are taken resolved
(:class:`~fusedmlp.activations.Activation`); the modules resolve names.
"""

from __future__ import annotations

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
