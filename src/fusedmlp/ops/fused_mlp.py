"""The whole MLP as an op: y = out(act(in_gate(x)) * in_up(x)) (gated) or y = out(act(in(x))).

Forward: one Triton GEMM with the activation in its epilogue (kernels/gemm_act.py) writes h
(and, when training saves it, the pre-activation gate|up), then cuBLAS for the output projection.
Backward: dh = dy @ W_out (cuBLAS); one pointwise kernel (kernels/pointwise.py) turns dh and the
saved gate|up into d(gate|up), written in the merged layout (over gate|up, in place, in eager),
and recomputes h for W_out's gradient unless it was saved; then dx = d(gate|up) @ W_in and
dW_in = d(gate|up)^T @ x are one cuBLAS GEMM each over the merged layout. With the
``fused_backward_gemm`` kernel option, one Triton GEMM (kernels/gemm_act_bwd.py) does the first
two steps and dh never reaches memory.

Two entry points over one implementation: the custom op :func:`mlp` (with :func:`mlp_backward`),
which torch.compile traces through, and its eager twin :class:`MLPFunction`: a custom op's
dispatch costs more host time than a decode-sized forward's GPU time, so eager calls take the
twin (functional.py picks by ``torch.compiler.is_compiling()``). The eager reference of the
whole op is reference.gated_mlp / reference.mlp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .. import reference
from ..activations import Activation
from ..kernels.dropout import Dropout
from ..kernels.profile import KernelProfile
from ..options import Recompute, kernel_options
from . import higher_order
from .dispatch import fused_gemm_ok, rows, use_triton

try:
    from ..kernels import gemm_act as _k_gemm
    from ..kernels import gemm_act_bwd as _k_gemm_bwd
    from ..kernels import pointwise as _k_pointwise
except ImportError:  # no Triton: use_triton() is False everywhere
    _k_gemm = _k_gemm_bwd = _k_pointwise = None  # type: ignore[assignment]


def _allow_tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def mlp_forward(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    act: Activation,
    gated: bool,
    recompute: Recompute,
    inference: bool,
    out: Tensor | None = None,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, pre, h) for 2-D x [M, D]: ``pre`` (gate|up before the activation) and ``h`` are
    returned where training at this ``recompute`` level saves them (never in ``inference``).
    ``out``: a [M, D_out] buffer (or view) for y. ``traced``: inside a triton_op body.
    ``dropout``: h dropped before the output projection (the returned h is the dropped one)."""
    store_pre = not inference and recompute.saves_preactivation
    kernels = use_triton(x, w_in, b_in, w_out, b_out, traced=traced)
    if kernels and fused_gemm_ok(x.dtype):
        h, pre = _k_gemm.gemm_act(
            x, w_in, b_in, act, gated, store_preact=store_pre, allow_tf32=_allow_tf32(), traced=traced,
            dropout=dropout,
        )
    elif kernels:  # fp32: cuBLAS, then the pointwise kernel
        pre = F.linear(x, w_in, b_in)
        H = pre.shape[1] // 2 if gated else pre.shape[1]
        up = pre[:, H:] if gated else None
        h = _k_pointwise.gated_act_forward(pre[:, :H], up, act, traced=traced, dropout=dropout)
    else:
        pre = F.linear(x, w_in, b_in)
        h = reference.gated_act(*reference.split_gate_up(pre), act) if gated else act(pre)
        if dropout is not None:
            h = h * dropout.mask(h.shape[0], h.shape[1], h.dtype)
    if out is None:
        y = F.linear(h, w_out, b_out)
    elif b_out is None:
        y = torch.mm(h, w_out.t(), out=out)
    else:
        y = torch.addmm(b_out, h, w_out.t(), out=out)
    keep_h = not inference and recompute is Recompute.NONE
    return y, (pre if store_pre else None), (h if keep_h else None)


