"""The fused MLP modules: FusedGatedMLP (Llama/Gemma style), FusedMLP (GPT-2/BERT/ViT style) and
FusedLinearAct (a lone projection and its activation), each a drop-in for the block it replaces
with the same state_dict (modules/state.py), and their variants that keep the replaced block's
output dropout (what ``fuse`` builds for GPT-2's MLP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no parameter can be a DTensor
    DTensor = ()  # type: ignore[assignment,misc]

from .. import functional
from ..activations import Activation, resolve
from ..families import GATED_LAYOUTS, PLAIN_LAYOUTS, find_activation
from ..options import Recompute, resolve_recompute
from .state import (
    StateLayout,
    linear_params,
    load_state_dict_hook,
    save_state_dict_hook,
    source_named_tensors,
)

_PARAM_NAMES = ("in_weight", "in_bias", "out_weight", "out_bias")


def _merged_rows(w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A gated module's [2, H, D] weight and [2, H] bias as the [2H, D] and [2H] views the
    kernels take; ValueError naming the parameter when it has been replaced by another shape."""
    if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[0] != 2:
        shape = tuple(getattr(w, "shape", ()))
        raise ValueError(f"in_weight has shape {shape}; expected [2, H, D] (gate, up)")
    if b is not None and (b.dim() != 2 or b.shape != w.shape[:2]):
        raise ValueError(f"in_bias has shape {tuple(b.shape)}; expected {tuple(w.shape[:2])}")
    return w.flatten(0, 1), (b.flatten() if b is not None else None)


class _OneInput(nn.Module):
    """A fused module takes one input, positionally or by the name the replaced block's forward
    gave it (``input_name``, set by fuse: a parent calling ``self.mlp(hidden_states=x)`` keeps
    working)."""

    input_name: str = "x"

    def _input(self, x: Tensor | None, named: dict[str, Tensor]) -> Tensor:
        if x is None and len(named) == 1 and self.input_name in named:
            return named[self.input_name]
        given = ["positional"] * (x is not None) + sorted(named)
        what = ", ".join(given) or "none"
        raise TypeError(f"{type(self).__name__} takes one input ({self.input_name}), got {what}")


class _SourceProjection:
    """``weight`` and ``bias`` of one replaced projection (gate_proj, down_proj, ...) of a fused
    module: the state_dict's views, read when asked for."""

    def __init__(self, module: _FusedMLPBase, name: str) -> None:
        self._module, self._name = module, name

    def _get(self, suffix: str) -> Tensor | None:
        own = self._module._parameters
        tensors = {n: own.get(n) for n in _PARAM_NAMES}
        return source_named_tensors(self._module, tensors).get(f"{self._name}.{suffix}")  # type: ignore[arg-type]

    @property
    def weight(self) -> Tensor | None:
        return self._get("weight")

    @property
    def bias(self) -> Tensor | None:
        return self._get("bias")


