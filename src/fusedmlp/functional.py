"""The fused ops as functions, with input validation that names the problem.

Every function checks its arguments here, in Python, so that bad input raises a ValueError or a
TypeError naming the tensor and what is wrong with it, rather than failing inside a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]

from . import ops, reference
from .activations import Activation, resolve
from .kernels import narrow_pack
from .options import Recompute, resolve_recompute


def _reject_dtensor(name: str) -> None:
    raise TypeError(
        f"{name} is a DTensor; fusedmlp's functional ops take local tensors: shard fused modules with "
        "fusedmlp.parallel.FusedMLPParallel (tensor parallel) or fully_shard (FSDP2), or pass "
        ".to_local() / .full_tensor()"
    )


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(t, DTensor):
        _reject_dtensor(name)
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; fusedmlp needs a floating-point tensor")


def check_inputs(x: Tensor, expected_last: int, **params: Tensor | None) -> None:
    """Validate an MLP input against its parameters: dtype, last dimension, device, dtype match."""
    _check_float("input", x)
    if x.dim() == 0 or x.shape[-1] != expected_last:
        raise ValueError(
            f"input has shape {tuple(x.shape)}; expected the last dimension to be hidden_size={expected_last}"
        )
    for name, p in params.items():
        if p is None:
            continue
        _check_float(name, p)
        if p.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {p.device}; move both to one device")
        if p.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input has dtype {x.dtype} but {name} has dtype {p.dtype}; cast one of them "
                "(or run under torch.autocast)"
            )


def gated_act(gate: Tensor, up: Tensor | None = None, activation: str | Activation = "silu") -> Tensor:
    """h = act(gate) * up. With ``up=None``, ``gate`` is a merged [..., 2H] gate|up tensor."""
    act = resolve(activation)
    _check_float("gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(
                f"merged gate|up tensor must have an even last dimension, got {tuple(gate.shape)}"
            )
    else:
        _check_float("up", up)
        if up.shape != gate.shape:
            raise ValueError(f"gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}")
        if up.device != gate.device:
            raise ValueError(f"gate is on {gate.device} but up is on {up.device}; move both to one device")
        if up.dtype != gate.dtype:
            raise TypeError(f"gate has dtype {gate.dtype} but up has dtype {up.dtype}; cast one of them")
        if gate.dim() == 0:
            return act(gate) * up
    return ops.gated_act(gate, up, act.value)


def act(x: Tensor, activation: str | Activation = "gelu") -> Tensor:
    """h = act(x)."""
    a = resolve(activation)
    _check_float("input", x)
    if x.dim() == 0:  # a scalar: torch computes it (the kernels work on rows)
        h = a(x)
        return h.clone() if h is x else h
    return ops.act(x, a.value)


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_mlp(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    gated: bool,
    names: tuple[str, str, str, str],
) -> None:
    """Validate an MLP call at the API boundary: tensor types, ranks, every weight and bias shape,
    floating dtypes that match (or autocast), one device. Each check is a comparison on the
    path where all pass; a failure raises a ValueError or TypeError naming the argument
    (``names``: how the weight and bias arguments are called) and what is wrong with it."""
    n_w_in, n_b_in, n_w_out, n_b_out = names
    for name, t, optional in ((n_w_in, w_in, False), (n_b_in, b_in, True), (n_w_out, w_out, False),
                              (n_b_out, b_out, True), ("input", x, False)):
        if not isinstance(t, Tensor) and not (optional and t is None):
            allowed = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"{name} must be {allowed}, got {type(t).__name__}")
        if isinstance(t, DTensor):
            _reject_dtensor(name)
    if w_in.dim() != 2 or w_out.dim() != 2:
        bad = n_w_in if w_in.dim() != 2 else n_w_out
        raise ValueError(f"{bad} has shape {_shape(w_in if bad == n_w_in else w_out)}; expected a 2-D weight")
    rows, d = w_in.shape
    if gated and rows % 2:
        raise ValueError(f"{n_w_in} has an odd number of rows ({rows}); expected [2*H, D], gate rows first")
    h = rows // 2 if gated else rows
    if w_out.shape[1] != h:
        raise ValueError(
            f"{n_w_out} has shape {_shape(w_out)}; expected [D_out, {h}] to follow {n_w_in} {_shape(w_in)}"
        )
    if b_in is not None and (b_in.dim() != 1 or b_in.shape[0] != rows):
        raise ValueError(f"{n_b_in} has shape {_shape(b_in)}; expected ({rows},)")
    if b_out is not None and (b_out.dim() != 1 or b_out.shape[0] != w_out.shape[0]):
        raise ValueError(f"{n_b_out} has shape {_shape(b_out)}; expected ({w_out.shape[0]},)")
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"input has shape {_shape(x)}; expected the last dimension to be hidden_size={d}")
    dtype, device = x.dtype, x.device
    autocast = None
    for name, t in (("input", x), (n_w_in, w_in), (n_b_in, b_in), (n_w_out, w_out), (n_b_out, b_out)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; fusedmlp needs a floating-point tensor")
        if t.device != device:
            raise ValueError(f"input is on {device} but {name} is on {t.device}; move both to one device")
        if t.dtype != dtype:
            if autocast is None:
                autocast = torch.is_autocast_enabled(device.type)
            if not autocast:
                raise TypeError(
                    f"input has dtype {dtype} but {name} has dtype {t.dtype}; cast one of them "
                    "(or run under torch.autocast)"
                )


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, names: tuple[str, str]) -> None:
    """As :func:`check_mlp`, for one projection ``weight`` [out, in] and its ``bias``."""
    n_w, n_b = names
    for name, t, optional in ((n_w, weight, False), (n_b, bias, True), ("input", x, False)):
        if not isinstance(t, Tensor) and not (optional and t is None):
            allowed = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"{name} must be {allowed}, got {type(t).__name__}")
        if isinstance(t, DTensor):
            _reject_dtensor(name)
    if weight.dim() != 2:
        raise ValueError(f"{n_w} has shape {_shape(weight)}; expected a 2-D weight [out, in]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{n_b} has shape {_shape(bias)}; expected ({weight.shape[0]},)")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has shape {_shape(x)}; expected the last dimension to be {weight.shape[1]}")
    autocast = None
    for name, t in (("input", x), (n_w, weight), (n_b, bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; fusedmlp needs a floating-point tensor")
        if t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}; move both to one device")
        if t.dtype != x.dtype:
            if autocast is None:
                autocast = torch.is_autocast_enabled(x.device.type)
            if not autocast:
                raise TypeError(
                    f"input has dtype {x.dtype} but {name} has dtype {t.dtype}; cast one of them "
                    "(or run under torch.autocast)"
                )


def linear_act(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | Activation = "gelu"
) -> Tensor:
    """h = act(x @ weight^T + bias) as ONE GEMM launch with the activation in its epilogue
    (where the kernels serve the call); weight is [out, in], as nn.Linear's."""
    act_ = resolve(activation)
    check_linear(x, weight, bias, ("weight", "bias"))
    return run_linear_act(x, weight, bias, act_)


