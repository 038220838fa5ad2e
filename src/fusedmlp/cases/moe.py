"""Mixture-of-experts layer cases, built the same way for ``fusedmlp bench --moe`` and ``fusedmlp
profile --moe``: the experts of a Hugging Face MoE block (transformers' experts class of the
model, random weights), fed a fixed routing, every variant holding the same weights.

- ``floor``: the two grouped GEMMs alone through ``torch._grouped_mm`` (tokens already gathered
  and sorted by expert, the activation free, the down projection over a fixed random h): what
  no grouped implementation can beat by much;
- ``hf``: Hugging Face's experts module as the model runs it (its default experts
  implementation); ``hf-eager``: its "eager" implementation, the Python loop over experts;
- ``compile``: torch.compile of the ``hf-eager`` module;
- ``fusedmlp``: :class:`~fusedmlp.modules.FusedGatedExperts` made from the ``hf`` module.

Routing: ``balanced`` (random top-k) or ``skewed`` (one expert takes half the tokens, the last
quarter of the experts none), fixed by a seed.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import Tensor, nn

from ..modules.experts import FusedGatedExperts
from .variants import Variant

MOE_VARIANTS = ("floor", "hf", "hf-eager", "compile", "fusedmlp")
MOE_PROFILE_VARIANTS = ("hf", "compile", "fusedmlp")  # what a profile shows by default
ROUTINGS = ("balanced", "skewed")

# transformers' experts class of each model type the presets use
_EXPERTS_CLASSES = {"qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts", "gpt_oss": "GptOssExperts"}


@dataclasses.dataclass(frozen=True)
class MoEPreset:
    """One MoE layer: ``tokens`` tokens of width ``hidden``, each routed to ``top_k`` of
    ``experts`` gated MLPs of width ``expert_width``; ``model_type``: whose experts class."""

    name: str
    model_type: str
    hidden: int
    expert_width: int
    experts: int
    top_k: int
    tokens: int
    description: str = ""

    def __post_init__(self) -> None:
        if min(self.hidden, self.expert_width, self.experts, self.top_k, self.tokens) <= 0:
            raise ValueError(f"MoE preset {self.name}: sizes must be positive")
        if self.top_k > self.experts:
            raise ValueError(f"MoE preset {self.name}: top_k {self.top_k} > {self.experts} experts")
        if self.model_type not in _EXPERTS_CLASSES:
            raise ValueError(
                f"MoE preset {self.name}: model type {self.model_type!r} not one of "
                f"{', '.join(_EXPERTS_CLASSES)}"
            )

    @property
    def flops(self) -> int:
        """Forward FLOPs of the experts: 2 * (tokens * top_k) * (D * 2H + H * D)."""
        return 6 * self.tokens * self.top_k * self.hidden * self.expert_width

    def with_tokens(self, tokens: int) -> MoEPreset:
        return dataclasses.replace(self, tokens=tokens)


MOE_PRESETS = {
    p.name: p
    for p in (
        MoEPreset("qwen3-30b-a3b", "qwen3_moe", 2048, 768, 128, 8, 8192, "Qwen3-30B-A3B experts"),
        MoEPreset("mixtral-8x7b", "mixtral", 4096, 14336, 8, 2, 8192, "Mixtral-8x7B experts"),
        MoEPreset(
            "gpt-oss-20b", "gpt_oss", 2880, 2880, 32, 4, 8192, "gpt-oss-20b experts (biases, clamped SwiGLU)"
        ),
        MoEPreset("moe-tiny", "qwen3_moe", 64, 32, 8, 2, 48, "tiny Qwen3-MoE experts, for a CPU"),
    )
}


def get_moe_preset(name: str) -> MoEPreset:
    try:
        return MOE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown MoE preset {name!r}; choose from {', '.join(MOE_PRESETS)}") from None


def hf_experts(
    p: MoEPreset, implementation: str | None, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """transformers' experts module of ``p`` (``implementation``: its experts implementation,
    None for the default), weights N(0, 0.02) from a fixed seed."""
    from transformers import AutoConfig

    overrides = {"hidden_size": p.hidden, "num_experts_per_tok": p.top_k}
    if p.model_type == "qwen3_moe":
        overrides |= {"moe_intermediate_size": p.expert_width, "num_experts": p.experts}
    else:
        overrides |= {"intermediate_size": p.expert_width, "num_local_experts": p.experts}
    config = AutoConfig.for_model(p.model_type, **overrides)
    if implementation is not None:
        config._experts_implementation = implementation
    module = importlib.import_module(f"transformers.models.{p.model_type}.modeling_{p.model_type}")
    experts = getattr(module, _EXPERTS_CLASSES[p.model_type])(config).to(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for t in experts.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return experts


def routing(p: MoEPreset, kind: str, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(top_k_index [T, k], top_k_weights [T, k]) of a ``balanced`` or ``skewed`` routing."""
    if kind not in ROUTINGS:
        raise ValueError(f"unknown routing {kind!r}; choose from {', '.join(ROUTINGS)}")
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = torch.rand(p.tokens, p.experts, generator=g)
    if kind == "skewed":  # one expert takes half the tokens; the last quarter of the experts get none
        scores[: p.tokens // 2, 0] = 2.0
        scores[:, p.experts - max(1, p.experts // 4) :] = -1.0
    index = scores.topk(p.top_k, dim=1).indices
    weights = torch.softmax(torch.randn(p.tokens, p.top_k, generator=g), -1)
    return index.to(device), weights.to(device, dtype)


class Routed(nn.Module):
    """An experts module called on x alone, with a fixed routing."""

    def __init__(self, experts: nn.Module, index: Tensor, weights: Tensor) -> None:
        super().__init__()
        self.experts, self.index, self.weights = experts, index, weights

    def forward(self, x: Tensor) -> Tensor:
        return self.experts(x, self.index, self.weights)


class GroupedMMFloor(nn.Module):
    """The two grouped GEMMs alone: gathered, sorted x times each expert's gate|up, and a fixed
    random h times each expert's down projection (biases and the activation free)."""

    def __init__(self, fused: FusedGatedExperts, index: Tensor, x: Tensor) -> None:
        super().__init__()
        E, _, H, D = fused.gate_up.shape
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        self.offs = counts.cumsum(0).to(torch.int32)
        self.xs = x[order // index.shape[1]].detach()
        self.w_gu = fused.gate_up.detach().reshape(E, 2 * H, D)
        self.w_down = fused.down.detach()
        g = torch.Generator().manual_seed(3)  # the CPU's: see bench/run.py measure
        self.h = torch.randn(self.xs.shape[0], H, generator=g).to(x.device, x.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        gate_up = torch._grouped_mm(self.xs, self.w_gu.transpose(1, 2), offs=self.offs)
        return gate_up, torch._grouped_mm(self.h, self.w_down.transpose(1, 2), offs=self.offs)


def build(
    p: MoEPreset,
    names: list[str] | tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    kind: str = "balanced",
) -> tuple[list[Variant], Tensor]:
    """The requested variants of ``p`` under the ``kind`` routing, and the input x [T, D]."""
    unknown = [n for n in names if n not in MOE_VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown MoE variant(s) {', '.join(unknown)}; choose from {', '.join(MOE_VARIANTS)}"
        )
    try:
        hf = hf_experts(p, None, device, dtype)
    except ImportError:
        raise ValueError("the MoE presets need transformers (pip install 'fusedmlp[hf]')") from None
    index, weights = routing(p, kind, device, dtype)
    x = torch.randn(p.tokens, p.hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    fused = FusedGatedExperts.from_module(hf)
    out = []
    for name in names:
        if name == "floor":
            if not hasattr(torch, "_grouped_mm"):
                out.append(Variant(name, None, "skipped: this torch has no torch._grouped_mm"))
                continue
            out.append(Variant(name, GroupedMMFloor(fused, index, x), "2 x torch._grouped_mm, no activation"))
        elif name == "hf":
            out.append(
                Variant(name, Routed(hf, index, weights), f"{type(hf).__name__}, default implementation")
            )
        elif name in ("hf-eager", "compile"):
            eager = hf_experts(p, "eager", device, dtype)
            routed = Routed(eager, index, weights)
            if name == "compile":
                out.append(
                    Variant(name, torch.compile(routed), "torch.compile of the eager loop over experts")
                )
            else:
                out.append(Variant(name, routed, f"{type(eager).__name__}, loop over experts"))
        else:
            out.append(
                Variant(name, Routed(fused, index, weights), f"FusedGatedExperts({fused.extra_repr()})")
            )
    return out, x


def reference(p: MoEPreset, x: Tensor, kind: str) -> Tensor:
    """The experts' output in float64 (the hf-eager loop) from the variants' weights and routing
    weights, rounded to x's dtype as theirs are: the numerics contract's reference."""
    m = hf_experts(p, "eager", x.device, x.dtype).double()
    index, weights = routing(p, kind, x.device, x.dtype)
    with torch.no_grad():
        return m(x.double(), index, weights.double())
