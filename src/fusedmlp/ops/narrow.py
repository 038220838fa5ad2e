"""The narrow MLP as an op: a whole stack of narrow Linear layers in one kernel, weights packed
[L, P, P] (kernels/narrow_pack.py), forward and a one-launch backward (kernels/narrow_mlp.py).

The eager reference is reference.narrow_mlp / narrow_mlp_backward. As for the MLP op, traced code
uses the custom ops and eager calls their autograd.Function twin, which costs less host time per
call than the one kernel it launches takes on the GPU at 2^20 rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.library import triton_op

from .. import reference
from ..activations import Activation
from ..kernels import narrow_pack
from ..kernels.profile import KernelProfile
from . import higher_order
from .dispatch import use_triton

try:
    from ..kernels import narrow_mlp as _k_narrow
except ImportError:  # no Triton: use_triton() is False everywhere
    _k_narrow = None  # type: ignore[assignment]


def activations_of(names: str) -> list[Activation]:
    """The per-layer activations of the ops' comma-joined names (custom ops take no list of str)."""
    return [Activation(a) for a in names.split(",")]


def _narrow_on_triton(
    x: Tensor, w: Tensor, b: Tensor, widths: list[int], backward: bool = False, traced: bool = False
) -> bool:
    """Whether the forward (or the backward) kernel serves this stack; else the torch reference."""
    if max(widths) > narrow_pack.MAX_WIDTH or not use_triton(x, w, b, traced=traced):
        return False
    return _k_narrow.kernel_fits(w.shape[-1], x.dtype, layers=len(widths) - 1 if backward else None)


def narrow_mlp_forward(
    x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str, traced: bool = False
) -> Tensor:
    acts = activations_of(activations)
    if not _narrow_on_triton(x, w, b, widths, traced=traced):
        weights, biases = narrow_pack.unpack(w, b, widths)
        return reference.narrow_mlp(x, weights, list(biases), list(acts))
    y = x.new_empty((*x.shape[:-1], widths[-1]))  # whole, not a view (in-place ops on it allowed)
    _k_narrow.narrow_mlp_forward(
        x.reshape(-1, widths[0]), w.contiguous(), b.contiguous(), widths, acts, traced=traced,
        out=y.view(-1, widths[-1]),
    )
    return y


def narrow_mlp_backward_impl(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str, traced: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    acts = activations_of(activations)
    if not _narrow_on_triton(x, w, b, widths, backward=True, traced=traced):
        weights, biases = narrow_pack.unpack(w, b, widths)
        dx, dws, dbs = reference.narrow_mlp_backward(grad, x, weights, list(biases), list(acts))
        dw, db = torch.zeros_like(w), torch.zeros_like(b)
        for dst_w, dst_b, src_w, src_b in zip(*narrow_pack.unpack(dw, db, widths), dws, dbs, strict=True):
            dst_w.copy_(src_w)
            dst_b.copy_(src_b)
        return dx, dw, db
    dx, dw, db = _k_narrow.narrow_mlp_backward(
        grad.reshape(-1, widths[-1]), x.reshape(-1, widths[0]), w.contiguous(), b.contiguous(), widths, acts,
        traced=traced,
    )
    return dx.view(x.shape), dw, db


@triton_op("fusedmlp::narrow_mlp", mutates_args=())
def narrow_mlp(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    """y [..., D_L] of the stack over x [..., D_0]; ``w`` [L, P, P] and ``b`` [L, P] zero-padded,
    ``widths`` = [D_0, ..., D_L], ``activations`` one name per layer, comma-separated ("identity"
    for none; a comma-joined str because custom ops take no list of strings). A triton_op, as
    the ops of ops/pointwise.py."""
    return narrow_mlp_forward(x, w, b, widths, activations, traced=True)


@narrow_mlp.register_kernel("cpu")
def _(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    return narrow_mlp_forward(x, w, b, widths, activations)


@narrow_mlp.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], widths[-1]))