def run_linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> Tensor:
    """:func:`linear_act` on validated arguments, dispatched as :func:`run_mlp` does."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.numel() == 0:  # a zero-width layer: nothing for a kernel to do
        return act(F.linear(x, weight, bias))
    weight = _unit_cols(weight)
    if torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled()
        lead = x.shape[:-1]
        h = ops.linear_act(_unit_cols(x.reshape(-1, x.shape[-1])), weight, bias, act.value, needs_grad)[0]
        return h.view(*lead, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return ops.LinearActFunction.apply(x, weight, bias, act)
    return ops.fused_mlp.linear_act_inference(x, weight, bias, act)


def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def run_mlp(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    act: Activation,
    gated: bool,
    recompute: Recompute,
    dropout: float = 0.0,
    dropout_span: tuple[int, int] | None = None,
) -> Tensor:
    """The MLP on validated arguments (:func:`check_mlp`): autocast's dtype applied by hand (the
    ops are opaque to it), then the op for traced code, its autograd.Function twin where a
    gradient is wanted, or the forward alone (no autograd node) where none is. ``dropout``: the
    probability of dropping each element of h before the output projection (0: none);
    ``dropout_span`` (first column, full width): h is a column shard of a wider h (tensor
    parallel) and takes that h's mask on its columns, so the ranks together drop what one
    unsharded module would with the same seed."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, w_in, w_out = x.to(dt), w_in.to(dt), w_out.to(dt)
        b_in = b_in.to(dt) if b_in is not None else None
        b_out = b_out.to(dt) if b_out is not None else None
    if w_in.numel() == 0 or w_out.numel() == 0:  # a zero-width layer: nothing for a kernel to do
        return _degenerate_mlp(x, w_in, b_in, w_out, b_out, act, gated, dropout)
    w_in, w_out = _unit_cols(w_in), _unit_cols(w_out)
    if torch.compiler.is_compiling():  # the custom op: traceable, no graph break
        needs_grad = torch.is_grad_enabled()
        lead = x.shape[:-1]
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64) if dropout else None
        col0, width = dropout_span or (0, 0)
        y = ops.mlp(_unit_cols(x.reshape(-1, x.shape[-1])), w_in, b_in, w_out, b_out, act.value, gated,
                    recompute.value, not needs_grad, dropout, seed, col0, width)[0]
        return y.view(*lead, w_out.shape[0])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or w_in.requires_grad or w_out.requires_grad
        or (b_in is not None and b_in.requires_grad) or (b_out is not None and b_out.requires_grad)
    )
    if needs_grad:
        args = (x, w_in, b_in, w_out, b_out, act, gated, recompute, dropout, dropout_span)
        return ops.MLPFunction.apply(*args)
    return ops.fused_mlp.mlp_inference(x, w_in, b_in, w_out, b_out, act, gated, dropout, dropout_span)


