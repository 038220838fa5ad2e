"""Drop-in nn.Modules: FusedGatedMLP (Llama/Gemma style) and FusedMLP (GPT-2/BERT/ViT style).

A fused module owns ONE merged input-projection weight (gate|up for the gated MLP), which is
what the kernels want, and presents the state_dict of the module it replaced: the same keys,
in the same order, with the same values (``gate_proj.weight``, ``up_proj.weight``, ...; or
``c_fc.weight`` stored [in, out] for GPT-2's Conv1D). ``StateLayout`` records those names.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import functional
from .activations import Activation, activation_of, resolve
from .ops import Recompute, resolve_recompute


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a fused module's tensors are named in its state_dict.

    ``inputs``: the child names the input-projection rows split into, in order
    (("gate_proj", "up_proj"), or ("gate_up_proj",) when already merged, or ("fc1",)).
    ``output``: the output projection's child name. ``transposed``: weights are stored
    [in_features, out_features] (Hugging Face Conv1D, as in GPT-2).
    """

    inputs: tuple[str, ...]
    output: str
    transposed: bool = False

    def __post_init__(self) -> None:
        names = (*self.inputs, self.output)
        if not self.inputs or len(set(names)) != len(names) or not all(n and "." not in n for n in names):
            raise ValueError(f"StateLayout needs distinct, non-empty child names without dots, got {names}")


# Child names of common MLPs, for from_module: (input projections in row order, output projection).
_GATED_NAMES = (
    (("gate_proj", "up_proj"), "down_proj"),  # Llama, Mistral, Qwen, Gemma
    (("w1", "w3"), "w2"),  # gpt-fast, Mixtral experts
    (("gate_up_proj",), "down_proj"),  # Phi-3: already merged
)
_PLAIN_NAMES = (
    (("fc1",), "fc2"),  # ViT (timm), CLIP, OPT
    (("c_fc",), "c_proj"),  # GPT-2 (Conv1D)
    (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX, Falcon
    (("lin1",), "lin2"),  # DistilBERT
    (("linear1",), "linear2"),
)
_ACT_ATTRS = ("act_fn", "act", "activation", "activation_fn", "act_layer", "hidden_act", "nonlinearity")


def _linear_params(child: nn.Module) -> tuple[Tensor, Tensor | None, bool]:
    """(weight as [out, in], bias, transposed) of an nn.Linear or a Hugging Face Conv1D."""
    weight = getattr(child, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(child).__name__} has no 2-D weight; expected nn.Linear or Conv1D")
    bias = getattr(child, "bias", None)
    if type(child).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is [in, out]
        return weight.t(), bias, True
    return weight, bias, False


class _FusedMLPBase(nn.Module):
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
    ) -> None:
        super().__init__()
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
        in_rows = intermediate_size * (2 if self.GATED else 1)
        self.in_weight = nn.Parameter(torch.empty(in_rows, hidden_size, **kw))
        self.in_bias = nn.Parameter(torch.empty(in_rows, **kw)) if in_bias else None
        self.out_weight = nn.Parameter(torch.empty(self.out_features, intermediate_size, **kw))
        self.out_bias = nn.Parameter(torch.empty(self.out_features, **kw)) if out_bias else None
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_hook)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, applied to each projection."""
        for w, b in ((self.in_weight, self.in_bias), (self.out_weight, self.out_bias)):
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
        )

    def source_named_tensors(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
        """Tensors keyed by this module's parameter names (``in_weight``, ...) renamed and split
        to the replaced module's names (``gate_proj.weight``, ...), as the state_dict shows them."""
        out = {k: v for k, v in tensors.items() if v is not None}
        _save_state_dict_hook(self, out, "", None)
        return out

    def source_grads(self) -> dict[str, Tensor]:
        """The parameters' .grad under the replaced module's names (for comparing with it)."""
        return self.source_named_tensors({n: p.grad for n, p in self.named_parameters()})

    @classmethod
    def from_module(
        cls,
        mlp: nn.Module,
        *,
        activation: str | Activation | None = None,
        layout: StateLayout | None = None,
        recompute: str | Recompute = Recompute.ACTIVATION,
    ) -> _FusedMLPBase:
        """A fused module holding ``mlp``'s current weights (same device and dtype).

        ``mlp`` has children named like gate_proj/up_proj/down_proj (gated) or fc1/fc2 (plain);
        pass ``layout`` for other names. The activation is read from an attribute such as
        ``act_fn`` unless given. ``recompute``: what training saves for the backward
        (:class:`Recompute`). The result's state_dict equals ``mlp``'s.
        """
        layout = layout or cls._find_layout(mlp)
        children = [mlp.get_submodule(n) for n in (*layout.inputs, layout.output)]
        params = [_linear_params(c) for c in children]
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
        act = activation if activation is not None else _find_activation(mlp)
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
        )
        with torch.no_grad():
            fused.in_weight.copy_(w_in)
            fused.out_weight.copy_(w_out)
            if fused.in_bias is not None:
                fused.in_bias.copy_(torch.cat([b for _, b, _ in ins]))  # type: ignore[misc]
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