@triton_op("fusedmlp::narrow_mlp_backward", mutates_args=())
def narrow_mlp_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw [L, P, P], db [L, P]) of :func:`narrow_mlp`; padded entries of dw and db are zero."""
    return narrow_mlp_backward_impl(grad.contiguous(), x, w, b, widths, activations, traced=True)


@narrow_mlp_backward.register_kernel("cpu")
def _(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    return narrow_mlp_backward_impl(grad.contiguous(), x, w, b, widths, activations)


@narrow_mlp_backward.register_fake
def _(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), w.new_empty(w.shape), b.new_empty(b.shape)


def _narrow_mlp_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, b, widths, activations = inputs
    ctx.widths, ctx.activations = widths, activations
    ctx.save_for_backward(x, w, b)


def _grads_graph(grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], names: str) -> list[Any]:
    """(dx, dw, db) under create_graph=True: differentiable functions of x, w, b and grad
    (ops/higher_order.py), for eikonal terms and gradient penalties of implicit networks."""
    acts = activations_of(names)

    def forward(x_: Tensor, w_: Tensor, b_: Tensor) -> Tensor:
        weights, biases = narrow_pack.unpack(w_, b_, widths)
        return reference.narrow_mlp(x_, list(weights), list(biases), acts)

    return higher_order.differentiable_grads(forward, (x, w, b), grad)


def _narrow_mlp_bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
    x, w, b = ctx.saved_tensors
    if higher_order.wants_graph():
        return (*_grads_graph(grad, x, w, b, ctx.widths, ctx.activations), None, None)  # type: ignore[return-value]
    dx, dw, db = narrow_mlp_backward(grad, x, w, b, ctx.widths, ctx.activations)
    return dx, dw, db, None, None


narrow_mlp.register_autograd(_narrow_mlp_bwd, setup_context=_narrow_mlp_setup)


# On a CPU trace (no GPU kernels) the ops stand in for the kernels they launch.
PROFILES = [
    KernelProfile("fusedmlp::narrow_mlp", "narrow MLP stack forward", gemm=True),
    KernelProfile("fusedmlp::narrow_mlp_backward", "narrow MLP stack backward", gemm=True),
]


class PackNarrowFunction(torch.autograd.Function):
    """Per-layer weights and biases zero-padded into [L, P, P] and [L, P] as ONE autograd node,
    whose backward hands each parameter its slice of the packed gradients. The F.pad + stack
    formulation (which traced code keeps) is 2L + 2 nodes, and a training step's host time grows
    with every node the autograd engine walks. ``bias_mask[l]``: whether layer l has a bias;
    ``params``: the L weights, then the biases that exist."""

    @staticmethod
    def forward(ctx: Any, P: int, bias_mask: tuple[bool, ...], *params: Tensor) -> tuple[Tensor, Tensor]:
        L = len(bias_mask)
        ctx.weights = [(k, *params[k].shape) for k in range(L)]  # (layer, out, in)
        ctx.biases = [(k, params[k].shape[0]) for k in range(L) if bias_mask[k]]  # (layer, out)
        w, b = params[0].new_zeros(L, P, P), params[0].new_zeros(L, P)
        dst = [w[k, :o, :i] for k, o, i in ctx.weights] + [b[k, :o] for k, o in ctx.biases]
        torch._foreach_copy_(dst, list(params))  # one call (strided views take its per-tensor path)
        return w, b

    @staticmethod
    def backward(ctx: Any, dw: Tensor, db: Tensor) -> tuple[Tensor | None, ...]:
        # slices: differentiable as they are, under create_graph=True too
        grads = [dw[k, :o, :i] for k, o, i in ctx.weights] + [db[k, :o] for k, o in ctx.biases]
        return (None, None, *grads)


class NarrowMLPFunction(torch.autograd.Function):
    """Eager twin of :func:`narrow_mlp` over the same implementation, as :class:`MLPFunction` is
    of :func:`mlp`: the custom op's dispatch costs more host time per call than the one kernel
    it launches takes on the GPU at 2^20 rows; traced code uses the custom op."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
        ctx.widths, ctx.activations = widths, activations
        ctx.save_for_backward(x, w, b)
        return narrow_mlp_forward(x, w, b, widths, activations)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b = ctx.saved_tensors
        if higher_order.wants_graph():
            return (*_grads_graph(grad, x, w, b, ctx.widths, ctx.activations), None, None)
        dx, dw, db = narrow_mlp_backward_impl(grad, x, w, b, ctx.widths, ctx.activations)
        return dx, dw, db, None, None