def _degenerate_mlp(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None, act: Activation,
    gated: bool, dropout: float,
) -> Tensor:
    """The MLP with a zero-width layer (hidden, intermediate or output size 0), as eager computes
    it (a bias may still reach the output), in torch ops."""
    z = F.linear(x, w_in, b_in)
    h = act(z[..., : z.shape[-1] // 2]) * z[..., z.shape[-1] // 2 :] if gated else act(z)
    return F.linear(F.dropout(h, dropout) if dropout else h, w_out, b_out)


def gated_mlp(
    x: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    activation: str | Activation = "silu",
    recompute: str | Recompute = "activation",
    dropout: float = 0.0,
) -> Tensor:
    """y = down(dropout(act(gate(x)) * up(x))); gate|up is one [2H, D] weight, gate rows first.
    ``recompute``: what training saves for the backward (:class:`fusedmlp.Recompute`).
    ``dropout``: nn.Dropout's p for h, applied whatever the mode (pass 0 in eval, as
    F.dropout(training=False) would); the mask is drawn from torch's generator."""
    act_, level, p = resolve(activation), resolve_recompute(recompute), check_p(dropout)
    check_mlp(x, gate_up_weight, gate_up_bias, down_weight, down_bias, True, GATED_NAMES)
    return run_mlp(x, gate_up_weight, gate_up_bias, down_weight, down_bias, act_, True, level, p)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str | Activation = "gelu",
    recompute: str | Recompute = "activation",
    dropout: float = 0.0,
) -> Tensor:
    """y = fc2(dropout(act(fc1(x)))); ``recompute`` and ``dropout`` as for :func:`gated_mlp`."""
    act_, level = resolve(activation), resolve_recompute(recompute)
    check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, False, PLAIN_NAMES)
    return run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act_, False, level, check_p(dropout))


def check_p(p: object) -> float:
    """A dropout probability: a real number in [0, 1]; ValueError otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be a number in [0, 1], got {p!r}")
    return float(p)


GATED_NAMES = ("gate_up_weight", "gate_up_bias", "down_weight", "down_bias")
PLAIN_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def pack_narrow_mlp(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Zero-padded [L, P, P] weights and [L, P] biases (zeros for a missing bias), P the padded
    width of the widest layer (kernels/narrow_pack.py). Differentiable: gradients of the packed
    tensors flow back to each layer's weight and bias."""
    P = narrow_pack.padded_width([max(w.shape) for w in weights])
    if not torch.compiler.is_compiling():  # eager: one autograd node instead of 2L + 2
        present = [b for b in biases if b is not None]
        return ops.PackNarrowFunction.apply(P, tuple(b is not None for b in biases), *weights, *present)
    w = torch.stack([F.pad(w, (0, P - w.shape[1], 0, P - w.shape[0])) for w in weights])
    b = torch.stack(
        [
            w.new_zeros(P) if b is None else F.pad(b, (0, P - b.shape[0]))
            for w, b in zip(weights, biases, strict=True)
        ]
    )
    return w, b