class _FusedMLPBase(_OneInput):
    """State-dict renaming, from_module and validation shared by the two fused MLPs."""

    GATED: ClassVar[bool]
    DEFAULT_LAYOUT: ClassVar[StateLayout]
    _KNOWN_NAMES: ClassVar[tuple[tuple[tuple[str, ...], str], ...]]

    in_weight: nn.Parameter
    in_bias: nn.Parameter | None
    out_weight: nn.Parameter
    out_bias: nn.Parameter | None

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Activation,
        bias: bool | tuple[bool, bool],
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        layout: StateLayout | None,
        out_features: int | None = None,
        recompute: str | Recompute = Recompute.ACTIVATION,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_dropout = functional.check_p(hidden_dropout)
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.out_features = hidden_size if out_features is None else out_features
        self.activation = resolve(activation)
        self.recompute = resolve_recompute(recompute)
        self.layout = layout or self.DEFAULT_LAYOUT
        if self.GATED and len(self.layout.inputs) not in (1, 2):
            raise ValueError(
                f"a gated MLP's layout has 1 (merged) or 2 input names, got {self.layout.inputs}"
            )
        if not self.GATED and len(self.layout.inputs) != 1:
            raise ValueError(f"a plain MLP's layout has 1 input name, got {self.layout.inputs}")
        in_bias, out_bias = (bias, bias) if isinstance(bias, bool) else bias
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        # gated: gate|up as [2, H, D] (and [2, H]): every parallelism is then a plain placement
        # (tensor parallel shards dim 1, so each rank holds exactly [gate_r; up_r]), the state_dict
        # shows gate and up as views, and the kernels take the contiguous [2H, D] view
        lead = (2, intermediate_size) if self.GATED else (intermediate_size,)
        self.in_weight = nn.Parameter(torch.empty(*lead, hidden_size, **kw))
        self.in_bias = nn.Parameter(torch.empty(*lead, **kw)) if in_bias else None
        self.out_weight = nn.Parameter(torch.empty(self.out_features, intermediate_size, **kw))
        self.out_bias = nn.Parameter(torch.empty(self.out_features, **kw)) if out_bias else None
        self.reset_parameters()
        self.register_state_dict_post_hook(save_state_dict_hook)
        self.register_load_state_dict_pre_hook(load_state_dict_hook)

    def forward(self, x: Tensor | None = None, **named: Tensor) -> Tensor:
        if named or x is None:
            x = self._input(x, named)
        p = self._parameters  # one dict read per parameter (nn.Module.__getattr__ costs more)
        w_in, b_in, w_out, b_out = p["in_weight"], p.get("in_bias"), p["out_weight"], p.get("out_bias")
        if isinstance(w_in, DTensor):  # sharded by fusedmlp.parallel (tensor parallel)
            from ..parallel import tensor_parallel_forward

            return tensor_parallel_forward(self, x)
        if self.GATED:
            w_in, b_in = _merged_rows(w_in, b_in)  # type: ignore[arg-type]
        functional.check_mlp(x, w_in, b_in, w_out, b_out, self.GATED, _PARAM_NAMES)  # type: ignore[arg-type]
        p_drop = self.hidden_dropout if self.training else 0.0
        act, gated, level = self.activation, self.GATED, self.recompute
        return functional.run_mlp(x, w_in, b_in, w_out, b_out, act, gated, level, p_drop)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        """The replaced module's projections by name (``fused.gate_proj.weight``): views of the
        fused parameters, as the state_dict shows them. Tools that resolve state_dict keys to
        attributes (torch.distributed.checkpoint.state_dict) find them so."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            layout = self.__dict__.get("layout")
            if layout is not None and name in (*layout.inputs, layout.output):
                return _SourceProjection(self, name)
            raise

    def merged_in_weight(self) -> Tensor:
        """The input projection as the kernels take it: [2H, D] (gate rows, then up) when gated."""
        return _merged_rows(self.in_weight, None)[0] if self.GATED else self.in_weight

    def merged_in_bias(self) -> Tensor | None:
        b = self.in_bias
        return b.flatten() if self.GATED and b is not None else b

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, applied to each projection (gate and up each as the
        [H, D] Linear it stands for)."""
        w_in, b_in = self.in_weight, self.in_bias
        if self.GATED:  # [2, H, D]: gate and up, each the [H, D] Linear it stands for
            ins = [(w_in[i], None if b_in is None else b_in[i]) for i in range(2)]
        else:
            ins = [(w_in, b_in)]
        with torch.no_grad():
            for w, b in (*ins, (self.out_weight, self.out_bias)):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if b is not None:
                    bound = 1 / math.sqrt(w.shape[1])
                    nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"activation={self.activation.value}, recompute={self.recompute.value}, "
            f"bias=({self.in_bias is not None}, "
            f"{self.out_bias is not None}), layout={self.layout}"
            + (f", hidden_dropout={self.hidden_dropout}" if self.hidden_dropout else "")
        )

    def source_grads(self) -> dict[str, Tensor]:
        """The parameters' .grad under the replaced module's names (for comparing with it)."""
        return source_named_tensors(self, {n: p.grad for n, p in self.named_parameters()})

    @classmethod
    def from_module(
        cls,
        mlp: nn.Module,
        *,
        activation: str | Activation | None = None,
        layout: StateLayout | None = None,
        recompute: str | Recompute = Recompute.ACTIVATION,
        hidden_dropout: float = 0.0,
    ) -> _FusedMLPBase:
        """A fused module holding ``mlp``'s current weights (same device and dtype).

        ``mlp`` has children named like gate_proj/up_proj/down_proj (gated) or fc1/fc2 (plain);
        pass ``layout`` for other names. The activation is read from an attribute such as
        ``act_fn`` unless given. ``recompute``: what training saves for the backward
        (:class:`Recompute`). ``hidden_dropout``: nn.Dropout's p for h, in training mode (what a
        dropout between the activation and the output projection does). The result's
        state_dict equals ``mlp``'s.
        """
        layout = layout or cls._find_layout(mlp)
        children = [mlp.get_submodule(n) for n in (*layout.inputs, layout.output)]
        params = [linear_params(c) for c in children]
        transposed = {t for _, _, t in params}
        if len(transposed) != 1:
            raise ValueError(f"{type(mlp).__name__}: mixes nn.Linear and Conv1D projections")
        layout = dataclasses.replace(layout, transposed=transposed.pop())
        ins, (w_out, b_out, _) = params[:-1], params[-1]
        in_biases = {b is not None for _, b, _ in ins}
        if len(in_biases) != 1:
            raise ValueError(f"{type(mlp).__name__}: some input projections have a bias and some do not")
        w_in = torch.cat([w for w, _, _ in ins]) if len(ins) > 1 else ins[0][0]
        rows = w_in.shape[0]
        if cls.GATED and rows % 2:
            raise ValueError(f"{type(mlp).__name__}: gate|up projection has an odd number of rows ({rows})")
        inter = rows // 2 if cls.GATED else rows
        if w_out.shape[1] != inter or (cls.GATED and len(ins) == 2 and ins[0][0].shape != ins[1][0].shape):
            raise ValueError(
                f"{type(mlp).__name__}: projection shapes do not chain: "
                f"{[tuple(w.shape) for w, _, _ in params]}"
            )
        act = activation if activation is not None else find_activation(mlp)
        fused = cls(
            w_in.shape[1],
            inter,
            act,
            bias=(in_biases.pop(), b_out is not None),
            device=w_in.device,
            dtype=w_in.dtype,
            layout=layout,
            out_features=w_out.shape[0],
            recompute=recompute,
            hidden_dropout=hidden_dropout,
        )
        with torch.no_grad():
            fused.in_weight.copy_(w_in.view(fused.in_weight.shape))
            fused.out_weight.copy_(w_out)
            if fused.in_bias is not None:
                b_in = torch.cat([b for _, b, _ in ins])  # type: ignore[misc]
                fused.in_bias.copy_(b_in.view(fused.in_bias.shape))
            if fused.out_bias is not None and b_out is not None:
                fused.out_bias.copy_(b_out)
        return fused

    @classmethod
    def _find_layout(cls, mlp: nn.Module) -> StateLayout:
        names = dict(mlp.named_children())
        for inputs, output in cls._KNOWN_NAMES:
            if all(n in names for n in (*inputs, output)):
                return StateLayout(inputs, output)
        known = "; ".join("/".join((*i, o)) for i, o in cls._KNOWN_NAMES)
        raise ValueError(
            f"{type(mlp).__name__} has children {sorted(names)}; expected one of: {known} "
            "(or pass layout=StateLayout(...))"
        )


