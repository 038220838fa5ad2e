"""Side-by-side benchmark, following DESIGN.md's protocol.

In one process on one GPU: the measured peaks (an 8192^3 bf16 matmul, a 1 GiB device copy),
then per case the floor (the same GEMMs alone through cuBLAS), eager, eager with merged
gate/up, torch.compile (default; max-autotune-no-cudagraphs on request), Liger (when
importable) and fusedmlp. Each time is a do_bench median after warm-up. Reported: us, TFLOP/s,
percent of the measured peak, ratio to the floor, weight-bandwidth use (decode sizes), relative
error against a float64 reference and, with ``train=True``, forward+backward time and the peak
memory beyond parameters and inputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..activations import Activation
from ..modules import FusedGatedMLP, FusedMLP
from .presets import Preset
from .timing import median_us

DEFAULT_VARIANTS = ("floor", "eager", "eager-merged", "compile", "liger", "fusedmlp")
# fusedmlp with another recompute level than the default ("activation")
RECOMPUTE_VARIANTS = ("fusedmlp-none", "fusedmlp-gemm")
ALL_VARIANTS = (*DEFAULT_VARIANTS, "compile-max-autotune", *RECOMPUTE_VARIANTS)


@dataclasses.dataclass(frozen=True)
class Peaks:
    matmul_tflops: float
    copy_gbps: float  # bytes read + written per second / 1e9


def measure_peaks(device: torch.device | str = "cuda") -> Peaks:
    """The two ceilings, measured in this run: a large bf16 matmul and a 1 GiB device copy."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_us = median_us(lambda: a @ b, device)
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy_us = median_us(lambda: dst.copy_(src), device)
    return Peaks(2 * n**3 / mm_us / 1e6, 2 * src.numel() * 4 / copy_us / 1e3)


class _EagerMerged(nn.Module):
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


class _Liger(nn.Module):
    """The eager module's linears around Liger's fused activation-times-up kernel."""

    def __init__(self, eager: reference.GatedMLP, fn: Any) -> None:
        super().__init__()
        self.eager, self.fn = eager, fn

    def forward(self, x: Tensor) -> Tensor:
        e = self.eager
        return e.down_proj(self.fn.apply(e.gate_proj(x), e.up_proj(x)))


def _liger_fn(act: Activation) -> Any | None:
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return {Activation.SILU: LigerSiLUMulFunction, Activation.GELU_TANH: LigerGELUMulFunction}.get(act)


def _floor_fn(preset: Preset, eager: nn.Module, x: Tensor) -> Callable[[], object]:
    """The GEMMs alone through cuBLAS: merged gate|up (or fc1, with bias) and the down projection."""
    if preset.gated:
        w_in = torch.cat([eager.gate_proj.weight, eager.up_proj.weight]).detach()
        w_out = eager.down_proj.weight.detach()
        b_in = None if eager.gate_proj.bias is None else torch.cat([eager.gate_proj.bias, eager.up_proj.bias])
        b_out = eager.down_proj.bias
    else:
        w_in, b_in = eager.fc1.weight.detach(), eager.fc1.bias
        w_out, b_out = eager.fc2.weight.detach(), eager.fc2.bias
    h = torch.randn(x.shape[0], w_out.shape[1], device=x.device, dtype=x.dtype)
    return lambda: (F.linear(x, w_in, b_in), F.linear(h, w_out, b_out))


def build_variants(preset: Preset, eager: nn.Module, x: Tensor, names: tuple[str, ...]) -> dict[str, Any]:
    """name -> forward callable (or the reason it is not available)."""
    out: dict[str, Any] = {}
    for name in names:
        if preset.layers != 2 and name in ("floor", "eager-merged", "liger"):
            out[name] = "not an MLP of two projections"
        elif name == "floor":
            out[name] = _floor_fn(preset, eager, x)
        elif name == "eager":
            out[name] = eager
        elif name == "eager-merged":
            out[name] = _EagerMerged(eager) if preset.gated else "not gated"
        elif name == "compile":
            out[name] = torch.compile(eager)
        elif name == "compile-max-autotune":
            out[name] = torch.compile(eager, mode="max-autotune-no-cudagraphs")
        elif name == "liger":
            fn = _liger_fn(preset.activation) if preset.gated else None
            out[name] = _Liger(eager, fn) if fn is not None else "liger_kernel not importable or no kernel"
        elif name == "fusedmlp":
            out[name] = preset.fused(eager)
        elif name in RECOMPUTE_VARIANTS:
            level = name.removeprefix("fusedmlp-")
            cls = FusedGatedMLP if preset.gated else FusedMLP
            out[name] = (
                cls.from_module(eager, recompute=level) if preset.layers == 2 else "no recompute levels"
            )
        else:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(ALL_VARIANTS)}")
    return out


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
    peaks: Peaks | None,
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
    built = build_variants(preset, eager, x, variants)
    floor_us = None
    results: dict[str, Any] = {}
    for name, fn in built.items():
        if isinstance(fn, str):
            results[name] = {"skipped": fn}
            continue
        with torch.no_grad():
            us = median_us(fn if name == "floor" else (lambda f=fn: f(x)), device)
            err = None if name == "floor" else _rel_err(fn(x), ref)
        r: dict[str, Any] = {"us": us, "tflops": preset.flops / us / 1e6, "rel_err": err}
        if torch.device(device).type == "cuda":  # GPU time alone: host launch overhead removed
            r["graph_us"] = _graph_us(fn if name == "floor" else (lambda f=fn: f(x)))
        if name == "floor":
            floor_us = us
        if peaks:
            r["pct_peak_flops"] = 100 * r["tflops"] / peaks.matmul_tflops
            r["pct_copy_bw_weights"] = 100 * weight_bytes / us / 1e3 / peaks.copy_gbps
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
