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


def _own_keys(module: HasLayout, prefix: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(own key, suffix, external child names) for the in and out projections' weight and bias."""
    lay = module.layout
    return tuple(
        (f"{prefix}{part}_{suffix}", suffix, names)
        for part, names in (("in", lay.inputs), ("out", (lay.output,)))
        for suffix in ("weight", "bias")
    )


def save_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Rename (and split) the fused tensors into the replaced module's keys, in its key order."""
    pieces: dict[str, dict[str, Tensor]] = {}
    for key, suffix, names in _own_keys(module, prefix):  # type: ignore[arg-type]
        if key not in state_dict:
            continue
        t = state_dict.pop(key)
        for name, piece in zip(names, t.chunk(len(names)), strict=True):
            if module.layout.transposed and suffix == "weight":  # type: ignore[union-attr]
                piece = piece.t().contiguous()
            elif len(names) > 1:
                piece = piece.clone()  # its own storage: safetensors refuses tensors that share one
            pieces.setdefault(name, {})[suffix] = piece
    for name, by_suffix in pieces.items():
        for suffix in ("weight", "bias"):
            if suffix in by_suffix:
                state_dict[f"{prefix}{name}.{suffix}"] = by_suffix[suffix]


def load_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """The inverse of the save hook: merge the replaced module's keys into the fused tensors."""
    for key, suffix, names in _own_keys(module, prefix):  # type: ignore[arg-type]
        ext = [f"{prefix}{n}.{suffix}" for n in names]
        if not all(k in state_dict for k in ext):
            continue
        parts = [state_dict.pop(k) for k in ext]
        if module.layout.transposed and suffix == "weight":  # type: ignore[union-attr]
            parts = [p.t() for p in parts]
        state_dict[key] = torch.cat(parts) if len(parts) > 1 else parts[0]


def source_named_tensors(module: nn.Module, tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """Tensors keyed by a fused module's parameter names (``in_weight``, ...) renamed and split to
    the replaced module's names (``gate_proj.weight``, ...), as the state_dict shows them."""
    out = {k: v for k, v in tensors.items() if v is not None}
    save_state_dict_hook(module, out, "", None)
    return out
