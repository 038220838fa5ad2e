"""Named MLP shapes: the cases the anchors were measured on (../shared/anchors/README.md)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..activations import Activation, module_for, resolve
from ..modules import FusedGatedMLP, FusedMLP, FusedSequentialMLP
from ..reference import MLP, GatedMLP


@dataclasses.dataclass(frozen=True)
class Preset:
    """One MLP case: ``tokens`` rows of width ``hidden`` through an MLP of width ``intermediate``."""

    name: str
    tokens: int
    hidden: int
    intermediate: int
    activation: Activation
    gated: bool
    bias: bool
    description: str = ""
    # Linear layers: 2 for an MLP; 1 for a single Linear (hidden -> intermediate); more for a narrow
    # stack hidden -> intermediate x (layers - 1) -> out_features with the activation between.
    layers: int = 2
    out_features: int | None = None

    def __post_init__(self) -> None:
        if min(self.tokens, self.hidden, self.intermediate, self.layers) <= 0:
            raise ValueError(f"preset {self.name}: sizes must be positive")
        if self.gated and self.layers != 2:
            raise ValueError(f"preset {self.name}: a gated preset has 2 layers (gate|up, down)")

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of each projection, in forward order (gate, up, down; ...)."""
        d, h = self.hidden, self.intermediate
        if self.layers == 1:
            return [(d, h)]
        if self.gated:
            return [(d, h), (d, h), (h, d)]
        return [(d, h)] + [(h, h)] * (self.layers - 2) + [(h, self.out_features or d)]

    @property
    def flops(self) -> int:
        """Forward FLOPs: 2*M*in*out per projection."""
        return sum(2 * self.tokens * i * o for i, o in self.linear_shapes())

    def eager(self, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
        kw = {"device": device, "dtype": dtype}
        if self.layers == 1:
            return nn.Linear(self.hidden, self.intermediate, bias=self.bias, **kw)
        if self.layers > 2:
            shapes = self.linear_shapes()
            mods: list[nn.Module] = []
            for n, (i, o) in enumerate(shapes):
                mods.append(nn.Linear(i, o, bias=self.bias, **kw))
                if n < len(shapes) - 1:
                    mods.append(_act_module(self.activation))
            return nn.Sequential(*mods)
        cls = GatedMLP if self.gated else MLP
        return cls(self.hidden, self.intermediate, self.activation, bias=self.bias, **kw)

    def fused(self, eager: nn.Module) -> nn.Module:
        if self.layers == 1:
            raise ValueError(f"preset {self.name}: a single Linear has nothing to fuse")
        if self.layers > 2:
            return FusedSequentialMLP.from_module(eager)  # type: ignore[arg-type]
        return (FusedGatedMLP if self.gated else FusedMLP).from_module(eager)

    def input(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(self.tokens, self.hidden, device=device, dtype=dtype)

    def with_tokens(self, tokens: int) -> Preset:
        return dataclasses.replace(self, name=f"{self.name}@M={tokens}", tokens=tokens)


def _act_module(activation: Activation) -> nn.Module:
    """The torch module of an activation where one exists (what users put in nn.Sequential)."""
    return module_for(activation) or _Act(activation)


class _Act(nn.Module):
    """An activation torch has no module for (relu2), for nn.Sequential stacks."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x)


def _p(name: str, m: int, d: int, h: int, act: str, gated: bool, bias: bool, desc: str, **kw: int) -> Preset:
    return Preset(name, m, d, h, resolve(act), gated, bias, desc, **kw)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _p(
            "geglu-article",
            8192,
            768,
            3072,
            "gelu_tanh",
            True,
            False,
            "the article's GeGLU MLP: batch 64 x seq 128, 768 -> 3072",
        ),
        _p(
            "llama3-8b",
            4096,
            4096,
            14336,
            "silu",
            True,
            False,
            "Llama-3-8B SwiGLU MLP, prefill of 4096 tokens",
        ),
        _p(
            "llama3-8b-decode",
            1,
            4096,
            14336,
            "silu",
            True,
            False,
            "Llama-3-8B SwiGLU MLP, decode (M=1; M=16)",
        ),
        _p(
            "gpt2",
            8192,
            768,
            3072,
            "gelu_tanh",
            False,
            True,
            "GPT-2 MLP: Linear+bias, GELU(tanh), Linear+bias",
        ),
        _p(
            "narrow-mlp",
            2**20,
            32,
            64,
            "relu",
            False,
            True,
            "a narrow MLP (implicit networks, heads): 32 -> 64 x8 -> 16, ReLU",
            layers=9,
            out_features=16,
        ),
        _p("linear-bias", 8192, 768, 3072, "identity", False, True, "a single nn.Linear with bias", layers=1),
        _p("cpu-small", 256, 128, 512, "gelu_tanh", True, False, "a small GeGLU MLP for CPU-only machines"),
    )
}

# M values each preset is run at by default (decode is two cases).
PRESET_TOKENS: dict[str, tuple[int, ...]] = {"llama3-8b-decode": (1, 16)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def default_preset() -> Preset:
    """The article's preset on a GPU; a small one that finishes in seconds on a CPU."""
    return PRESETS["geglu-article" if torch.cuda.is_available() else "cpu-small"]
