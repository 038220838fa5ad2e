"""torch.library custom ops: the kernels made visible to autograd and torch.compile.

Every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through
it without a graph break, and a registered autograd formula. Dispatch happens inside each op:
the Triton kernel on CUDA tensors (and on CPU tensors when Triton's interpreter is on, which is
how CI runs the kernels), the eager reference from ``reference.py`` everywhere else.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from . import reference
from .activations import resolve

try:
    from .kernels import gated_act as _k_act
except ImportError:  # no triton on this platform: everything runs the reference path
    _k_act = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    """True when Triton's own interpreter is on (TRITON_INTERPRET=1): kernels then run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: Tensor | None) -> bool:
    """Whether the Triton kernels serve these tensors (else the reference path does)."""
    ts = [t for t in tensors if t is not None]
    if _k_act is None or not all(t.dtype in KERNEL_DTYPES for t in ts):
        return False
    if all(t.is_cuda for t in ts):
        return True
    return triton_interpreting() and all(t.device.type == "cpu" for t in ts)


def _rows(t: Tensor) -> Tensor:
    """[..., N] -> a 2-D [M, N] view with unit-stride columns (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


# ---------------------------------------------------------------------------------------------
# gated activation: h = act(gate) * up, gate|up merged in one [..., 2H] tensor or given apart
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedmlp::gated_act", mutates_args=())
def gated_act(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    """h = act(gate) * up. With ``up=None``, ``gate`` is the merged [..., 2H] gate|up tensor."""
    act = resolve(activation)
    if up is None:
        g, u = reference.split_gate_up(gate)
    else:
        g, u = gate, up
    if not use_triton(g, u):
        return reference.gated_act(g, u, act)
    if up is None:
        gu = _rows(gate)
        H = gu.shape[1] // 2
        g2, u2 = gu[:, :H], gu[:, H:]
    else:
        g2, u2 = _rows(gate), _rows(up)
    return _k_act.act_forward(g2, u2, act).view(g.shape)


@gated_act.register_fake
def _(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    shape = gate.shape if up is not None else (*gate.shape[:-1], gate.shape[-1] // 2)
    return gate.new_empty(shape)


@torch.library.custom_op("fusedmlp::gated_act_backward", mutates_args=())
def gated_act_backward(
    grad: Tensor, gate: Tensor, up: Tensor | None, activation: str
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`gated_act`: (d gate|up merged, empty) with ``up=None``, else (d gate, d up)."""
    act = resolve(activation)
    g, u = reference.split_gate_up(gate) if up is None else (gate, up)
    if not use_triton(grad, g, u):
        dg, du = reference.gated_act_backward(grad, g, u, act)
        if up is None:
            return torch.cat([dg, du], dim=-1), gate.new_empty(0)
        return dg, du
    grad2 = _rows(grad)
    if up is None:
        gu = _rows(gate)
        H = gu.shape[1] // 2
        dgu = torch.empty(gu.shape, dtype=gate.dtype, device=gate.device)
        _k_act.act_backward(grad2, gu[:, :H], gu[:, H:], act, dgu[:, :H], dgu[:, H:])
        return dgu.view(gate.shape), gate.new_empty(0)
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    H = gate.shape[-1]
    _k_act.act_backward(grad2, _rows(gate), _rows(up), act, dg.view(-1, H), du.view(-1, H))
    return dg, du


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


def _gated_act_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
    gate, up = ctx.saved_tensors
    dgate, dup = gated_act_backward(grad, gate, up, ctx.activation)
    return dgate, (dup if ctx.split else None), None


gated_act.register_autograd(_gated_act_bwd, setup_context=_gated_act_setup)


# ---------------------------------------------------------------------------------------------
# plain activation: h = act(x)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedmlp::act", mutates_args=())
def act(x: Tensor, activation: str) -> Tensor:
    """h = act(x)."""
    a = resolve(activation)
    if not use_triton(x):
        return a(x)
    return _k_act.act_forward(_rows(x), None, a).view(x.shape)