def pointwise_backward(
    dh: Tensor,
    gate: Tensor,
    up: Tensor | None,
    act: Activation,
    dgate: Tensor,
    dup: Tensor | None,
    h: Tensor | None,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> None:
    """Writes d(gate) (and d(up) when gated) of h = act(gate) * up given dh, and h where given;
    outputs may alias inputs (in place). The Triton kernel where it serves these tensors, else
    the torch reference. ``dropout``: the forward dropped h: dh is the dropped h's gradient, and
    h is written dropped."""
    if use_triton(dh, gate, up, traced=traced):
        _k_pointwise.gated_act_backward(dh, gate, up, act, dgate, dup, h, traced=traced, dropout=dropout)
        return
    keep = dropout.mask(dh.shape[0], dh.shape[1], dh.dtype) if dropout is not None else None
    if keep is not None:
        dh = dh * keep
    if up is None:
        # act(gate) is gate itself for the identity: copied, since dgate may overwrite gate
        h_val = (act(gate) if act is not Activation.IDENTITY else gate.clone()) if h is not None else None
        results = (reference.act_backward(dh, gate, act), None, h_val)
    else:
        dg, du = reference.gated_act_backward(dh, gate, up, act)
        results = (dg, du, reference.gated_act(gate, up, act) if h is not None else None)
    if keep is not None and results[2] is not None:
        results = (results[0], results[1], results[2] * keep)
    for dst, src in zip((dgate, dup, h), results, strict=True):  # every input read before any write
        if dst is not None and src is not None:
            dst.copy_(src)


def mlp_backward_impl(
    dy: Tensor,
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    pre: Tensor | None,
    h: Tensor | None,
    act: Activation,
    gated: bool,
    has_b_out: bool,
    in_place: bool = False,
    dw_out: Tensor | None = None,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """(dx, dw_in, db_in, dw_out, db_out) of the MLP: the implementation behind :func:`mlp_backward`.

    ``pre`` None: recompute it from x (Recompute.GEMM), a block of hidden columns at a time where
    H is wide (:func:`_backward_recompute_blocks`). ``h`` None: recompute it with d(gate|up).
    ``in_place``: d(gate|up) overwrites ``pre`` (each element is read, then written, by the same
    program), which takes 2H elements per token off the backward's peak memory; ``pre`` is
    garbage afterwards. ``dw_out``: W_out's gradient, already taken by a caller that then freed h.
    ``traced``: inside a triton_op body. ``dropout``: the forward's dropout of h (its mask is
    regenerated; a saved ``h`` or ``dw_out`` is of the dropped h).
    """
    options = kernel_options()
    if pre is None and dw_out is None and w_out.shape[1] > options.recompute_block_width:
        return _backward_recompute_blocks(dy, x, w_in, b_in, w_out, act, gated, has_b_out, traced, dropout)
    if pre is None:
        pre, in_place = F.linear(x, w_in, b_in), True  # a buffer of our own
    need_h = h is None and dw_out is None
    fused_dh = options.fused_backward_gemm and dropout is None and fused_gemm_ok(dy.dtype)
    if fused_dh and use_triton(dy, pre, traced=traced):
        # dh = dy @ W_out lives only in the GEMM's registers: its epilogue writes d(gate|up)
        dpre, h_new = _k_gemm_bwd.gemm_act_backward(
            dy,
            w_out,
            pre,
            act,
            gated,
            dpre=pre if in_place else None,
            store_h=need_h,
            allow_tf32=_allow_tf32(),
            traced=traced,
        )
        h = h_new if need_h else h
    else:  # cuBLAS dh, then the pointwise backward
        dh = dy @ w_out
        dpre = pre if in_place else torch.empty_like(pre)
        if need_h:
            h = dh if in_place else torch.empty_like(dh)
        H = dh.shape[1]
        up, dup = (pre[:, H:], dpre[:, H:]) if gated else (None, None)
        pointwise_backward(dh, pre[:, :H], up, act, dpre[:, :H], dup, h if need_h else None, traced, dropout)
        del dh  # in place, h now names this buffer; dropped below once W_out's gradient is taken
    if dw_out is None:
        # Output projection's gradients first, so that h is freed before the two GEMMs over
        # d(gate|up) allocate theirs.
        assert h is not None
        dw_out = dy.t() @ h
    del h
    db_out = dy.sum(0) if has_b_out else None
    return dpre @ w_in, dpre.t() @ x, (dpre.sum(0) if b_in is not None else None), dw_out, db_out


# Recompute.GEMM keeps nothing of the forward but x. Its backward would still hold [tokens, 3H]
# of gate|up and dh at once; instead it walks blocks of hidden columns (KernelOptions.
# recompute_block_width wide at least, 4 blocks where H is 4x that), so one block's
# [tokens, 3 * width] lives at a time.
GEMM_RECOMPUTE_BLOCKS = 4


def _backward_recompute_blocks(
    dy: Tensor,
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    act: Activation,
    gated: bool,
    has_b_out: bool,
    traced: bool = False,
    dropout: Dropout | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """The backward of Recompute.GEMM over blocks of hidden columns j.

    Each block recomputes its gate and up columns (x @ W_in[j]^T), dh_j = dy @ W_out[:, j], turns
    gate|up into d(gate|up) in place and dh_j into h_j, then writes W_in's rows j and W_out's
    columns j of the weight gradients, each ONE GEMM over all tokens: exactly what the unblocked
    backward computes. Only dx = sum_j d(gate|up)_j @ W_in[j] spans blocks; it sums in fp32,
    each block's term rounded to the storage dtype once (the unblocked dx rounds once in all).
    """
    H = w_out.shape[1]
    width = max(kernel_options().recompute_block_width, -(-H // GEMM_RECOMPUTE_BLOCKS))
    dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
    db_in = torch.empty_like(b_in) if b_in is not None else None
    # fp32 accumulation for the storage dtypes, never less than x's own precision (fp64 stays fp64)
    dx = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for j0 in range(0, H, width):
        j1 = min(j0 + width, H)
        rows = [slice(j0, j1)] + ([slice(H + j0, H + j1)] if gated else [])
        pre = [F.linear(x, w_in[r], None if b_in is None else b_in[r]) for r in rows]
        dh = dy @ w_out[:, j0:j1]
        up = pre[1] if gated else None
        block_drop = dropout.block(j0) if dropout is not None else None
        pointwise_backward(dh, pre[0], up, act, pre[0], up, dh, traced, block_drop)  # in place
        dpre, h = pre, dh  # gate|up now hold their gradients, dh holds h
        del pre, up, dh
        torch.mm(dy.t(), h, out=dw_out[:, j0:j1])
        del h
        for r, d in zip(rows, dpre, strict=True):
            torch.mm(d.t(), x, out=dw_in[r])
            if db_in is not None:
                torch.sum(d, 0, out=db_in[r])
            dx += d @ w_in[r]
        del dpre, d
    return dx.to(x.dtype), dw_in, db_in, dw_out, (dy.sum(0) if has_b_out else None)


def _output(x: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
    """y [..., D_out] for x [..., D] and a projection w_out [D_out, .], allocated whole (not a
    view: as eager's F.linear, so that in-place ops on it, `y += x`, are allowed, also on a
    custom Function's output), and its 2-D view for the kernels to write."""
    y = x.new_empty((*x.shape[:-1], w_out.shape[0]), dtype=w_out.dtype)
    return y, y.view(-1, w_out.shape[0])


def _dropout(p: float, w_out: Tensor, x: Tensor, span: tuple[int, int] | None = None) -> Dropout | None:
    """A fresh dropout of h, or None for p = 0. ``span`` (first column, full width): h is a
    column shard of a wider h (tensor parallel), whose mask this takes its columns of."""
    if p <= 0.0:
        return None
    col0, width = span if span is not None else (0, w_out.shape[1])
    return Dropout.draw(p, width, x.device, col0)


def mlp_inference(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None, act: Activation,
    gated: bool, dropout_p: float = 0.0, dropout_span: tuple[int, int] | None = None,
) -> Tensor:
    """The forward where no gradient is wanted: no autograd node, nothing saved. ``dropout_p``:
    h dropped before the output projection (a module in training mode under torch.no_grad);
    ``dropout_span``: as for :func:`_dropout`."""
    y, y2 = _output(x, w_out)
    drop = _dropout(dropout_p, w_out, x, dropout_span)
    level = Recompute.ACTIVATION
    mlp_forward(rows(x), w_in, b_in, w_out, b_out, act, gated, level, True, out=y2, dropout=drop)
    return y


def _mlp_grads_graph(
    dy: Tensor, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, act: Activation | str,
    gated: bool, has_b_out: bool, dropout: Dropout | None,
) -> tuple[Tensor | None, ...]:
    """(dx, dW_in, db_in, dW_out, db_out) as differentiable functions of the inputs and dy, for a
    backward under create_graph=True (ops/higher_order.py); x of any leading dimensions."""
    higher_order.no_dropout(dropout)
    act = Activation(act)
    forward = reference.gated_mlp if gated else reference.mlp
    grads = higher_order.differentiable_grads(
        lambda x_, w1, b1, w2: forward(x_, w1, b1, w2, None, act), (x, w_in, b_in, w_out), dy
    )
    return (*grads, dy.reshape(-1, dy.shape[-1]).sum(0) if has_b_out else None)


class MLPFunction(torch.autograd.Function):
    """Eager autograd for the MLP. ``torch.library`` custom ops cost ~240 us of CPU per call in
    eager (H100 host, torch 2.11; benchmarks/overhead.py), more than a decode-sized forward
    takes on the GPU, so eager calls come here; traced code uses the custom op :func:`mlp`.
    x may have any leading dimensions; y has them too."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_in: Tensor,
        b_in: Tensor | None,
        w_out: Tensor,
        b_out: Tensor | None,
        act: Activation,
        gated: bool,
        recompute: Recompute,
        dropout_p: float = 0.0,
        dropout_span: tuple[int, int] | None = None,
    ) -> Tensor:
        y, y2 = _output(x, w_out)
        x2 = rows(x)
        drop = ctx.dropout = _dropout(dropout_p, w_out, x, dropout_span)
        _, pre, h = mlp_forward(
            x2, w_in, b_in, w_out, b_out, act, gated, recompute, False, out=y2, dropout=drop
        )
        ctx.meta = (act, gated, b_out is not None)
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, w_in, b_in, w_out, pre, x)  # x itself: for second derivatives
        # h (Recompute.NONE) is held apart from the saved tensors so that the backward can
        # free it as soon as W_out's gradient is taken, before it allocates its own buffers
        ctx.h = h
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if higher_order.wants_graph():
            _, w_in, b_in, w_out, _, x = ctx.saved_tensors
            grads = _mlp_grads_graph(dy, x, w_in, b_in, w_out, *ctx.meta, ctx.dropout)
            return (*grads, None, None, None, None, None)
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "fusedmlp's MLP backward reuses its saved activations in place, so it runs once per "
                "forward: backward(retain_graph=True) followed by a second backward is not supported"
            )
        ctx.consumed = True
        x, w_in, b_in, w_out, pre, _ = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()
        h, ctx.h = ctx.h, None
        dw_out = dy.t() @ h if h is not None else None
        del h  # its last reference: the peak below no longer holds [tokens, H] of h
        dx, *grads = mlp_backward_impl(
            dy, x, w_in, b_in, w_out, pre, None, *ctx.meta, in_place=True, dw_out=dw_out, dropout=ctx.dropout
        )
        return (dx.view(ctx.x_shape), *grads, None, None, None, None, None)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


def _seeded(seed: Tensor | None, p: float, w_out: Tensor, col0: int = 0, width: int = 0) -> Dropout | None:
    """The ops' dropout: ``seed`` drawn by the caller; ``col0``/``width`` (0: h's own) as the
    span of :func:`_dropout`."""
    if seed is None or p <= 0.0:
        return None
    return Dropout(seed, p, width or w_out.shape[1], col0)


def _mlp(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None, activation: str,
    gated: bool, recompute: str, inference: bool, dropout_p: float, seed: Tensor | None, drop_col0: int,
    drop_width: int, traced: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    y, pre, h = mlp_forward(
        x, w_in, b_in, w_out, b_out, Activation(activation), gated, Recompute(recompute), inference,
        traced=traced, dropout=_seeded(seed, dropout_p, w_out, drop_col0, drop_width),
    )
    return y, _or_empty(pre, x), _or_empty(h, x)


@triton_op("fusedmlp::mlp", mutates_args=())
def mlp(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    gated: bool,
    recompute: str,
    inference: bool,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
    drop_col0: int = 0,
    drop_width: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, pre, h) for 2-D x [M, D]; ``pre`` and ``h`` are empty unless training at the
    ``recompute`` level saves them. ``dropout_p`` and ``seed`` (a one-element int64 tensor):
    h dropped before the output projection (kernels/dropout.py); ``drop_col0``/``drop_width``
    (0: h's own width): h's columns within a wider h whose mask it takes (tensor parallel). A
    triton_op: under torch.compile the kernels are launched from Inductor's generated code
    (ops/pointwise.py says how the op dispatches)."""
    args = (x, w_in, b_in, w_out, b_out, activation, gated, recompute, inference, dropout_p, seed)
    return _mlp(*args, drop_col0, drop_width, traced=True)


@mlp.register_kernel("cpu")
def _(x, w_in, b_in, w_out, b_out, activation, gated, recompute, inference, dropout_p=0.0, seed=None,  # type: ignore[no-untyped-def]
      drop_col0=0, drop_width=0):
    args = (x, w_in, b_in, w_out, b_out, activation, gated, recompute, inference, dropout_p, seed)
    return _mlp(*args, drop_col0, drop_width, traced=False)


@mlp.register_fake
def _(x, w_in, b_in, w_out, b_out, activation, gated, recompute, inference, dropout_p=0.0, seed=None,  # type: ignore[no-untyped-def]
      drop_col0=0, drop_width=0):
    level = Recompute(recompute)
    store_pre = not inference and level.saves_preactivation
    keep_h = not inference and level is Recompute.NONE
    pre = x.new_empty(x.shape[0], w_in.shape[0]) if store_pre else x.new_empty(0)
    h = x.new_empty(x.shape[0], w_out.shape[1]) if keep_h else x.new_empty(0)
    return x.new_empty(x.shape[0], w_out.shape[0]), pre, h


def _mlp_backward(
    dy: Tensor, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, pre: Tensor, h: Tensor,
    activation: str, gated: bool, has_b_out: bool, dropout_p: float, seed: Tensor | None, drop_col0: int,
    drop_width: int, traced: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dw_in, db_in, dw_out, db_out = mlp_backward_impl(
        dy.contiguous(), x, w_in, b_in, w_out, _or_none(pre), _or_none(h), Activation(activation), gated,
        has_b_out, traced=traced, dropout=_seeded(seed, dropout_p, w_out, drop_col0, drop_width),
    )
    return dx, dw_in, _or_empty(db_in, x), dw_out, _or_empty(db_out, x)


@triton_op("fusedmlp::mlp_backward", mutates_args=())
def mlp_backward(
    dy: Tensor,
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    pre: Tensor,
    h: Tensor,
    activation: str,
    gated: bool,
    has_b_out: bool,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
    drop_col0: int = 0,
    drop_width: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_in, db_in, dw_out, db_out) of :func:`mlp`; empty ``pre``/``h`` mean recompute
    them; absent biases get empty gradients; the dropout arguments as the forward's."""
    args = (dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out, dropout_p, seed)
    return _mlp_backward(*args, drop_col0, drop_width, traced=True)


@mlp_backward.register_kernel("cpu")
def _(dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out, dropout_p=0.0, seed=None,  # type: ignore[no-untyped-def]
      drop_col0=0, drop_width=0):
    args = (dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out, dropout_p, seed)
    return _mlp_backward(*args, drop_col0, drop_width, traced=False)


@mlp_backward.register_fake
def _(dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out, dropout_p=0.0, seed=None,  # type: ignore[no-untyped-def]
      drop_col0=0, drop_width=0):
    return (
        x.new_empty(x.shape),
        w_in.new_empty(w_in.shape),
        w_in.new_empty(w_in.shape[0]) if b_in is not None else x.new_empty(0),
        w_out.new_empty(w_out.shape),
        w_out.new_empty(w_out.shape[0]) if has_b_out else x.new_empty(0),
    )


def _mlp_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, w_in, b_in, w_out, b_out, activation, gated, _recompute, inference, dropout_p, seed, *span = inputs
    col0, width = span
    ctx.meta = (activation, gated, b_out is not None, inference, dropout_p, col0, width)
    ctx.save_for_backward(x, w_in, b_in, w_out, output[1], output[2], seed)


def _mlp_bwd(ctx: Any, dy: Tensor, _dpre: Tensor, _dh: Tensor) -> tuple[Tensor | None, ...]:
    activation, gated, has_b_out, inference, dropout_p, col0, width = ctx.meta
    if inference:
        raise RuntimeError("fusedmlp::mlp ran in inference mode (nothing saved), so it cannot run backward")
    x, w_in, b_in, w_out, pre, h, seed = ctx.saved_tensors
    if higher_order.wants_graph():
        drop = _seeded(seed, dropout_p, w_out, col0, width)
        grads = _mlp_grads_graph(dy, x, w_in, b_in, w_out, activation, gated, has_b_out, drop)
        return (*grads, None, None, None, None, None, None, None, None)
    grads = mlp_backward(
        dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out, dropout_p, seed, col0, width
    )
    dx, dw_in, db_in, dw_out, db_out = grads
    db_in_ = db_in if b_in is not None else None
    nones = (None,) * 8
    return (dx, dw_in, db_in_, dw_out, db_out if has_b_out else None, *nones)


mlp.register_autograd(_mlp_bwd, setup_context=_mlp_setup)

# ---------------------------------------------------------------------------------------------
# a lone projection and its activation: h = act(x W^T + b) (BERT/ViT "intermediate"), the same
# GEMM with the activation in its epilogue; the backward is the MLP's without the output layer
# ---------------------------------------------------------------------------------------------


def linear_act_forward(
    x: Tensor, w: Tensor, b: Tensor | None, act: Activation, save: bool, traced: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(h, pre) for 2-D x: h = act(x w^T + b) by one GEMM launch where the kernels serve it;
    ``pre`` (for the backward) when ``save``; ``out``: a [M, out] buffer (or view) for h."""
    if use_triton(x, w, b, traced=traced) and fused_gemm_ok(x.dtype):
        return _k_gemm.gemm_act(
            x, w, b, act, False, store_preact=save, allow_tf32=_allow_tf32(), traced=traced, out=out
        )
    pre = F.linear(x, w, b)
    if use_triton(x, w, b, traced=traced):  # fp32: cuBLAS, then the pointwise kernel
        h = _k_pointwise.gated_act_forward(pre, None, act, out=out, traced=traced)
    else:
        h = act(pre)
        if out is not None:
            h = out.copy_(h)
        elif h is pre:  # identity: h must not be the buffer the backward reuses
            h = pre.clone()
    return h, (pre if save else None)


def linear_act_backward_impl(
    dh: Tensor, x: Tensor, w: Tensor, pre: Tensor, act: Activation, has_bias: bool, in_place: bool,
    traced: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, dw, db) of h = act(x w^T + b): dpre = dh * act'(pre) (over pre when ``in_place``),
    then dx = dpre w and dw = dpre^T x, one GEMM each."""
    dpre = pre if in_place else torch.empty_like(pre)
    pointwise_backward(dh, pre, None, act, dpre, None, None, traced)
    return dpre @ w, dpre.t() @ x, (dpre.sum(0) if has_bias else None)


def _linear_act_grads_graph(
    dh: Tensor, x: Tensor, w: Tensor, b: Tensor | None, act: Activation | str
) -> list[Tensor | None]:
    """(dx, dw, db) of act(x w^T + b) under create_graph=True (ops/higher_order.py)."""
    act = Activation(act)
    return higher_order.differentiable_grads(lambda x_, w_, b_: act(F.linear(x_, w_, b_)), (x, w, b), dh)


class LinearActFunction(torch.autograd.Function):
    """Eager autograd of the fused linear + activation (as MLPFunction is of the MLP)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, act: Activation) -> Tensor:
        x2 = rows(x)
        h, h2 = _output(x, w)  # whole, not a view: in-place ops on it are allowed, as on eager's
        _, pre = linear_act_forward(x2, w, b, act, save=True, out=h2)
        ctx.act, ctx.has_bias, ctx.x_shape = act, b is not None, x.shape
        ctx.save_for_backward(x2, w, pre, x, b)  # x and b: for second derivatives
        return h

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, ...]:
        x, w, pre, x_in, b = ctx.saved_tensors
        if higher_order.wants_graph():
            return (*_linear_act_grads_graph(dh, x_in, w, b, ctx.act), None)
        dh = dh.reshape(-1, dh.shape[-1]).contiguous()
        dx, dw, db = linear_act_backward_impl(dh, x, w, pre.clone(), ctx.act, ctx.has_bias, in_place=True)
        return dx.view(ctx.x_shape), dw, db, None


def linear_act_inference(x: Tensor, w: Tensor, b: Tensor | None, act: Activation) -> Tensor:
    h, h2 = _output(x, w)
    linear_act_forward(rows(x), w, b, act, save=False, out=h2)
    return h


def _linear_act(
    x: Tensor, w: Tensor, b: Tensor | None, activation: str, save: bool, traced: bool
) -> tuple[Tensor, Tensor]:
    h, pre = linear_act_forward(x, w, b, Activation(activation), save, traced=traced)
    return h, _or_empty(pre, x)


@triton_op("fusedmlp::linear_act", mutates_args=())
def linear_act(x: Tensor, w: Tensor, b: Tensor | None, activation: str, save: bool) -> tuple[Tensor, Tensor]:
    """(h, pre) for 2-D x: h = act(x w^T + b); pre (the GEMM's output) when ``save``, else empty."""
    return _linear_act(x, w, b, activation, save, traced=True)


@linear_act.register_kernel("cpu")
def _(x, w, b, activation, save):  # type: ignore[no-untyped-def]
    return _linear_act(x, w, b, activation, save, traced=False)


@linear_act.register_fake
def _(x, w, b, activation, save):  # type: ignore[no-untyped-def]
    pre = x.new_empty(x.shape[0], w.shape[0]) if save else x.new_empty(0)
    return x.new_empty(x.shape[0], w.shape[0]), pre


@triton_op("fusedmlp::linear_act_backward", mutates_args=())
def linear_act_backward(
    dh: Tensor, x: Tensor, w: Tensor, pre: Tensor, activation: str, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of :func:`linear_act` (db empty without a bias)."""
    dx, dw, db = linear_act_backward_impl(
        dh.contiguous(), x, w, pre, Activation(activation), has_bias, in_place=False, traced=True
    )
    return dx, dw, _or_empty(db, x)


@linear_act_backward.register_kernel("cpu")
def _(dh, x, w, pre, activation, has_bias):  # type: ignore[no-untyped-def]
    dx, dw, db = linear_act_backward_impl(dh.contiguous(), x, w, pre, Activation(activation), has_bias, False)
    return dx, dw, _or_empty(db, x)


@linear_act_backward.register_fake
def _(dh, x, w, pre, activation, has_bias):  # type: ignore[no-untyped-def]
    db = w.new_empty(w.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), w.new_empty(w.shape), db


def _linear_act_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, w, b, activation, save = inputs
    ctx.meta = (activation, b is not None, save)
    ctx.save_for_backward(x, w, output[1], b)


def _linear_act_bwd(ctx: Any, dh: Tensor, _dpre: Tensor) -> tuple[Tensor | None, ...]:
    activation, has_bias, save = ctx.meta
    if not save:
        raise RuntimeError("fusedmlp::linear_act ran without saving (no gradient wanted): it has no backward")
    x, w, pre, b = ctx.saved_tensors
    if higher_order.wants_graph():
        return (*_linear_act_grads_graph(dh, x, w, b, activation), None, None)
    dx, dw, db = linear_act_backward(dh, x, w, pre, activation, has_bias)
    return dx, dw, (db if has_bias else None), None, None


linear_act.register_autograd(_linear_act_bwd, setup_context=_linear_act_setup)

# On a CPU trace (no GPU kernels) the ops stand in for the kernels they launch.
PROFILES = [
    KernelProfile("fusedmlp::mlp", "MLP forward", gemm=True),
    KernelProfile("fusedmlp::mlp_backward", "MLP backward", gemm=True),
    KernelProfile("fusedmlp::linear_act", "linear + activation forward", gemm=True),
    KernelProfile("fusedmlp::linear_act_backward", "linear + activation backward", gemm=True),
]
