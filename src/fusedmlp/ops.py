"""torch.library custom ops: the kernels made visible to autograd and torch.compile.

Every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through
it without a graph break, and a registered autograd formula. Dispatch happens inside each op:
the Triton kernel on CUDA tensors (and on CPU tensors when Triton's interpreter is on, which is
how CI runs the kernels), the eager reference from ``reference.py`` everywhere else. The whole-MLP
op also has an autograd.Function twin (:class:`MLPFunction`) over the same implementation, which
eager calls use: a custom op's dispatch costs more host time than a decode-sized forward's GPU
time (functional.py picks by ``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import enum
import os
from typing import Any

import torch
from torch import Tensor

from . import reference
from .activations import Activation, resolve

try:
    from .kernels import gated_act as _k_act
    from .kernels import gemm_act as _k_gemm
    from .kernels import gemm_act_bwd as _k_gemm_bwd
    from .kernels import narrow_mlp as _k_narrow
except ImportError:  # no triton on this platform: everything runs the reference path
    _k_act = _k_gemm = _k_gemm_bwd = _k_narrow = None  # type: ignore[assignment]

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
# the whole MLP: y = out(act(in_gate(x)) * in_up(x)) (gated) or y = out(act(in(x)))
#
# Forward: one Triton GEMM with the activation in its epilogue writes h (and, when training saves
# it, the pre-activation gate|up), then cuBLAS for the output projection.
# Backward: dh = dy @ W_out (cuBLAS); one pointwise kernel turns dh and the saved gate|up into
# d(gate|up), written in the merged layout (over gate|up, in place, in eager), and recomputes h
# for W_out's gradient unless it was saved; then dx = d(gate|up) @ W_in and
# dW_in = d(gate|up)^T @ x are one cuBLAS GEMM each over the merged layout. With
# FUSED_BACKWARD_GEMM, one Triton GEMM does the first two steps and dh never reaches memory.
# ---------------------------------------------------------------------------------------------


class Recompute(str, enum.Enum):
    """What training saves for the backward, per token (H = intermediate size, e = bytes per
    element; gated MLPs, halve the gate|up term for plain ones). x is saved in every mode.

    - ``NONE``: gate|up and h, 3H*e: the backward recomputes nothing.
    - ``ACTIVATION``: gate|up, 2H*e: the backward recomputes h in its pointwise kernel (free: that
      kernel reads gate|up anyway). The default.
    - ``GEMM``: nothing beyond x: the backward recomputes gate|up (about a third more backward
      FLOPs), a block of hidden columns at a time, so even inside the backward only
      [tokens, 3H/4] of intermediates live at once: the least memory, and the slowest.
    """

    NONE = "none"
    ACTIVATION = "activation"
    GEMM = "gemm"


def resolve_recompute(value: str | Recompute) -> Recompute:
    try:
        return Recompute(value)
    except ValueError:
        known = ", ".join(r.value for r in Recompute)
        raise ValueError(f"unknown recompute mode {value!r}; known: {known}") from None


INFERENCE = "inference"  # the mode string of a forward that saves nothing


def _mlp_reference(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, act: Any, gated: bool
) -> tuple[Tensor, Tensor]:
    pre = torch.nn.functional.linear(x, w_in, b_in)
    h = reference.gated_act(*reference.split_gate_up(pre), act) if gated else act(pre)
    return h, pre


# The backward GEMM with the activation derivative in its epilogue (kernels/gemm_act_bwd.py) keeps
# dh out of memory, but with its present configs it measured ~2x slower than cuBLAS for dh plus
# the pointwise kernel (H100 bf16: geglu-article 318 vs 168 us, llama3-8b 1576 vs 863 us;
# benchmarks/backward_parts.py, docs/perf-notes.md), so the backward uses the latter until the
# fused kernel is tuned. Tests run both.
FUSED_BACKWARD_GEMM = False


def _fused_gemm_ok(x: Tensor) -> bool:
    """Whether the Triton GEMMs serve this dtype: bf16 and fp16. In fp32 Triton's dots missed the
    numerics contract on H100: IEEE fp32 with ~6x cuBLAS SGEMM's max error at K=64, TF32 with
    ~3x cuBLAS's TF32 error (Triton truncates the inputs to TF32, cuBLAS rounds them). fp32 takes
    cuBLAS for the projections and the Triton pointwise kernels for the activation instead."""
    return x.dtype in (torch.float16, torch.bfloat16)


def mlp_forward(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    gated: bool,
    mode: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, pre, h) for 2-D x [M, D]; ``pre`` (gate|up before the activation) and ``h`` are
    returned where ``mode`` (a :class:`Recompute` value or ``"inference"``) saves them."""
    act = resolve(activation)
    store_pre = mode in (Recompute.NONE, Recompute.ACTIVATION)
    if use_triton(x, w_in, b_in, w_out, b_out) and _fused_gemm_ok(x):
        h, pre = _k_gemm.gemm_act(
            x,
            w_in,
            b_in,
            act,
            gated,
            store_preact=store_pre,
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    elif use_triton(x, w_in, b_in, w_out, b_out):  # fp32, TF32 off: cuBLAS, then the pointwise kernel
        pre = torch.nn.functional.linear(x, w_in, b_in)
        H = pre.shape[1] // 2 if gated else pre.shape[1]
        h = _k_act.act_forward(pre[:, :H], pre[:, H:] if gated else None, act)
    else:
        h, pre = _mlp_reference(x, w_in, b_in, act, gated)
    y = torch.nn.functional.linear(h, w_out, b_out)
    return y, (pre if store_pre else None), (h if mode == Recompute.NONE else None)


def _pointwise_backward(
    dh: Tensor,
    gate: Tensor,
    up: Tensor | None,
    act: Activation,
    dgate: Tensor,
    dup: Tensor | None,
    h: Tensor | None,
) -> None:
    """Writes d(gate) (and d(up) when gated) of h = act(gate) * up given dh, and h where given;
    outputs may alias inputs (in place). The Triton kernel where it serves these tensors, else
    the torch reference."""
    if use_triton(dh, gate, up):
        _k_act.act_backward(dh, gate, up, act, dgate, dup, h)
        return
    if up is None:
        results = (reference.act_backward(dh, gate, act), None, act(gate) if h is not None else None)
    else:
        dg, du = reference.gated_act_backward(dh, gate, up, act)
        results = (dg, du, reference.gated_act(gate, up, act) if h is not None else None)
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
    activation: str,
    gated: bool,
    has_b_out: bool,
    in_place: bool = False,
    dw_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """(dx, dw_in, db_in, dw_out, db_out) of the MLP: the implementation behind :func:`mlp_backward`.

    ``pre`` None: recompute it from x (Recompute.GEMM), a block of hidden columns at a time where
    H is wide (:func:`_backward_recompute_blocks`). ``h`` None: recompute it with d(gate|up).
    ``in_place``: d(gate|up) overwrites ``pre`` (each element is read, then written, by the same
    program), which takes 2H elements per token off the backward's peak memory; ``pre`` is
    garbage afterwards. ``dw_out``: W_out's gradient, already taken by a caller that then freed h.
    """
    act = resolve(activation)
    if pre is None and dw_out is None and w_out.shape[1] > GEMM_RECOMPUTE_MIN_WIDTH:
        return _backward_recompute_blocks(dy, x, w_in, b_in, w_out, activation, gated, has_b_out)
    if pre is None:
        pre, in_place = torch.nn.functional.linear(x, w_in, b_in), True  # a buffer of our own
    need_h = h is None and dw_out is None
    if use_triton(dy, pre) and FUSED_BACKWARD_GEMM and _fused_gemm_ok(dy):
        # dh = dy @ W_out lives only in the GEMM's registers: its epilogue writes d(gate|up)
        dpre, h_new = _k_gemm_bwd.gemm_act_backward(
            dy,
            w_out,
            pre,
            act,
            gated,
            dpre=pre if in_place else None,
            store_h=need_h,
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
        h = h_new if need_h else h
    else:  # cuBLAS dh, then the pointwise backward
        dh = dy @ w_out
        dpre = pre if in_place else torch.empty_like(pre)
        if need_h:
            h = dh if in_place else torch.empty_like(dh)
        H = dh.shape[1]
        up, dup = (pre[:, H:], dpre[:, H:]) if gated else (None, None)
        _pointwise_backward(dh, pre[:, :H], up, act, dpre[:, :H], dup, h if need_h else None)
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
# of gate|up and dh at once; instead it walks blocks of at least this many hidden columns (4
# blocks where H >= 4x this), so one block's [tokens, 3 * width] lives at a time.
GEMM_RECOMPUTE_MIN_WIDTH = 512
GEMM_RECOMPUTE_BLOCKS = 4


def _backward_recompute_blocks(
    dy: Tensor,
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    activation: str,
    gated: bool,
    has_b_out: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """The backward of Recompute.GEMM over blocks of hidden columns j.

    Each block recomputes its gate and up columns (x @ W_in[j]^T), dh_j = dy @ W_out[:, j], turns
    gate|up into d(gate|up) in place and dh_j into h_j, then writes W_in's rows j and W_out's
    columns j of the weight gradients, each ONE GEMM over all tokens: exactly what the unblocked
    backward computes. Only dx = sum_j d(gate|up)_j @ W_in[j] spans blocks; it sums in fp32,
    each block's term rounded to the storage dtype once (the unblocked dx rounds once in all).
    """
    act = resolve(activation)
    H = w_out.shape[1]
    width = max(GEMM_RECOMPUTE_MIN_WIDTH, -(-H // GEMM_RECOMPUTE_BLOCKS))
    dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
    db_in = torch.empty_like(b_in) if b_in is not None else None
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j0 in range(0, H, width):
        j1 = min(j0 + width, H)
        rows = [slice(j0, j1)] + ([slice(H + j0, H + j1)] if gated else [])
        pre = [torch.nn.functional.linear(x, w_in[r], None if b_in is None else b_in[r]) for r in rows]
        dh = dy @ w_out[:, j0:j1]
        up = pre[1] if gated else None
        _pointwise_backward(dh, pre[0], up, act, pre[0], up, dh)  # in place
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


class MLPFunction(torch.autograd.Function):
    """Eager autograd for the MLP. ``torch.library`` custom ops cost ~240 us of CPU per call in
    eager (H100 host, torch 2.11; benchmarks/overhead.py), more than a decode-sized forward
    takes on the GPU, so eager calls come here; traced code uses the custom op :func:`mlp`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_in: Tensor,
        b_in: Tensor | None,
        w_out: Tensor,
        b_out: Tensor | None,
        activation: str,
        gated: bool,
        mode: str,
    ) -> Tensor:
        y, pre, h = mlp_forward(x, w_in, b_in, w_out, b_out, activation, gated, mode)
        if mode != INFERENCE:
            ctx.meta = (activation, gated, b_out is not None)
            ctx.save_for_backward(x, w_in, b_in, w_out, pre)
            # h (Recompute.NONE) is held apart from the saved tensors so that the backward can
            # free it as soon as W_out's gradient is taken, before it allocates its own buffers
            ctx.h = h
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "fusedmlp's MLP backward reuses its saved activations in place, so it runs once per "
                "forward: backward(retain_graph=True) followed by a second backward is not supported"
            )
        ctx.consumed = True
        x, w_in, b_in, w_out, pre = ctx.saved_tensors
        dy = dy.contiguous()
        h, ctx.h = ctx.h, None
        dw_out = dy.t() @ h if h is not None else None
        del h  # its last reference: the peak below no longer holds [tokens, H] of h
        grads = mlp_backward_impl(
            dy, x, w_in, b_in, w_out, pre, None, *ctx.meta, in_place=True, dw_out=dw_out
        )
        return (*grads, None, None, None)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


@torch.library.custom_op("fusedmlp::mlp", mutates_args=())
def mlp(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    gated: bool,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, pre, h) for 2-D x [M, D]; ``pre`` and ``h`` are empty unless ``mode`` saves them."""
    y, pre, h = mlp_forward(x, w_in, b_in, w_out, b_out, activation, gated, mode)
    return y, _or_empty(pre, x), _or_empty(h, x)


@mlp.register_fake
def _(x, w_in, b_in, w_out, b_out, activation, gated, mode):  # type: ignore[no-untyped-def]
    store_pre = mode in (Recompute.NONE, Recompute.ACTIVATION)
    pre = x.new_empty(x.shape[0], w_in.shape[0]) if store_pre else x.new_empty(0)
    h = x.new_empty(x.shape[0], w_out.shape[1]) if mode == Recompute.NONE else x.new_empty(0)
    return x.new_empty(x.shape[0], w_out.shape[0]), pre, h


@torch.library.custom_op("fusedmlp::mlp_backward", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_in, db_in, dw_out, db_out) of :func:`mlp`; empty ``pre``/``h`` mean recompute
    them; absent biases get empty gradients."""
    dx, dw_in, db_in, dw_out, db_out = mlp_backward_impl(
        dy, x, w_in, b_in, w_out, _or_none(pre), _or_none(h), activation, gated, has_b_out
    )
    return dx, dw_in, _or_empty(db_in, x), dw_out, _or_empty(db_out, x)


@mlp_backward.register_fake
def _(dy, x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out):  # type: ignore[no-untyped-def]
    return (
        x.new_empty(x.shape),
        w_in.new_empty(w_in.shape),
        w_in.new_empty(w_in.shape[0]) if b_in is not None else x.new_empty(0),
        w_out.new_empty(w_out.shape),
        w_out.new_empty(w_out.shape[0]) if has_b_out else x.new_empty(0),
    )


def _mlp_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, w_in, b_in, w_out, b_out, activation, gated, mode = inputs
    ctx.meta = (activation, gated, b_out is not None, mode)
    ctx.save_for_backward(x, w_in, b_in, w_out, output[1], output[2])


def _mlp_bwd(ctx: Any, dy: Tensor, _dpre: Tensor, _dh: Tensor) -> tuple[Tensor | None, ...]:
    activation, gated, has_b_out, mode = ctx.meta
    if mode == INFERENCE:
        raise RuntimeError("fusedmlp::mlp ran in inference mode (nothing saved), so it cannot run backward")
    x, w_in, b_in, w_out, pre, h = ctx.saved_tensors
    dx, dw_in, db_in, dw_out, db_out = mlp_backward(
        dy.contiguous(), x, w_in, b_in, w_out, pre, h, activation, gated, has_b_out
    )
    db_in_ = db_in if b_in is not None else None
    return (dx, dw_in, db_in_, dw_out, db_out if has_b_out else None, None, None, None)


mlp.register_autograd(_mlp_bwd, setup_context=_mlp_setup)
# narrow MLP: the whole stack of narrow Linear layers in one kernel, weights packed [L, P, P]
# ---------------------------------------------------------------------------------------------


def unpack_narrow_mlp(w: Tensor, b: Tensor, widths: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer views [D_l, D_{l-1}] and [D_l] of packed weights [L, P, P] and biases [L, P]."""
    L = len(widths) - 1
    return (
        [w[i, : widths[i + 1], : widths[i]] for i in range(L)],
        [b[i, : widths[i + 1]] for i in range(L)],
    )


def _narrow_on_triton(x: Tensor, w: Tensor, b: Tensor, widths: list[int], backward: bool = False) -> bool:
    """Whether the forward (or the backward) kernel serves this stack; else the torch reference."""
    if _k_narrow is None or max(widths) > _k_narrow.MAX_WIDTH or not use_triton(x, w, b):
        return False
    return _k_narrow.kernel_fits(w.shape[-1], x.dtype, layers=len(widths) - 1 if backward else None)


def _narrow_mlp_forward(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    acts = [resolve(a) for a in activations.split(",")]
    if not _narrow_on_triton(x, w, b, widths):
        weights, biases = unpack_narrow_mlp(w, b, widths)
        return reference.narrow_mlp(x, weights, list(biases), list(acts))
    y = _k_narrow.narrow_mlp_forward(x.reshape(-1, widths[0]), w.contiguous(), b.contiguous(), widths, acts)
    return y.view(*x.shape[:-1], widths[-1])


def _narrow_mlp_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    acts = [resolve(a) for a in activations.split(",")]
    if not _narrow_on_triton(x, w, b, widths, backward=True):
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


@torch.library.custom_op("fusedmlp::narrow_mlp", mutates_args=())
def narrow_mlp(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    """y [..., D_L] of the stack over x [..., D_0]; ``w`` [L, P, P] and ``b`` [L, P] zero-padded,
    ``widths`` = [D_0, ..., D_L], ``activations`` one name per layer, comma-separated ("identity"
    for none; a comma-joined str because custom ops take no list of strings)."""
    return _narrow_mlp_forward(x, w, b, widths, activations)


@narrow_mlp.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], widths[-1]))


@torch.library.custom_op("fusedmlp::narrow_mlp_backward", mutates_args=())
def narrow_mlp_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor, widths: list[int], activations: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw [L, P, P], db [L, P]) of :func:`narrow_mlp`; padded entries of dw and db are zero."""
    return _narrow_mlp_backward(grad, x, w, b, widths, activations)


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
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dw: Tensor, db: Tensor) -> tuple[Tensor | None, ...]:
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
        return _narrow_mlp_forward(x, w, b, widths, activations)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b = ctx.saved_tensors
        dx, dw, db = _narrow_mlp_backward(grad, x, w, b, ctx.widths, ctx.activations)
        return dx, dw, db, None, None
