"""Side-by-side benchmark, following the benchmark protocol of docs/design.md.

In one process on one GPU: the measured peaks (cases/timing.py), then per case the variants of
cases/variants.py: the floor (the same GEMMs alone through cuBLAS), eager, eager with merged
gate/up, torch.compile, Liger (when importable) and fusedmlp. Each time is a do_bench median
after warm-up. Reported: us, TFLOP/s, percent of the measured peak, ratio to the floor,
weight-bandwidth use (decode sizes), relative error against a float64 reference and, with
``train=True``, forward+backward time and the peak memory beyond parameters and inputs.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..cases import variants as V
from ..cases.presets import Preset
from ..cases.timing import median_us


def _graph_us(fn: Callable[[], object], grad: bool = False) -> float | None:
    """Median time of ``fn`` replayed from a CUDA graph, or None where it does not capture."""
    import triton.testing

    try:
        with torch.set_grad_enabled(grad):
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
    except Exception:  # a variant that cannot be captured reports no graph time
        return None


def _rel_err(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _train_step(module: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], object]:
    """Forward + backward from fresh gradients, as after optimizer.zero_grad(set_to_none=True)."""
    xg = x.detach().requires_grad_()
    params = list(module.parameters())

    def step() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        module(xg).backward(dy)

    return step


def _extra_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(
    preset: Preset,
    dtype: torch.dtype,
    variants: tuple[str, ...],
    peaks: dict[str, float] | None,
    train: bool = False,
    device: str = "cuda",
) -> dict[str, Any]:
    """Time every variant on one preset; returns one JSON-able case record."""
    torch.manual_seed(0)
    eager = preset.eager(device, dtype)
    x = preset.input(device, dtype)
    ref_mod = preset.eager(device, torch.float64)
    ref_mod.load_state_dict(eager.state_dict())
    with torch.no_grad():
        ref = ref_mod(x.double())
    del ref_mod
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    floor_us = None
    results: dict[str, Any] = {}
    for variant in V.build(preset, variants, eager, x):
        name, fn = variant.name, variant.module
        if fn is None:
            results[name] = {"skipped": variant.note.removeprefix("skipped: ")}
            continue
        with torch.no_grad():
            us = median_us(lambda f=fn: f(x), device)
            err = None if name == "floor" else _rel_err(fn(x), ref)
        r: dict[str, Any] = {"us": us, "tflops": preset.flops / us / 1e6, "rel_err": err}
        if torch.device(device).type == "cuda":  # GPU time alone: host launch overhead removed
            r["graph_us"] = _graph_us(lambda f=fn: f(x))
        if name == "floor":
            floor_us = us
        if peaks:
            r["pct_peak_flops"] = 100 * r["tflops"] / peaks["tflops"]
            r["pct_copy_bw_weights"] = 100 * weight_bytes / us / 1e3 / peaks["gbps"]
        if train and name != "floor":
            dy = torch.randn_like(ref, dtype=dtype)
            step = _train_step(fn, x, dy)
            r["train_us"] = median_us(step, device)
            r["train_graph_us"] = _graph_us(step, grad=True)
            for p in fn.parameters():
                p.grad = None
            r["train_extra_peak_mib"] = _extra_peak_mib(step, torch.device(device))
            for p in fn.parameters():
                p.grad = None
        results[name] = r
    for r in results.values():
        if floor_us and "us" in r:
            r["vs_floor"] = r["us"] / floor_us
    return {
        "preset": preset.name,
        "M": preset.tokens,
        "D": preset.hidden,
        "H": preset.intermediate,
        "activation": preset.activation.value,
        "gated": preset.gated,
        "bias": preset.bias,
        "dtype": str(dtype).removeprefix("torch."),
        "flops": preset.flops,
        "weight_bytes": weight_bytes,
        "variants": results,
    }


def tuned_configs() -> dict[str, str]:
    try:
        from ..kernels.gemm_act import chosen_configs
    except ImportError:
        return {}
    return chosen_configs()


def environment() -> dict[str, Any]:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save(record: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = record["env"]["date"].replace(":", "").replace("-", "")[:13]
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    return path