@act.register_fake
def _(x: Tensor, activation: str) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedmlp::act_backward", mutates_args=())
def act_backward(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    """d x of :func:`act`."""
    a = resolve(activation)
    if not use_triton(grad, x):
        return reference.act_backward(grad, x, a)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _k_act.act_backward(_rows(grad), _rows(x), None, a, dx.view(-1, x.shape[-1]), None)
    return dx


@act_backward.register_fake
def _(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    return x.new_empty(x.shape)


def _act_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _act_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
    (x,) = ctx.saved_tensors
    return act_backward(grad, x, ctx.activation), None


act.register_autograd(_act_bwd, setup_context=_act_setup)


# ---------------------------------------------------------------------------------------------
# narrow MLP: the whole stack of narrow Linear layers in one kernel, weights packed [L, P, P]
# ---------------------------------------------------------------------------------------------


def unpack_narrow_mlp(w: Tensor, b: Tensor, widths: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer views [D_l, D_{l-1}] and [D_l] of packed weights [L, P, P] and biases [L, P]."""
    L = len(widths) - 1
    return (
        [w[i, : widths[i + 1], : widths[i]] for i in range(L)],
        [b[i, : widths[i + 1]] for i in range(L)],
    )


try:  # here rather than at the top, so that this section merges as one block
    from .kernels import narrow_mlp as _k_narrow
except ImportError:
    _k_narrow = None


def _narrow_on_triton(x: Tensor, w: Tensor, b: Tensor, widths: list[int]) -> bool:
    if _k_narrow is None or max(widths) > _k_narrow.MAX_WIDTH or not use_triton(x, w, b):
        return False
    return _k_narrow.kernel_fits(w.shape[-1], x.dtype)


@torch.library.custom_op("fusedmlp::narrow_mlp", mutates_args=())
def narrow_mlp(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    """y [..., D_L] of the stack over x [..., D_0]; ``w`` [L, P, P] and ``b`` [L, P] zero-padded,
    ``widths`` = [D_0, ..., D_L], ``activations`` one name per layer, comma-separated ("identity"
    for none; a comma-joined str because custom ops take no list of strings)."""
    acts = [resolve(a) for a in activations.split(",")]
    if not _narrow_on_triton(x, w, b, widths):
        weights, biases = unpack_narrow_mlp(w, b, widths)
        return reference.narrow_mlp(x, weights, list(biases), list(acts))
    y = _k_narrow.narrow_mlp_forward(x.reshape(-1, widths[0]), w.contiguous(), b.contiguous(), widths, acts)
    return y.view(*x.shape[:-1], widths[-1])


@narrow_mlp.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], widths[-1]))


@torch.library.custom_op("fusedmlp::narrow_mlp_backward", mutates_args=())
def narrow_mlp_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw [L, P, P], db [L, P]) of :func:`narrow_mlp`; padded entries of dw and db are zero."""
    acts = [resolve(a) for a in activations.split(",")]
    if not _narrow_on_triton(x, w, b, widths):
        weights, biases = unpack_narrow_mlp(w, b, widths)
        dx, dws, dbs = reference.narrow_mlp_backward(grad, x, weights, list(biases), list(acts))
        dw, db = torch.zeros_like(w), torch.zeros_like(b)
        for dst_w, dst_b, src_w, src_b in zip(*unpack_narrow_mlp(dw, db, widths), dws, dbs, strict=True):
            dst_w.copy_(src_w)
            dst_b.copy_(src_b)
        return dx, dw, db
    dx, dw, db = _k_narrow.narrow_mlp_backward(
        grad.reshape(-1, widths[-1]), x.reshape(-1, widths[0]), w.contiguous(), b.contiguous(), widths, acts
    )
    return dx.view(x.shape), dw, db


@narrow_mlp_backward.register_fake
def _(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), w.new_empty(w.shape), b.new_empty(b.shape)


def _narrow_mlp_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, b, widths, activations = inputs
    ctx.widths, ctx.activations = widths, activations
    ctx.save_for_backward(x, w, b)


def _narrow_mlp_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
    x, w, b = ctx.saved_tensors
    dx, dw, db = narrow_mlp_backward(grad, x, w, b, ctx.widths, ctx.activations)
    return dx, dw, db, None, None


narrow_mlp.register_autograd(_narrow_mlp_bwd, setup_context=_narrow_mlp_setup)