def _find_activation(mlp: nn.Module) -> Activation:
    for attr in _ACT_ATTRS:
        act = activation_of(getattr(mlp, attr, None))
        if act is not None:
            return act
    config = getattr(mlp, "config", None)
    act = activation_of(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None))
    if act is not None:
        return act
    raise ValueError(f"cannot tell which activation {type(mlp).__name__} uses; pass activation=...")


def _own_keys(module: _FusedMLPBase, prefix: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(own key, suffix, external child names) for the in and out projections' weight and bias."""
    lay = module.layout
    return tuple(
        (f"{prefix}{part}_{suffix}", suffix, names)
        for part, names in (("in", lay.inputs), ("out", (lay.output,)))
        for suffix in ("weight", "bias")
    )


def _save_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Rename (and split) the fused tensors into the replaced module's keys, in its key order."""
    assert isinstance(module, _FusedMLPBase)
    pieces: dict[str, dict[str, Tensor]] = {}
    for key, suffix, names in _own_keys(module, prefix):
        if key not in state_dict:
            continue
        t = state_dict.pop(key)
        for name, piece in zip(names, t.chunk(len(names)), strict=True):
            if module.layout.transposed and suffix == "weight":
                piece = piece.t().contiguous()
            elif len(names) > 1:
                piece = piece.clone()  # its own storage: safetensors refuses tensors that share one
            pieces.setdefault(name, {})[suffix] = piece
    for name, by_suffix in pieces.items():
        for suffix in ("weight", "bias"):
            if suffix in by_suffix:
                state_dict[f"{prefix}{name}.{suffix}"] = by_suffix[suffix]


def _load_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """The inverse of the save hook: merge the replaced module's keys into the fused tensors."""
    assert isinstance(module, _FusedMLPBase)
    for key, suffix, names in _own_keys(module, prefix):
        ext = [f"{prefix}{n}.{suffix}" for n in names]
        if not all(k in state_dict for k in ext):
            continue
        parts = [state_dict.pop(k) for k in ext]
        if module.layout.transposed and suffix == "weight":
            parts = [p.t() for p in parts]
        state_dict[key] = torch.cat(parts) if len(parts) > 1 else parts[0]


class FusedGatedMLP(_FusedMLPBase):
    """y = down(act(gate(x)) * up(x)), gate and up stored as ONE merged [2H, D] weight.

    Parameters: ``in_weight`` [2H, D] (gate rows, then up rows), ``in_bias`` [2H] (optional),
    ``out_weight`` [D, H], ``out_bias`` [D] (optional). The state_dict shows them under the
    replaced module's names (by default gate_proj/up_proj/down_proj).
    """

    GATED = True
    DEFAULT_LAYOUT = StateLayout(("gate_proj", "up_proj"), "down_proj")
    _KNOWN_NAMES = _GATED_NAMES

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
    ) -> None:
        super().__init__(
            hidden_size, intermediate_size, activation, bias, device, dtype, layout, out_features, recompute
        )

    def forward(self, x: Tensor) -> Tensor:
        return functional.gated_mlp(
            x, self.in_weight, self.in_bias, self.out_weight, self.out_bias, self.activation, self.recompute
        )


