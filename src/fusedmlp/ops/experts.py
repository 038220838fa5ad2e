"""Mixture-of-experts MLPs as an op: tokens grouped by expert, the experts' gate|up as ONE grouped
GEMM with the gated activation in its epilogue (writing only h), the down projection as a
grouped GEMM that applies the routing weight, summed back to token order; the backward as
grouped GEMMs and the pointwise activation derivative, as in the dense MLP.

Routing: ``top_k_index`` [T, k] names each token's experts; the T*k (token, expert) assignments
are sorted by expert (stable), so expert e owns rows offsets[e]..offsets[e+1] of the gathered
input. Indices outside [0, E) (Hugging Face's expert-parallel sentinel) contribute nothing: they
are routed to expert E-1 with weight 0. No host synchronisation: offsets stay on the device.

Where Triton serves the call (ops/dispatch.py) the grouped kernels run (kernels/grouped.py);
elsewhere a loop over experts in torch, the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .. import reference
from ..activations import Activation
from ..options import Recompute
from . import higher_order
from .dispatch import fused_gemm_ok, use_triton
from .fused_mlp import pointwise_backward


@dataclasses.dataclass(frozen=True)
class ExpertActivation:
    """The experts' gated activation: h = act(gate) * up, or (``gpt_oss`` = (alpha, limit)) the
    gpt-oss clamped SwiGLU h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
    g = min(gate, limit)."""

    act: Activation = Activation.SILU
    gpt_oss: tuple[float, float] | None = None

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.gpt_oss is None:
            return reference.gated_act(gate, up, self.act)
        return reference.gpt_oss_swiglu(gate, up, *self.gpt_oss)

    def describe(self) -> str:
        return "gpt_oss_swiglu" if self.gpt_oss is not None else self.act.value


@dataclasses.dataclass(frozen=True)
class Routing:
    """The assignments sorted by expert: ``token`` [A] (each row's token), ``weight`` [A] (its
    routing weight, 0 for invalid indices), ``offsets`` [E+1] (int64, on the device), ``order``
    [A] (each row's position in the flattened [T*k] routing), ``valid`` [A] (its index was in
    range), ``expert`` [A] (its expert), ``top_k`` (k: A = T * k)."""

    token: Tensor
    weight: Tensor
    offsets: Tensor
    order: Tensor
    valid: Tensor
    expert: Tensor
    top_k: int

    def to_tokens(self, rows: Tensor) -> Tensor:
        """[T, D]: the sum over each token's k rows of ``rows`` [A, D], given in the flattened
        routing order (token-major; the grouped GEMMs scatter there through ``order``), summed
        in fp32 and rounded once."""
        return rows.view(-1, self.top_k, rows.shape[-1]).sum(1)


def route(top_k_index: Tensor, top_k_weights: Tensor, num_experts: int) -> Routing:
    k = top_k_index.shape[-1] if top_k_index.dim() > 1 else 1
    flat = top_k_index.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    expert = torch.where(valid, flat, num_experts - 1)
    order = torch.argsort(expert, stable=True)
    # counts by scatter-add: torch.bincount reads the largest index on the host (a CUDA sync)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, expert, torch.ones_like(expert)
    )
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    weight = torch.where(valid, top_k_weights.reshape(-1), 0)[order]
    return Routing(order // k, weight, offsets, order, valid[order], expert[order], k)


# ---------------------------------------------------------------------------------------------
# the grouped GEMMs: kernels where Triton runs, else the torch loops of fusedmlp/reference.py
# ---------------------------------------------------------------------------------------------


def segment_sum(g: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    """[E, cols]: the sum of each expert's rows of g, accumulated in fp32 (the bias gradients)."""
    k = _kernels(g)
    if k is None:
        return reference.grouped_bias_grad(g, offsets, num_experts)
    return k.grouped_bias_grad(g, offsets, num_experts)


def _kernels(*tensors: Tensor | None) -> Any:
    """kernels/grouped.py where Triton serves these tensors, else None. fp32 on a GPU takes the
    torch loop: Triton's fp32 dots missed the numerics contract (dispatch.fused_gemm_ok)."""
    first = tensors[0]
    if not use_triton(*tensors) or (first is not None and first.is_cuda and not fused_gemm_ok(first.dtype)):
        return None
    try:
        from ..kernels import grouped
    except ImportError:
        return None
    return grouped