class FusedGatedMLP(_FusedMLPBase):
    """y = down(act(gate(x)) * up(x)), gate and up stored as ONE merged [2H, D] weight.

    Parameters: ``in_weight`` [2H, D] (gate rows, then up rows), ``in_bias`` [2H] (optional),
    ``out_weight`` [D, H], ``out_bias`` [D] (optional). The state_dict shows them under the
    replaced module's names (by default gate_proj/up_proj/down_proj).
    """

    GATED = True
    DEFAULT_LAYOUT = StateLayout(("gate_proj", "up_proj"), "down_proj")
    _KNOWN_NAMES = GATED_LAYOUTS

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Activation = "silu",
        bias: bool | tuple[bool, bool] = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        layout: StateLayout | None = None,
        out_features: int | None = None,
        recompute: str | Recompute = Recompute.ACTIVATION,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            hidden_size, intermediate_size, activation, bias, device, dtype, layout, out_features, recompute,
            hidden_dropout,
        )



class FusedMLP(_FusedMLPBase):
    """y = fc2(act(fc1(x))) (GPT-2 / BERT / ViT style).

    Parameters: ``in_weight`` [H, D], ``in_bias`` [H], ``out_weight`` [D, H], ``out_bias`` [D];
    the state_dict shows them under the replaced module's names (by default fc1/fc2).
    """

    GATED = False
    DEFAULT_LAYOUT = StateLayout(("fc1",), "fc2")
    _KNOWN_NAMES = PLAIN_LAYOUTS

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Activation = "gelu",
        bias: bool | tuple[bool, bool] = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        layout: StateLayout | None = None,
        out_features: int | None = None,
        recompute: str | Recompute = Recompute.ACTIVATION,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            hidden_size, intermediate_size, activation, bias, device, dtype, layout, out_features, recompute,
            hidden_dropout,
        )