class FusedMLP(_FusedMLPBase):
    """y = fc2(act(fc1(x))) (GPT-2 / BERT / ViT style).

    Parameters: ``in_weight`` [H, D], ``in_bias`` [H], ``out_weight`` [D, H], ``out_bias`` [D];
    the state_dict shows them under the replaced module's names (by default fc1/fc2).
    """

    GATED = False
    DEFAULT_LAYOUT = StateLayout(("fc1",), "fc2")
    _KNOWN_NAMES = _PLAIN_NAMES

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
    ) -> None:
        super().__init__(
            hidden_size, intermediate_size, activation, bias, device, dtype, layout, out_features, recompute
        )

    def forward(self, x: Tensor) -> Tensor:
        return functional.mlp(
            x, self.in_weight, self.in_bias, self.out_weight, self.out_bias, self.activation, self.recompute
        )


class FusedLinearAct(nn.Module):
    """y = act(proj(x)): a lone projection and its activation (BERT/ViT "intermediate").

    Holds the original projection (nn.Linear or Conv1D) under its original child name, so the
    state_dict is unchanged (``dense.weight``, ``dense.bias``) and no weight is copied; the
    activation runs as the fused op. It is what ``fuse`` uses when the second projection of an
    MLP lives elsewhere (BERT's "output" module adds a residual and a LayerNorm after it).
    """

    def __init__(self, proj: nn.Module, activation: str | Activation, name: str = "proj") -> None:
        super().__init__()
        weight, _, _ = _linear_params(proj)
        if not name or "." in name:
            raise ValueError(f"FusedLinearAct needs a non-empty child name without dots, got {name!r}")
        self.proj_name = name
        self.add_module(name, proj)
        self.activation = resolve(activation)
        self.out_features = weight.shape[0]

    def extra_repr(self) -> str:
        return f"activation={self.activation.value}"

    def forward(self, x: Tensor) -> Tensor:
        return functional.act(getattr(self, self.proj_name)(x), self.activation)

    @classmethod
    def from_module(
        cls, block: nn.Module, *, name: str, activation: str | Activation | None = None
    ) -> FusedLinearAct:
        """Wrap ``block``'s child ``name`` (shared, not copied) and its activation."""
        act = activation if activation is not None else _find_activation(block)
        return cls(block.get_submodule(name), act, name)


# ---------------------------------------------------------------------------------------------
# FusedSequentialMLP: an nn.Sequential of narrow Linear layers and activations as one kernel
# ---------------------------------------------------------------------------------------------

# Exact types only: a subclass may override forward (LoRA, quantised Linears), which we cannot prove.
_SEQ_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Identity)


def _parse_sequential(seq: nn.Module) -> tuple[list[tuple[str, nn.Linear, Activation]], str | None]:
    """([(child name, Linear, its activation)], None) or ([], why the stack cannot be fused).

    An activation directly after a Linear belongs to it (nn.Identity anywhere is skipped); a Linear
    followed by another Linear gets the identity.
    """
    if not isinstance(seq, nn.Sequential):
        return [], f"{type(seq).__name__} is not an nn.Sequential"
    layers: list[tuple[str, nn.Linear, Activation]] = []
    for name, child in seq.named_children():
        where = f"layer {name} ({child})"
        if type(child) is nn.Linear:
            if max(child.in_features, child.out_features) > functional.NARROW_MAX_WIDTH:
                return [], (
                    f"{where}: width {max(child.in_features, child.out_features)} > "
                    f"{functional.NARROW_MAX_WIDTH}, the widest a narrow MLP keeps on chip"
                )
            if layers and child.in_features != layers[-1][1].out_features:
                return [], f"{where}: in_features {child.in_features} != previous out_features"
            first = layers[0][1].weight if layers else child.weight
            if child.weight.dtype != first.dtype or child.weight.device != first.device:
                return [], f"{where}: dtype/device differ from layer {layers[0][0]}'s"
            layers.append((name, child, Activation.IDENTITY))
        elif type(child) in _SEQ_ACTIVATIONS:
            act = activation_of(child)
            assert act is not None
            if act is Activation.IDENTITY:
                continue
            if not layers:
                return [], f"{where}: an activation before the first nn.Linear"
            if layers[-1][2] is not Activation.IDENTITY:
                return [], f"{where}: a second activation after layer {layers[-1][0]}"
            layers[-1] = (*layers[-1][:2], act)
        else:
            known = ", ".join(c.__name__ for c in (nn.Linear, *_SEQ_ACTIVATIONS))
            return [], f"{where}: unsupported module {type(child).__name__} (supported: {known})"
    if not layers:
        return [], "the nn.Sequential holds no nn.Linear"
    return layers, None


