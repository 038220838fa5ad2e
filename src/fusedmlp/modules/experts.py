"""FusedGatedExperts: the experts of a mixture-of-experts MLP block (Mixtral, Qwen2/Qwen3-MoE,
OLMoE, DeepSeek-V3's routed experts, Llama 4, gpt-oss), run as grouped GEMMs with the gated
activation in the gate|up GEMM's epilogue (ops/experts.py).

Parameters: ``gate_up`` [E, 2, H, D] (gate rows, then up rows, of each expert: tensor, expert
and fully-sharded parallelism are plain placements of it), ``down`` [E, D, H], optional biases
``gate_up_bias`` [E, 2, H] and ``down_bias`` [E, D]. The state_dict shows them as the replaced
module stored them (:class:`ExpertsLayout`): Hugging Face's ``gate_up_proj`` [E, 2H, D] (a view)
and ``down_proj`` [E, D, H], or the transposed [E, D, 2H] / [E, H, D] of Llama 4 and gpt-oss,
with gpt-oss's interleaved gate/up columns and biases.

The forward takes what Hugging Face's experts take: (hidden_states [T, D], top_k_index [T, k],
top_k_weights [T, k]) -> [T, D], positionally or under the replaced forward's names.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no parameter can be a DTensor
    DTensor = ()  # type: ignore[assignment,misc]

from ..activations import Activation, activation_of, resolve
from ..ops.experts import ExpertActivation, experts
from ..options import Recompute, resolve_recompute


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """How the replaced experts module stores its tensors: the parameter names, whether
    weights are [E, in, out] (``transposed``: Llama 4, gpt-oss) and whether gate and up columns
    alternate (``interleaved``: gpt-oss) rather than come as two halves (gate first)."""

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    gate_up_bias: str = "gate_up_proj_bias"
    down_bias: str = "down_proj_bias"
    transposed: bool = False
    interleaved: bool = False


class FusedGatedExperts(nn.Module):
    """E gated experts as grouped GEMMs; see the module docstring."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Activation = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gpt_oss: tuple[float, float] | None = None,
        layout: ExpertsLayout | None = None,
        input_names: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights"),
        recompute: str | Recompute = Recompute.ACTIVATION,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.act = ExpertActivation(resolve(activation), gpt_oss)
        self.layout = layout or ExpertsLayout()
        self.recompute = resolve_recompute(recompute)  # GEMM: gate|up recomputed in the backward
        self.input_names = input_names
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        E, D, H = num_experts, hidden_size, intermediate_size
        self.gate_up = nn.Parameter(torch.empty(E, 2, H, D, **kw))
        self.down = nn.Parameter(torch.empty(E, D, H, **kw))
        self.gate_up_bias = nn.Parameter(torch.empty(E, 2, H, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, D, **kw)) if bias else None
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of every expert's gate, up and down projections."""
        with torch.no_grad():
            for w in (*self.gate_up.flatten(0, 1), *self.down):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            biases = ((self.gate_up_bias, self.hidden_size), (self.down_bias, self.intermediate_size))
            for b, fan_in in biases:
                if b is not None:
                    bound = 1 / math.sqrt(fan_in)
                    nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.act.describe()}, "
            f"bias={self.gate_up_bias is not None}"
        )

    def forward(self, *args: Tensor, **named: Tensor) -> Tensor:
        x, index, weights = self._inputs(args, named)
        _check(x, index, weights, self)
        if isinstance(self.gate_up, DTensor):  # sharded by fusedmlp.parallel.ExpertsParallel
            from ..parallel import expert_parallel_forward

            return expert_parallel_forward(self, x, index, weights)
        w_gu, b_gu, w_down, b_down = self.gate_up, self.gate_up_bias, self.down, self.down_bias
        return experts(x, index, weights, w_gu, b_gu, w_down, b_down, self.act, self.recompute)

    def _inputs(self, args: tuple[Tensor, ...], named: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        values = list(args)
        for name in self.input_names[len(values):]:
            if name not in named:
                break
            values.append(named.pop(name))
        if len(values) != 3 or named:
            raise TypeError(
                f"{type(self).__name__} takes ({', '.join(self.input_names)}), got {len(args)} positional "
                f"and {sorted(named) or 'no'} other keyword arguments"
            )
        return values[0], values[1], values[2]

    @classmethod
    def from_module(cls, experts_module: nn.Module, **kwargs: Any) -> FusedGatedExperts:
        """A fused copy of a Hugging Face experts module (3-D ``gate_up_proj`` / ``down_proj``
        parameters; gpt-oss's ``alpha``/``limit`` clamped SwiGLU and biases; Llama 4's transposed
        weights): its weights, device and dtype; ValueError naming what does not fit."""
        spec = experts_spec(experts_module)
        if isinstance(spec, str):
            raise ValueError(f"cannot fuse {type(experts_module).__name__}: {spec}")
        layout, E, D, H, act, gpt_oss, bias = spec
        w = getattr(experts_module, layout.gate_up)
        # built on the meta device, then given storage: no initialisation (and no draw from the
        # device's generator) for weights that are loaded next
        fused = cls(E, D, H, kwargs.get("activation", act), bias, "meta", w.dtype, gpt_oss=gpt_oss,
                    layout=layout, input_names=_input_names(experts_module),
                    recompute=kwargs.get("recompute", Recompute.ACTIVATION)).to_empty(device=w.device)
        fused.load_state_dict(experts_module.state_dict())
        return fused


def _check(x: Tensor, index: Tensor, weights: Tensor, m: FusedGatedExperts) -> None:
    """The call's arguments against the module: clear errors, not a kernel's."""
    for name, t in (("hidden_states", x), ("top_k_index", index), ("top_k_weights", weights)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or x.shape[1] != m.hidden_size:
        raise ValueError(f"hidden_states has shape {tuple(x.shape)}; expected [tokens, {m.hidden_size}]")
    integers = not index.dtype.is_floating_point and index.dtype != torch.bool
    if index.dim() != 2 or index.shape[0] != x.shape[0] or not integers:
        raise ValueError(f"top_k_index has shape {tuple(index.shape)} and dtype {index.dtype}; expected "
                         f"integers [{x.shape[0]}, k]")
    if weights.shape != index.shape or not weights.is_floating_point():
        raise ValueError(f"top_k_weights has shape {tuple(weights.shape)}; expected floats like top_k_index "
                         f"{tuple(index.shape)}")
    if x.dtype != m.gate_up.dtype:
        raise TypeError(f"hidden_states has dtype {x.dtype} but the experts' weights {m.gate_up.dtype}")
    if not (x.device == index.device == weights.device == m.gate_up.device):
        raise ValueError("hidden_states, top_k_index, top_k_weights and the weights must share one device")


def _input_names(module: nn.Module) -> tuple[str, str, str]:
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 3:
        return params[0], params[1], params[2]
    return ("hidden_states", "top_k_index", "top_k_weights")


def experts_spec(
    m: nn.Module,
) -> tuple[ExpertsLayout, int, int, int, Activation, tuple[float, float] | None, bool] | str:
    """(layout, E, D, H, activation, gpt_oss, bias) of a Hugging Face experts module, or why it
    is not one fusedmlp reproduces."""
    w, d = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(w, Tensor) and isinstance(d, Tensor) and w.dim() == 3 and d.dim() == 3):
        return "no 3-D gate_up_proj and down_proj parameters"
    E = w.shape[0]
    alpha, limit = getattr(m, "alpha", None), getattr(m, "limit", None)
    gpt_oss = (float(alpha), float(limit)) if isinstance(alpha, float) and isinstance(limit, float) else None
    # [E, 2H, D] with down [E, D, H]; or transposed [E, D, 2H] with down [E, H, D]
    if d.shape[0] == E and w.shape[1] == 2 * d.shape[2] and w.shape[2] == d.shape[1]:
        transposed, D, H = False, w.shape[2], d.shape[2]
    elif d.shape[0] == E and w.shape[2] == 2 * d.shape[1] and w.shape[1] == d.shape[2]:
        transposed, D, H = True, w.shape[1], d.shape[1]
    else:
        return f"gate_up_proj {tuple(w.shape)} and down_proj {tuple(d.shape)} do not chain"
    if gpt_oss is None:
        act = activation_of(getattr(m, "act_fn", None))
        if act is None:
            return f"its activation ({type(getattr(m, 'act_fn', None)).__name__}) is none fusedmlp implements"
    else:
        act = Activation.SILU  # the gpt-oss form replaces it
    has_bias = [isinstance(getattr(m, n, None), Tensor) for n in ("gate_up_proj_bias", "down_proj_bias")]
    if has_bias[0] != has_bias[1]:
        return "only one of gate_up_proj_bias and down_proj_bias"
    layout = ExpertsLayout(transposed=transposed, interleaved=gpt_oss is not None)
    return layout, E, D, H, act, gpt_oss, has_bias[0]


# ---------------------------------------------------------------------------------------------
# state_dict: the replaced module's keys and layout
# ---------------------------------------------------------------------------------------------


def _gate_up_out(m: FusedGatedExperts, t: Tensor) -> Tensor:
    """[E, 2, H, (D)] as the source stores gate|up: [E, 2H, D] (a view), transposed [E, D, 2H],
    or gpt-oss's interleaved columns."""
    lay = m.layout
    if lay.interleaved:  # column 2j is gate j, column 2j+1 up j
        t = t.movedim(1, -1)  # [E, H, (D,) 2]
        merged = t.flatten(-2) if t.dim() == 3 else t.movedim(1, -2).flatten(-2)  # bias [E, 2H]; w [E, D, 2H]
        return merged.contiguous()
    merged = t.flatten(1, 2)  # [E, 2H, (D)]
    return merged.transpose(1, 2).contiguous() if lay.transposed and merged.dim() == 3 else merged


def _gate_up_in(m: FusedGatedExperts, t: Tensor) -> Tensor:
    lay = m.layout
    E, H = m.num_experts, m.intermediate_size
    if lay.interleaved:
        if t.dim() == 2:  # bias [E, 2H] -> [E, 2, H]
            return t.view(E, H, 2).movedim(-1, 1)
        return t.reshape(E, t.shape[1], H, 2).permute(0, 3, 2, 1)  # [E, D, 2H] -> [E, 2, H, D]
    if lay.transposed and t.dim() == 3:
        t = t.transpose(1, 2)  # [E, 2H, D]
    return t.unflatten(1, (2, H))


def _save_hook(m: nn.Module, sd: dict[str, Any], prefix: str, _meta: Any) -> None:
    assert isinstance(m, FusedGatedExperts)
    lay = m.layout
    out: dict[str, Tensor] = {}
    out[lay.gate_up] = _gate_up_out(m, sd.pop(prefix + "gate_up"))
    if prefix + "gate_up_bias" in sd:
        out[lay.gate_up_bias] = _gate_up_out(m, sd.pop(prefix + "gate_up_bias"))
    down = sd.pop(prefix + "down")
    out[lay.down] = down.transpose(1, 2).contiguous() if lay.transposed else down
    if prefix + "down_bias" in sd:
        out[lay.down_bias] = sd.pop(prefix + "down_bias")
    for name in (lay.gate_up, lay.gate_up_bias, lay.down, lay.down_bias):
        if name in out:
            sd[prefix + name] = out[name]


def _load_hook(m: nn.Module, sd: dict[str, Any], prefix: str, *_: Any) -> None:
    assert isinstance(m, FusedGatedExperts)
    lay = m.layout
    if prefix + lay.gate_up in sd:
        sd[prefix + "gate_up"] = _gate_up_in(m, sd.pop(prefix + lay.gate_up))
    if prefix + lay.gate_up_bias in sd:
        sd[prefix + "gate_up_bias"] = _gate_up_in(m, sd.pop(prefix + lay.gate_up_bias))
    if prefix + lay.down in sd:
        d = sd.pop(prefix + lay.down)
        sd[prefix + "down"] = d.transpose(1, 2) if lay.transposed else d
    if prefix + lay.down_bias in sd:
        sd[prefix + "down_bias"] = sd.pop(prefix + lay.down_bias)