class FusedLinearAct(_OneInput):
    """y = act(proj(x)): a lone projection and its activation (BERT/ViT "intermediate").

    Holds the original projection (nn.Linear or Conv1D) under its original child name, so the
    state_dict is unchanged (``dense.weight``, ``dense.bias``) and no weight is copied; the
    activation runs as the fused op. It is what ``fuse`` uses when the second projection of an
    MLP lives elsewhere (BERT's "output" module adds a residual and a LayerNorm after it). The
    projection's GEMM and the activation run as ONE kernel launch (the GEMM with the activation
    in its epilogue), forward and, in training, a backward of one pointwise kernel and two GEMMs.
    """

    def __init__(self, proj: nn.Module, activation: str | Activation, name: str = "proj") -> None:
        super().__init__()
        weight, _, _ = linear_params(proj)
        if not name or "." in name:
            raise ValueError(f"FusedLinearAct needs a non-empty child name without dots, got {name!r}")
        self.proj_name = name
        self._param_names = (f"{name}.weight", f"{name}.bias")
        self.add_module(name, proj)
        self.activation = resolve(activation)
        self.out_features = weight.shape[0]

    def extra_repr(self) -> str:
        return f"activation={self.activation.value}"

    def forward(self, x: Tensor | None = None, **named: Tensor) -> Tensor:
        if named or x is None:
            x = self._input(x, named)
        weight, bias, _ = linear_params(self._modules[self.proj_name])  # type: ignore[arg-type]
        functional.check_linear(x, weight, bias, self._param_names)
        return functional.run_linear_act(x, weight, bias, self.activation)

    @classmethod
    def from_module(
        cls, block: nn.Module, *, name: str, activation: str | Activation | None = None
    ) -> FusedLinearAct:
        """Wrap ``block``'s child ``name`` (shared, not copied) and its activation."""
        act = activation if activation is not None else find_activation(block)
        return cls(block.get_submodule(name), act, name)


class _OutputDropout(nn.Module):
    """Mixin: applies the replaced block's own output dropout (GPT-2's MLP ends in one) after the
    fused computation, so fusing does not change training. The dropout has no state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropout: nn.Module = nn.Identity()

    def forward(self, x: Tensor | None = None, **named: Tensor) -> Tensor:
        return self.dropout(super().forward(x, **named))


class FusedGatedMLPWithDropout(_OutputDropout, FusedGatedMLP):
    pass


class FusedMLPWithDropout(_OutputDropout, FusedMLP):
    pass


class FusedLinearActWithDropout(_OutputDropout, FusedLinearAct):
    pass


WITH_OUTPUT_DROPOUT: dict[type[nn.Module], type[nn.Module]] = {
    FusedGatedMLP: FusedGatedMLPWithDropout,
    FusedMLP: FusedMLPWithDropout,
    FusedLinearAct: FusedLinearActWithDropout,
}