def narrow_widths(weights: list[Tensor], biases: list[Tensor | None]) -> list[int]:
    """[D_0, ..., D_L] of a chain of [D_l, D_{l-1}] weights; ValueError naming the first mismatch."""
    if not weights or len(biases) != len(weights):
        raise ValueError(f"need L >= 1 weights and L biases, got {len(weights)} and {len(biases)}")
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if not isinstance(w, Tensor):
            raise TypeError(f"layer {i}: weight must be a torch.Tensor, got {type(w).__name__}")
        if b is not None and not isinstance(b, Tensor):
            raise TypeError(f"layer {i}: bias must be a torch.Tensor or None, got {type(b).__name__}")
    if weights[0].dim() != 2:
        raise ValueError(f"layer 0: weight has shape {tuple(weights[0].shape)}; expected a 2-D weight")
    widths = [weights[0].shape[-1]]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != widths[-1]:
            raise ValueError(f"layer {i}: weight has shape {tuple(w.shape)}; expected [*, {widths[-1]}]")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"layer {i}: bias has shape {tuple(b.shape)}; expected ({w.shape[0]},)")
        widths.append(w.shape[0])
    return widths


def narrow_spec(
    weights: list[Tensor], biases: list[Tensor | None], activations: list[str | Activation]
) -> tuple[list[int], str]:
    """(widths [D_0, ..., D_L], the activations as the ops' comma-joined names) of a stack, or a
    ValueError naming what does not fit: mismatched shapes, a count of activations, a width."""
    acts = [resolve(a) for a in activations]
    widths = narrow_widths(weights, biases)
    if len(acts) != len(weights):
        raise ValueError(f"need one activation per layer: {len(weights)} layers, {len(acts)} activations")
    if max(widths) > narrow_pack.MAX_WIDTH:
        raise ValueError(f"narrow_mlp needs every width <= {narrow_pack.MAX_WIDTH}, got widths {widths}")
    return widths, ",".join(a.value for a in acts)


def narrow_mlp_packed(x: Tensor, w: Tensor, b: Tensor, widths: list[int], names: str) -> Tensor:
    """The stack over already packed, validated parameters (:func:`pack_narrow_mlp` and
    :func:`narrow_spec`); checks only ``x`` against them. Gradients land on ``w`` and ``b``."""
    check_inputs(x, widths[0], weights=w)
    return _run_narrow(x, w, b, widths, names)


def _run_narrow(x: Tensor, w: Tensor, b: Tensor, widths: list[int], names: str) -> Tensor:
    """Autocast's dtype applied by hand (the ops are opaque to it), then the op for traced code,
    its autograd.Function twin where a gradient is wanted, or the forward alone."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if 0 in widths:  # a zero-width layer: nothing for a kernel to do
        weights, biases = narrow_pack.unpack(w, b, widths)
        return reference.narrow_mlp(x, list(weights), list(biases), ops.narrow.activations_of(names))
    if torch.compiler.is_compiling():  # the custom op: traceable, no graph break
        return ops.narrow_mlp(x, w, b, widths, names)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad):
        return ops.NarrowMLPFunction.apply(x, w, b, widths, names)  # eager: less host time per call
    return ops.narrow.narrow_mlp_forward(x, w, b, widths, names)  # nothing to differentiate: no node


def narrow_mlp(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    activations: list[str | Activation],
) -> Tensor:
    """h_l = act_l(h_{l-1} @ W_l^T + b_l) for every layer, as one kernel when all widths are <= 256."""
    widths, names = narrow_spec(weights, biases, activations)
    check_inputs(
        x,
        widths[0],
        **{f"weights[{i}]": w for i, w in enumerate(weights)},
        **{f"biases[{i}]": b for i, b in enumerate(biases)},
    )
    w, b = pack_narrow_mlp(weights, biases)
    return _run_narrow(x, w, b, widths, names)
