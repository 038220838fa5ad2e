"""The (gated) activation as ops: h = act(gate) * up, or h = act(x), forward and backward.

Kernels: kernels/pointwise.py; eager twin: reference.gated_act / Activation.__call__.
``activation`` is an :class:`~fusedmlp.activations.Activation` value (the canonical name): the
functional layer resolves user names once.

Each op is a ``torch.library.triton_op``: under torch.compile its body is traced and its
kernels, launched through ``wrap_triton``, are launched from Inductor's own generated code (on a
CPU, where Inductor runs no Triton, the body traces the reference). Called eagerly, CUDA
tensors run the same body and CPU tensors the registered CPU kernel: Triton's interpreter where
it is on (CI), else the reference. Each op has a fake implementation and registered autograd.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.library import triton_op

from .. import reference
from ..activations import Activation
from ..kernels.profile import KernelProfile
from . import higher_order
from .dispatch import rows, use_triton

try:
    from ..kernels import pointwise as _k
except ImportError:  # no Triton: use_triton() is False everywhere
    _k = None  # type: ignore[assignment]


def _gated_act(gate: Tensor, up: Tensor | None, activation: str, traced: bool) -> Tensor:
    act = Activation(activation)
    g, u = reference.split_gate_up(gate) if up is None else (gate, up)
    if not use_triton(g, u, traced=traced):
        return reference.gated_act(g, u, act)
    if up is None:
        gu = rows(gate)
        H = gu.shape[1] // 2
        g2, u2 = gu[:, :H], gu[:, H:]
    else:
        g2, u2 = rows(gate), rows(up)
    return _k.gated_act_forward(g2, u2, act, traced=traced).view(g.shape)


@triton_op("fusedmlp::gated_act", mutates_args=())
def gated_act(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    """h = act(gate) * up. With ``up=None``, ``gate`` is the merged [..., 2H] gate|up tensor."""
    return _gated_act(gate, up, activation, traced=True)


@gated_act.register_kernel("cpu")
def _(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    return _gated_act(gate, up, activation, traced=False)


@gated_act.register_fake
def _(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    shape = gate.shape if up is not None else (*gate.shape[:-1], gate.shape[-1] // 2)
    return gate.new_empty(shape)


def _gated_act_backward(
    grad: Tensor, gate: Tensor, up: Tensor | None, activation: str, traced: bool
) -> tuple[Tensor, Tensor]:
    act = Activation(activation)
    g, u = reference.split_gate_up(gate) if up is None else (gate, up)
    if not use_triton(grad, g, u, traced=traced):
        dg, du = reference.gated_act_backward(grad, g, u, act)
        if up is None:
            return reference.merge_gate_up(dg, du), gate.new_empty(0)
        return dg, du
    grad2 = rows(grad)
    if up is None:
        gu = rows(gate)
        H = gu.shape[1] // 2
        dgu = gu.new_empty(gu.shape)
        _k.gated_act_backward(grad2, gu[:, :H], gu[:, H:], act, dgu[:, :H], dgu[:, H:], traced=traced)
        return dgu.view(gate.shape), gate.new_empty(0)
    dg, du = gate.new_empty(gate.shape), up.new_empty(up.shape)
    H = gate.shape[-1]
    _k.gated_act_backward(grad2, rows(gate), rows(up), act, dg.view(-1, H), du.view(-1, H), traced=traced)
    return dg, du


@triton_op("fusedmlp::gated_act_backward", mutates_args=())
def gated_act_backward(
    grad: Tensor, gate: Tensor, up: Tensor | None, activation: str
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`gated_act`: (d gate|up merged, empty) with ``up=None``, else (d gate, d up)."""
    return _gated_act_backward(grad.contiguous(), gate, up, activation, traced=True)


@gated_act_backward.register_kernel("cpu")
def _(grad: Tensor, gate: Tensor, up: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    return _gated_act_backward(grad.contiguous(), gate, up, activation, traced=False)


@gated_act_backward.register_fake
def _(grad: Tensor, gate: Tensor, up: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _gated_act_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.split = up is not None
    ctx.save_for_backward(gate, up)


def _gated_act_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    gate, up = ctx.saved_tensors
    if higher_order.wants_graph():  # create_graph=True: differentiable gradients
        a = Activation(ctx.activation)
        if up is None:
            forward = lambda gu: reference.gated_act(*reference.split_gate_up(gu), a)
            return higher_order.differentiable_grads(forward, (gate,), grad)[0], None, None
        forward = lambda g, u: reference.gated_act(g, u, a)
        dgate, dup = higher_order.differentiable_grads(forward, (gate, up), grad)
        return dgate, dup, None
    dgate, dup = gated_act_backward(grad, gate, up, ctx.activation)
    return dgate, (dup if ctx.split else None), None


gated_act.register_autograd(_gated_act_bwd, setup_context=_gated_act_setup)


def _act(x: Tensor, activation: str, traced: bool) -> Tensor:
    a = Activation(activation)
    if not use_triton(x, traced=traced):
        h = a(x)
        return x.clone() if h is x else h  # identity: an op's output may not alias its input
    return _k.gated_act_forward(rows(x), None, a, traced=traced).view(x.shape)


@triton_op("fusedmlp::act", mutates_args=())
def act(x: Tensor, activation: str) -> Tensor:
    """h = act(x)."""
    return _act(x, activation, traced=True)


@act.register_kernel("cpu")
def _(x: Tensor, activation: str) -> Tensor:
    return _act(x, activation, traced=False)


@act.register_fake
def _(x: Tensor, activation: str) -> Tensor:
    return x.new_empty(x.shape)


def _act_backward(grad: Tensor, x: Tensor, activation: str, traced: bool) -> Tensor:
    a = Activation(activation)
    if not use_triton(grad, x, traced=traced):
        return reference.act_backward(grad, x, a)
    dx = x.new_empty(x.shape)
    _k.gated_act_backward(rows(grad), rows(x), None, a, dx.view(-1, x.shape[-1]), None, traced=traced)
    return dx


@triton_op("fusedmlp::act_backward", mutates_args=())
def act_backward(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    """d x of :func:`act`."""
    return _act_backward(grad.contiguous(), x, activation, traced=True)


@act_backward.register_kernel("cpu")
def _(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    return _act_backward(grad.contiguous(), x, activation, traced=False)


@act_backward.register_fake
def _(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    return x.new_empty(x.shape)


def _act_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _act_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    (x,) = ctx.saved_tensors
    if higher_order.wants_graph():  # create_graph=True: differentiable gradients
        return higher_order.differentiable_grads(Activation(ctx.activation), (x,), grad)[0], None
    return act_backward(grad, x, ctx.activation), None


act.register_autograd(_act_bwd, setup_context=_act_setup)

# On a CPU trace (no GPU kernels) the ops stand in for the kernels they launch.
PROFILES = [
    KernelProfile(f"fusedmlp::{name}", f"{name.replace('_', ' ')}", gemm=False)
    for name in ("gated_act", "gated_act_backward", "act", "act_backward")
]