def can_fuse_sequential(seq: nn.Module) -> str | None:
    """None when :meth:`FusedSequentialMLP.from_module` accepts ``seq``, else the reason it does not."""
    return _parse_sequential(seq)[1]


class FusedSequentialMLP(nn.Module):
    """An nn.Sequential of nn.Linear layers (every width <= 256) and activations, run as ONE kernel.

    The Linear layers are kept as children under their Sequential indices, so ``state_dict`` keys
    and values are the Sequential's (``0.weight``, ``0.bias``, ``2.weight``, ...). The kernel wants
    the weights packed into one zero-padded [L, P, P] buffer: in training (gradients wanted) the
    packing is redone each call (one autograd node), so the gradients land on the
    per-layer parameters; otherwise the packed buffer (with the validated widths) is cached and
    reused until a parameter changes (its ``_version`` or storage), and a call checks only x.
    Writes through ``p.data`` bypass the version counter: call :meth:`invalidate_packed` after
    those.
    """

    def __init__(self, layers: list[tuple[str, nn.Linear, Activation]]) -> None:
        super().__init__()
        for name, linear, _ in layers:
            self.add_module(name, linear)
        self.activations = [act for _, _, act in layers]
        self._names = [name for name, _, _ in layers]
        self._packed: tuple[tuple[object, ...], tuple[Tensor, Tensor, list[int], str]] | None = None

    @classmethod
    def from_module(cls, seq: nn.Sequential) -> FusedSequentialMLP:
        """A fused copy of ``seq`` (its current weights, device and dtype); ValueError naming the
        first layer that cannot be fused and why."""
        layers, why = _parse_sequential(seq)
        if why is not None:
            raise ValueError(f"cannot fuse {type(seq).__name__}: {why}")
        return cls([(name, copy.deepcopy(linear), act) for name, linear, act in layers])

    @property
    def linears(self) -> list[nn.Linear]:
        return [self._modules[n] for n in self._names]  # type: ignore[misc]

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def extra_repr(self) -> str:
        return "activations=(" + ", ".join(a.value for a in self.activations) + ")"

    def invalidate_packed(self) -> None:
        self._packed = None

    def _packed_params(
        self, weights: list[Tensor], biases: list[Tensor | None], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[int], str]:
        """(w, b, widths, names) for the kernel, validated and packed once per parameter state."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._packed is None or self._packed[0] != key:
            widths, names = functional.narrow_spec(weights, biases, self.activations)
            first = weights[0]
            for name, m in zip(self._names, self.linears, strict=True):
                for kind, p in (("weight", m.weight), ("bias", m.bias)):
                    if p is not None and (p.dtype, p.device) != (first.dtype, first.device):
                        raise TypeError(
                            f"{name}.{kind} is {p.dtype} on {p.device} but {self._names[0]}.weight is "
                            f"{first.dtype} on {first.device}: the parameters must share one dtype and device"
                        )
            with torch.no_grad():
                w, b = functional.pack_narrow_mlp(weights, biases)
            self._packed = (key, (w, b, widths, names))
        return self._packed[1]

    def forward(self, x: Tensor) -> Tensor:
        linears = self.linears
        weights = [m.weight for m in linears]
        biases = [m.bias for m in linears]
        params = [p for p in (*weights, *biases) if p is not None]
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)
        ):
            # training (or tracing): pack per call, differentiably, so gradients reach each layer
            return functional.narrow_mlp(x, weights, biases, self.activations)
        # inference: the packed parameters are cached; only x is checked per call (host time)
        return functional.narrow_mlp_packed(x, *self._packed_params(weights, biases, params))
