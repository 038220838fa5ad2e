"""``fusedmlp bench --moe``: mixture-of-experts layers side by side (cases/moe.py), under the
benchmark protocol of bench/run.py: per routing (balanced, skewed) and variant, forward (and
with ``train``, forward+backward) wall time through the host, GPU time from CUDA graphs,
TFLOP/s, error against a float64 reference, peak memory of a training step; ratios to the
grouped-GEMM floor (GPU) and to Hugging Face's default experts path (wall: the "eager"
columns)."""

from __future__ import annotations

import gc
from typing import Any

import torch

from ..cases import moe
from . import run


def run_case(
    preset: moe.MoEPreset,
    kind: str,
    dtype: torch.dtype,
    names: tuple[str, ...],
    peaks: dict[str, float] | None,
    train: bool = False,
    device: str = "cuda",
) -> dict[str, Any]:
    """Time every variant of one MoE preset under one routing; one JSON-able case record."""
    dev = torch.device(device)
    variants, x = moe.build(preset, names, dev, dtype, kind)
    ref = moe.reference(preset, x, kind)
    fused = next((v.module for v in variants if v.name == "fusedmlp"), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in (fused or variants[0].module).parameters())
    results = run.measure_all(preset, variants, x, ref, dtype, peaks, weight_bytes, train, device)
    run.ratios(results, eager="hf", compiled="compile")
    act = "gpt_oss_swiglu" if preset.model_type == "gpt_oss" else "silu"
    del variants, x, ref, fused
    gc.collect()
    torch._dynamo.reset()  # compiled variants hold their graphs (and the modules) until reset
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "preset": f"{preset.name} ({kind} routing)",
        "M": preset.tokens,
        "D": preset.hidden,
        "H": preset.expert_width,
        "experts": preset.experts,
        "top_k": preset.top_k,
        "routing": kind,
        "activation": act,
        "gated": True,
        "bias": preset.model_type == "gpt_oss",
        "dtype": str(dtype).removeprefix("torch."),
        "flops": preset.flops,
        "weight_bytes": weight_bytes,
        "variants": results,
    }