def _gate_up_act(x: Tensor, w: Tensor, bias: Tensor | None, offsets: Tensor, act: ExpertActivation,
                 store_pre: bool) -> tuple[Tensor, Tensor | None]:
    k = _kernels(x, w, bias)
    if k is None:
        h, pre = reference.grouped_gate_up_act(x, w, bias, offsets, act.act, gpt_oss=act.gpt_oss)
        return h, pre if store_pre else None
    return k.grouped_gate_up_act(x, w, bias, offsets, act.act, gpt_oss=act.gpt_oss, store_pre=store_pre)


def _matmul(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, bias: Tensor | None = None,
            row_scale: Tensor | None = None, scatter_rows: Tensor | None = None) -> Tensor:
    """The grouped GEMM; with ``scatter_rows`` (a permutation), row r lands at scatter_rows[r]."""
    k = _kernels(a, b, bias)
    if k is None:
        c = reference.grouped_matmul(a, b, offsets, trans_b=trans_b, bias=bias, row_scale=row_scale)
        if scatter_rows is None:
            return c
        out = torch.empty_like(c)
        out[scatter_rows] = c
        return out
    return k.grouped_matmul(
        a, b, offsets, trans_b=trans_b, bias=bias, row_scale=row_scale, scatter_rows=scatter_rows
    )


