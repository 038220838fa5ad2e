"""How a fused module presents the state_dict of the module it replaced.

A fused module owns ONE merged input-projection weight (gate|up for the gated MLP), which is what
the kernels want, and shows it under the replaced module's keys, in its order, with its values
(``gate_proj.weight``, ``up_proj.weight``, ...; or ``c_fc.weight`` stored [in, out] for GPT-2's
Conv1D). :class:`StateLayout` records those names; the two hooks rename on save and load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..families import is_conv1d

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed
    DTensor = distribute_tensor = None  # type: ignore[assignment,misc]


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


def linear_params(child: nn.Module) -> tuple[Tensor, Tensor | None, bool]:
    """(weight as [out, in], bias, transposed) of an nn.Linear or a Hugging Face Conv1D."""
    weight = getattr(child, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(child).__name__} has no 2-D weight; expected nn.Linear or Conv1D")
    bias = getattr(child, "bias", None)
    if is_conv1d(child):  # transformers.pytorch_utils.Conv1D: weight is [in, out]
        return weight.t(), bias, True
    return weight, bias, False


class HasLayout(Protocol):
    layout: StateLayout


def _own_keys(module: HasLayout, prefix: str) -> tuple[tuple[str, str, tuple[str, ...], bool], ...]:
    """(own key, suffix, external child names, whether the input projection) for the in and out
    projections' weight and bias."""
    lay = module.layout
    return tuple(
        (f"{prefix}{part}_{suffix}", suffix, names, part == "in")
        for part, names in (("in", lay.inputs), ("out", (lay.output,)))
        for suffix in ("weight", "bias")
    )


def _split(module: nn.Module, t: Tensor, n: int) -> tuple[Tensor, ...]:
    """A fused input tensor as its ``n`` source tensors, as views: a gated module's [2, H, ...]
    gate|up as (gate, up), or merged into [2H, ...] for a one-name (gate_up_proj) layout."""
    if not getattr(module, "GATED", False):
        return (t,)
    return tuple(t.unbind(0)) if n == 2 else (t.flatten(0, 1),)


def _join(module: nn.Module, parts: list[Tensor]) -> Tensor:
    """The inverse of :func:`_split`."""
    if not getattr(module, "GATED", False):
        return parts[0]
    return torch.stack(parts) if len(parts) == 2 else parts[0].unflatten(0, (2, -1))


def save_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Rename (and split) the fused tensors into the replaced module's keys, in its key order.
    The pieces are views of the parameters (no copy, no collective on a sharded parameter; an
    in-place load into them, as torch.distributed.checkpoint does, lands in the module), except
    Conv1D's transposed weights, which are stored [in, out] and so copied."""
    pieces: dict[str, dict[str, Tensor]] = {}
    for key, suffix, names, is_input in _own_keys(module, prefix):  # type: ignore[arg-type]
        if key not in state_dict:
            continue
        t = state_dict.pop(key)
        for name, piece in zip(names, _split(module, t, len(names)) if is_input else (t,), strict=True):
            if module.layout.transposed and suffix == "weight":  # type: ignore[union-attr]
                piece = piece.t().contiguous()
            pieces.setdefault(name, {})[suffix] = piece
    for name, by_suffix in pieces.items():
        for suffix in ("weight", "bias"):
            if suffix in by_suffix:
                state_dict[f"{prefix}{name}.{suffix}"] = by_suffix[suffix]


def load_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """The inverse of the save hook: merge the replaced module's keys into the fused tensors."""
    for key, suffix, names, is_input in _own_keys(module, prefix):  # type: ignore[arg-type]
        ext = [f"{prefix}{n}.{suffix}" for n in names]
        if not all(k in state_dict for k in ext):
            continue
        parts = [state_dict.pop(k) for k in ext]
        if module.layout.transposed and suffix == "weight":  # type: ignore[union-attr]
            parts = [p.t() for p in parts]
        value = _join(module, parts) if is_input else parts[0]
        state_dict[key] = _placed_like(module._parameters.get(key[len(prefix):]), value)


def _placed_like(param: Tensor | None, value: Tensor) -> Tensor:
    """``value`` for a sharded (DTensor) parameter: a full plain tensor (a full state_dict, as
    Hugging Face checkpoints and ``set_model_state_dict(full_state_dict=True)`` hand it over)
    is sharded like the parameter from each rank's own copy, without communication."""
    if DTensor is None or not isinstance(param, DTensor) or isinstance(value, DTensor):
        return value
    if tuple(value.shape) != tuple(param.shape):
        return value  # load_state_dict reports the size mismatch
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def source_named_tensors(module: nn.Module, tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """Tensors keyed by a fused module's parameter names (``in_weight``, ...) renamed and split to
    the replaced module's names (``gate_proj.weight``, ...), as the state_dict shows them."""
    out = {k: v for k, v in tensors.items() if v is not None}
    save_state_dict_hook(module, out, "", None)
    return out
