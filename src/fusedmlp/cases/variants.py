"""The variants of one MLP case, built the same way for ``fusedmlp bench`` and ``fusedmlp
profile``: every variant holds the eager module's weights and takes the same input.

- ``floor``: the same GEMMs alone through cuBLAS (merged gate|up, or fc1 with its bias; the down
  projection over a fixed random h): what no fused implementation can beat by much;
- ``eager``: the eager module (reference.GatedMLP / MLP, or an nn.Sequential stack);
- ``eager-merged``: eager with gate and up merged into one GEMM, the activation left unfused;
- ``compile`` / ``compile-max-autotune``: torch.compile of the eager module;
- ``liger``: Liger-Kernel's LigerSwiGLUMLP / LigerGEGLUMLP (CUDA, bias-free SwiGLU and GeGLU(tanh));
- ``fusedmlp`` and ``fusedmlp-none`` / ``fusedmlp-gemm``: ours, at the default recompute level
  ("activation") and the other two; ``compile(fusedmlp)``: torch.compile of ours.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..activations import Activation
from ..modules import FusedGatedMLP, FusedMLP
from .presets import Preset

# The article's order: what a profile shows side by side by default.
PROFILE_VARIANTS = ("eager", "compile", "liger", "fusedmlp")
BENCH_VARIANTS = ("floor", "eager", "eager-merged", "compile", "liger", "fusedmlp", "compile(fusedmlp)")
RECOMPUTE_VARIANTS = ("fusedmlp-none", "fusedmlp-gemm")
ALL_VARIANTS = (*BENCH_VARIANTS, "compile-max-autotune", *RECOMPUTE_VARIANTS)


@dataclasses.dataclass
class Variant:
    """One way to run the case: ``module`` is called with the input, or is None with ``note``
    saying why the variant is not available (else ``note`` says how it was built)."""

    name: str
    module: nn.Module | None
    note: str = ""


class Floor(nn.Module):
    """The case's GEMMs alone through cuBLAS: merged gate|up (or fc1, with bias) on x, and the
    down projection on a fixed random h."""

    def __init__(self, preset: Preset, eager: nn.Module, x: Tensor) -> None:
        super().__init__()
        if preset.gated:
            g, u, d = eager.gate_proj, eager.up_proj, eager.down_proj
            self.w_in = torch.cat([g.weight, u.weight]).detach()
            self.b_in = None if g.bias is None else torch.cat([g.bias, u.bias]).detach()
            self.w_out, self.b_out = d.weight.detach(), d.bias
        else:
            self.w_in, self.b_in = eager.fc1.weight.detach(), eager.fc1.bias
            self.w_out, self.b_out = eager.fc2.weight.detach(), eager.fc2.bias
        self.h = torch.randn(x.shape[0], self.w_out.shape[1], device=x.device, dtype=x.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.linear(x, self.w_in, self.b_in), F.linear(self.h, self.w_out, self.b_out)


class EagerMerged(nn.Module):
    """Eager with gate and up merged into one GEMM, the activation and multiply left unfused."""

    def __init__(self, eager: reference.GatedMLP) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.cat([eager.gate_proj.weight, eager.up_proj.weight]).detach())
        b = eager.gate_proj.bias
        self.b = None if b is None else nn.Parameter(torch.cat([b, eager.up_proj.bias]).detach())
        self.down = eager.down_proj
        self.activation = eager.activation

    def forward(self, x: Tensor) -> Tensor:
        return self.down(reference.gated_act(*F.linear(x, self.w, self.b).chunk(2, -1), self.activation))


def _liger(preset: Preset, eager: nn.Module, device: torch.device) -> Variant:
    try:
        from liger_kernel.transformers import LigerGEGLUMLP, LigerSwiGLUMLP
    except ImportError:
        return Variant("liger", None, "skipped: liger_kernel is not installed (pip install liger-kernel)")
    if device.type != "cuda":
        return Variant("liger", None, "skipped: Liger's Triton kernels need a CUDA device")
    classes = {
        Activation.SILU: (LigerSwiGLUMLP, "silu"),
        Activation.GELU_TANH: (LigerGEGLUMLP, "gelu_pytorch_tanh"),
    }
    if preset.layers != 2 or not preset.gated or preset.bias or preset.activation not in classes:
        return Variant("liger", None, "skipped: Liger has bias-free SwiGLU and GeGLU(tanh) MLPs only")
    cls, hf_act = classes[preset.activation]
    config = types.SimpleNamespace(
        hidden_size=preset.hidden, intermediate_size=preset.intermediate, hidden_act=hf_act
    )
    p = next(eager.parameters())
    module = cls(config).to(device=device, dtype=p.dtype)
    module.load_state_dict(eager.state_dict())  # the same gate_proj/up_proj/down_proj keys
    return Variant("liger", module, cls.__name__)


def build(preset: Preset, names: list[str] | tuple[str, ...], eager: nn.Module, x: Tensor) -> list[Variant]:
    """The requested variants of ``preset``, all holding ``eager``'s weights; ValueError naming
    an unknown variant."""
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    two_layer = preset.layers == 2
    out = []
    for name in names:
        if name in ("floor", "eager-merged") and not two_layer:
            out.append(Variant(name, None, "skipped: not an MLP of two projections"))
        elif name == "floor":
            out.append(Variant(name, Floor(preset, eager, x), "cuBLAS GEMMs alone"))
        elif name == "eager":
            out.append(Variant(name, eager, type(eager).__name__))
        elif name == "eager-merged":
            merged = EagerMerged(eager) if preset.gated else None
            out.append(Variant(name, merged, "gate|up as one GEMM" if merged else "skipped: not gated"))
        elif name == "compile":
            # On CPU, Inductor's C++ kernels show in a trace only with kernel profiling on.
            options = {"cpp.enable_kernel_profile": True} if x.device.type == "cpu" else None
            out.append(Variant(name, torch.compile(eager, options=options), "torch.compile (default mode)"))
        elif name == "compile-max-autotune":
            compiled = torch.compile(eager, mode="max-autotune-no-cudagraphs")
            out.append(Variant(name, compiled, "torch.compile (max-autotune-no-cudagraphs)"))
        elif name == "liger":
            out.append(_liger(preset, eager, x.device))
        elif name == "compile(fusedmlp)":
            try:
                fused = preset.fused(eager)
            except ValueError as e:
                out.append(Variant(name, None, f"skipped: {e}"))
            else:
                out.append(Variant(name, torch.compile(fused), f"torch.compile({type(fused).__name__})"))
        else:  # fusedmlp at a recompute level
            level = name.removeprefix("fusedmlp-") if name != "fusedmlp" else None
            if level is not None and not two_layer:
                out.append(Variant(name, None, "skipped: no recompute levels"))
                continue
            try:
                if level is None:
                    fused = preset.fused(eager)
                else:
                    fused = (FusedGatedMLP if preset.gated else FusedMLP).from_module(eager, recompute=level)
            except ValueError as e:
                out.append(Variant(name, None, f"skipped: {e}"))
            else:
                out.append(Variant(name, fused, type(fused).__name__))
    return out