def _weight_grad(a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
    k = _kernels(a, b)
    if k is None:
        return reference.grouped_weight_grad(a, b, offsets, num_experts)
    return k.grouped_weight_grad(a, b, offsets, num_experts)


def _act_backward(dh: Tensor, pre: Tensor, act: ExpertActivation, in_place: bool) -> tuple[Tensor, Tensor]:
    """(d pre [A, 2H], h [A, H]) from dh and gate|up (h recomputed for W_down's gradient). The
    gated activations: one pointwise kernel (as the dense backward), which writes h over dh and,
    with ``in_place``, d(gate|up) over ``pre``; gpt-oss's clamped SwiGLU: torch autograd."""
    H = dh.shape[1]
    if act.gpt_oss is None:
        dpre = pre if in_place else torch.empty_like(pre)
        pointwise_backward(dh, pre[:, :H], pre[:, H:], act.act, dpre[:, :H], dpre[:, H:], dh)
        return dpre, dh
    with torch.enable_grad():
        p = pre.detach().requires_grad_()
        h = act(p[:, :H], p[:, H:])
        (dpre,) = torch.autograd.grad(h, p, dh)
    return dpre, h.detach()


def experts_forward(
    x: Tensor, routing: Routing, w_gu: Tensor, b_gu: Tensor | None, w_down: Tensor, b_down: Tensor | None,
    act: ExpertActivation, store_pre: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(y [T, D], the gathered x [A, D], pre [A, 2H] when ``store_pre``)."""
    xs = x[routing.token]
    h, pre = _gate_up_act(xs, w_gu, b_gu, routing.offsets, act, store_pre)
    ys = _matmul(h, w_down, routing.offsets, trans_b=True, bias=b_down, row_scale=routing.weight,
                 scatter_rows=routing.order)
    del h
    return routing.to_tokens(ys), xs, pre


class ExpertsFunction(torch.autograd.Function):
    """Autograd of the experts: the routing weights, x, and every weight and bias get gradients;
    second derivatives recompute with torch ops (ops/higher_order.py)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, top_k_weights: Tensor, w_gu: Tensor, b_gu: Tensor | None, w_down: Tensor,
        b_down: Tensor | None, routing: Routing, act: ExpertActivation,
        recompute: Recompute = Recompute.ACTIVATION,
    ) -> Tensor:
        # gate|up [A, 2H] is saved unless Recompute.GEMM, which recomputes it in the backward
        keep = recompute.saves_preactivation
        y, _, pre = experts_forward(x, routing, w_gu, b_gu, w_down, b_down, act, store_pre=keep)
        ctx.routing, ctx.act, ctx.k_shape = routing, act, top_k_weights.shape
        ctx.save_for_backward(x, top_k_weights, w_gu, b_gu, w_down, b_down, pre)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, top_k_weights, w_gu, b_gu, w_down, b_down, pre = ctx.saved_tensors
        r: Routing = ctx.routing
        act: ExpertActivation = ctx.act
        if higher_order.wants_graph():
            grads = higher_order.differentiable_grads(
                lambda x_, tw, w1, b1, w2, b2: experts_reference(x_, r, tw, w1, b1, w2, b2, act),
                (x, top_k_weights, w_gu, b_gu, w_down, b_down),
                dy,
            )
            return (*grads, None, None, None)
        E, H = w_gu.shape[0], w_gu.shape[2]
        offs = r.offsets
        in_place = pre is None  # a gate|up of our own can take its gradient in place
        if pre is None:  # Recompute.GEMM: gate|up again, from the gathered x
            pre = _gate_up_act(x[r.token], w_gu, b_gu, offs, act, store_pre=True)[1]
        dys = dy[r.token]  # [A, D]
        dh_unscaled = _matmul(dys, w_down, offs, trans_b=False)  # dys @ W_down[e]: [A, H]
        weight = r.weight.to(dys.dtype)
        # h recomputed (over dh) for W_down's gradient and the routing weights' gradient
        dpre, h = _act_backward(dh_unscaled * weight[:, None], pre, act, in_place)
        # d weight[r] = dys[r] . (h[r] W_down[e]^T + b_down[e]) = dh_unscaled[r] . h[r] + dys[r] . b_down[e]:
        # no second down-projection GEMM
        d_weight_sorted = (dh_unscaled * h).sum(-1, dtype=torch.float32)
        del dh_unscaled
        if b_down is not None:
            d_weight_sorted += (dys * b_down[r.expert]).sum(-1, dtype=torch.float32)
        d_weight_sorted *= r.valid
        d_top_k = torch.zeros(r.order.shape[0], dtype=torch.float32, device=dy.device)
        d_top_k[r.order] = d_weight_sorted
        d_top_k = d_top_k.view(ctx.k_shape).to(top_k_weights.dtype)
        # invalid indices (routed with weight 0) get no gradient
        dys_scaled = dys * weight[:, None]
        dw_down = _weight_grad(dys_scaled, h, offs, E) if w_down.requires_grad else None
        db_down = segment_sum(dys_scaled, offs, E) if b_down is not None and b_down.requires_grad else None
        xs = x[r.token]
        # dpre @ W_gu[e] [A, D], scattered back to routing order
        dx = r.to_tokens(_matmul(dpre, w_gu.flatten(1, 2), offs, trans_b=False, scatter_rows=r.order))
        dw_gu = _weight_grad(dpre, xs, offs, E).view(w_gu.shape) if w_gu.requires_grad else None
        db_gu = segment_sum(dpre, offs, E).view(E, 2, H) if b_gu is not None and b_gu.requires_grad else None
        return dx, d_top_k, dw_gu, db_gu, dw_down, db_down, None, None, None


def experts_reference(
    x: Tensor, routing: Routing, top_k_weights: Tensor, w_gu: Tensor, b_gu: Tensor | None, w_down: Tensor,
    b_down: Tensor | None, act: ExpertActivation,
) -> Tensor:
    """The experts in differentiable torch ops (routing weights re-read from ``top_k_weights``
    so that their gradient flows): the reference, and the double-backward path."""
    H = w_gu.shape[2]
    xs = x[routing.token]
    b_in = None if b_gu is None else b_gu.flatten(1)
    pre = reference.grouped_matmul(xs, w_gu.flatten(1, 2), routing.offsets, trans_b=True, bias=b_in)
    h = act(pre[:, :H], pre[:, H:])
    ys = reference.grouped_matmul(h, w_down, routing.offsets, trans_b=True, bias=b_down)
    weight = top_k_weights.reshape(-1)[routing.order] * routing.valid
    return torch.zeros_like(x).index_add_(0, routing.token, ys * weight[:, None].to(ys.dtype))


def experts(
    x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, w_gu: Tensor, b_gu: Tensor | None, w_down: Tensor,
    b_down: Tensor | None, act: ExpertActivation, recompute: Recompute = Recompute.ACTIVATION,
) -> Tensor:
    """y [T, D] of the experts over x [T, D] (validated by the caller). ``recompute``: what
    training saves (Recompute.GEMM: only the tokens; the others: gate|up as well)."""
    routing = route(top_k_index, top_k_weights, w_gu.shape[0])
    tensors = (x, top_k_weights, w_gu, b_gu, w_down, b_down)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertsFunction.apply(x, top_k_weights, w_gu, b_gu, w_down, b_down, routing, act, recompute)
    return experts_forward(x, routing, w_gu, b_gu, w_down, b_down, act, store_pre=False)[0]
