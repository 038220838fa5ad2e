"""Named MLP shapes: the cases the anchors were measured on (../shared/anchors/README.md)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..activations import Activation, resolve
from ..modules import FusedGatedMLP, FusedMLP
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

    def __post_init__(self) -> None:
        if min(self.tokens, self.hidden, self.intermediate) <= 0:
            raise ValueError(f"preset {self.name}: sizes must be positive")

    @property
    def flops(self) -> int:
        """Forward FLOPs: 2*M*D*H per projection (3 for gated, 2 for plain)."""
        return 2 * self.tokens * self.hidden * self.intermediate * (3 if self.gated else 2)

    def eager(self, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
        cls = GatedMLP if self.gated else MLP
        return cls(
            self.hidden, self.intermediate, self.activation, bias=self.bias, device=device, dtype=dtype
        )

    def fused(self, eager: nn.Module) -> nn.Module:
        return (FusedGatedMLP if self.gated else FusedMLP).from_module(eager)

    def input(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(self.tokens, self.hidden, device=device, dtype=dtype)

    def with_tokens(self, tokens: int) -> Preset:
        return dataclasses.replace(self, name=f"{self.name}@M={tokens}", tokens=tokens)


def _p(name: str, m: int, d: int, h: int, act: str, gated: bool, bias: bool, desc: str) -> Preset:
    return Preset(name, m, d, h, resolve(act), gated, bias, desc)


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
