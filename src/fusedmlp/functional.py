"""The fused ops as functions, with input validation that names the problem.

Every function checks its arguments here, in Python, so that bad input raises a ValueError or a
TypeError naming the tensor and what is wrong with it, rather than failing inside a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .activations import Activation, resolve
from .kernels import narrow_pack
from .options import Recompute, resolve_recompute


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
        check_inputs(up, gate.shape[-1], gate=gate)
        if up.shape != gate.shape:
            raise ValueError(f"gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}")
    return ops.gated_act(gate, up, act.value)


def act(x: Tensor, activation: str | Activation = "gelu") -> Tensor:
    """h = act(x)."""
    a = resolve(activation)
    _check_float("input", x)
    return ops.act(x, a.value)


def _check_weight(name: str, w: Tensor, shape: tuple[int, int]) -> None:
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; expected {shape}")


def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _run_mlp(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    act: Activation,
    gated: bool,
    recompute: str | Recompute,
) -> Tensor:
    """Flatten to 2-D, apply autocast's dtype by hand (custom ops are opaque to autocast), run."""
    level = resolve_recompute(recompute)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w_in, w_out = x.to(dt), w_in.to(dt), w_out.to(dt)
        b_in = b_in.to(dt) if b_in is not None else None
        b_out = b_out.to(dt) if b_out is not None else None
    lead = x.shape[:-1]
    x2 = _unit_cols(x.reshape(-1, x.shape[-1]))
    params = (w_in, b_in, w_out, b_out)
    inference = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))
    w_in, w_out = _unit_cols(w_in), _unit_cols(w_out)
    if torch.compiler.is_compiling():  # the custom op: traceable, no graph break
        y = ops.mlp(x2, w_in, b_in, w_out, b_out, act.value, gated, level.value, inference)[0]
    else:  # eager: the same implementation through a cheaper autograd.Function
        y = ops.MLPFunction.apply(x2, w_in, b_in, w_out, b_out, act, gated, level, inference)
    return y.view(*lead, w_out.shape[0])


def gated_mlp(
    x: Tensor,
    gate_up_weight: Tensor,
    gate_up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    activation: str | Activation = "silu",
    recompute: str | Recompute = "activation",
) -> Tensor:
    """y = down(act(gate(x)) * up(x)); gate|up is one [2H, D] weight, gate rows first.
    ``recompute``: what training saves for the backward (:class:`fusedmlp.Recompute`)."""
    act_ = resolve(activation)
    two_h, d = gate_up_weight.shape
    check_inputs(
        x,
        d,
        gate_up_weight=gate_up_weight,
        gate_up_bias=gate_up_bias,
        down_weight=down_weight,
        down_bias=down_bias,
    )
    if two_h % 2:
        raise ValueError(f"gate_up_weight has an odd number of rows ({two_h}); expected [2*H, D]")
    _check_weight("down_weight", down_weight, (down_weight.shape[0], two_h // 2))
    return _run_mlp(x, gate_up_weight, gate_up_bias, down_weight, down_bias, act_, True, recompute)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str | Activation = "gelu",
    recompute: str | Recompute = "activation",
) -> Tensor:
    """y = fc2(act(fc1(x))); ``recompute`` as for :func:`gated_mlp`."""
    act_ = resolve(activation)
    h, d = fc1_weight.shape
    check_inputs(x, d, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    _check_weight("fc2_weight", fc2_weight, (fc2_weight.shape[0], h))
    return _run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act_, False, recompute)


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
    """Autocast's dtype applied by hand (the ops are opaque to it), then the op or its twin."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if torch.compiler.is_compiling():  # the custom op: traceable, no graph break
        return ops.narrow_mlp(x, w, b, widths, names)
    return ops.NarrowMLPFunction.apply(x, w, b, widths, names)  # eager: less host time per call


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
