"""Side-by-side benchmark, following the benchmark protocol of docs/design.md.

In one process on one GPU: the measured peaks (cases/timing.py), then per case the variants of
cases/variants.py: the floor (the same GEMMs alone through cuBLAS), eager, eager with merged
gate/up, torch.compile, Liger (when importable), fusedmlp and compile(fusedmlp). Per variant:
wall time (back-to-back calls, host included: what a user waits), host time per call, GPU time
(CUDA-graph replay), TFLOP/s and percent of the measured peak (on GPU time), ratio to the floor
(GPU), wall over eager's and compile's, weight-bandwidth use (decode sizes), relative error
against a float64 reference and, with ``train=True``, the same for forward+backward and the
peak memory beyond parameters and inputs.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..cases import variants as V
from ..cases.moe import MoEPreset
from ..cases.presets import Preset
from ..cases.timing import graph_us, wall_us
from ..profiler.trace import strict_json, write_atomic


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
    built = V.build(preset, variants, eager, x)
    results = measure_all(preset, built, x, ref, dtype, peaks, weight_bytes, train, device)
    ratios(results)
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


def measure_all(
    preset: Preset | MoEPreset,
    variants: list[V.Variant],
    x: Tensor,
    ref: Tensor,
    dtype: torch.dtype,
    peaks: dict[str, float] | None,
    weight_bytes: int,
    train: bool,
    device: str,
) -> dict[str, Any]:
    """:func:`measure` for each variant: a skipped one says why, a failing one records its error
    (one failing variant must not sink the run)."""
    results: dict[str, Any] = {}
    for v in variants:
        if v.module is None:
            results[v.name] = {"skipped": v.note.removeprefix("skipped: ")}
            continue
        try:
            results[v.name] = measure(
                preset, v.module, v.name, x, ref, dtype, peaks, weight_bytes, train, device
            )
        except Exception as e:
            results[v.name] = {
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            }
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return results


def measure(
    preset: Preset | MoEPreset,
    fn: nn.Module,
    name: str,
    x: Tensor,
    ref: Tensor,
    dtype: torch.dtype,
    peaks: dict[str, float] | None,
    weight_bytes: int,
    train: bool,
    device: str,
) -> dict[str, Any]:
    """One variant's record: forward (and with ``train``, forward+backward) wall, host and GPU
    times, throughput, error, peak memory."""
    on_gpu = torch.device(device).type == "cuda"
    # from the CPU generator: a variant that cannot be captured (graph_us: None) leaves the CUDA
    # generator refusing every later draw ("Offset increment outside graph capture")
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(ref.shape, generator=g).to(ref.device, dtype) if train else None
    with torch.no_grad():
        times = wall_us(lambda: fn(x), device)
        gpu = graph_us(lambda: fn(x)) if on_gpu else None
        err = None if name == "floor" else _rel_err(fn(x), ref)
    r: dict[str, Any] = {"wall_us": times["wall"], "host_us": times["host"], "graph_us": gpu}
    r["rel_err"] = err
    r["tflops"] = preset.flops / (gpu or times["wall"]) / 1e6
    if peaks:
        r["pct_peak_flops"] = 100 * r["tflops"] / peaks["tflops"]
        r["pct_copy_bw_weights"] = 100 * weight_bytes / (gpu or times["wall"]) / 1e3 / peaks["gbps"]
    if dy is not None and name != "floor":
        step = _train_step(fn, x, dy)
        times = wall_us(step, device)
        r["train_wall_us"], r["train_host_us"] = times["wall"], times["host"]
        with torch.enable_grad():
            r["train_graph_us"] = graph_us(step) if on_gpu else None
        for p in fn.parameters():
            p.grad = None
        r["train_extra_peak_mib"] = _extra_peak_mib(step, torch.device(device)) if on_gpu else None
        for p in fn.parameters():
            p.grad = None
    return r


def ratios(results: dict[str, Any], eager: str = "eager", compiled: str = "compile") -> None:
    """GPU time over the floor's (CUDA graphs), and wall time over the ``eager`` and
    ``compiled`` variants' (the "eager" and "compile" columns)."""
    floor, eager_r, compiled_r = (results.get(n, {}) for n in ("floor", eager, compiled))
    for r in results.values():
        if r.get("graph_us") and floor.get("graph_us"):
            r["vs_floor"] = r["graph_us"] / floor["graph_us"]
        for base, key in ((eager_r, "wall_vs_eager"), (compiled_r, "wall_vs_compile")):
            if r.get("wall_us") and base.get("wall_us"):
                r[key] = r["wall_us"] / base["wall_us"]
        if r.get("train_wall_us") and eager_r.get("train_wall_us"):
            r["train_wall_vs_eager"] = r["train_wall_us"] / eager_r["train_wall_us"]
        if r.get("train_wall_us") and compiled_r.get("train_wall_us"):
            r["train_wall_vs_compile"] = r["train_wall_us"] / compiled_r["train_wall_us"]


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


def save(record: dict[str, Any], out_dir: Path, prefix: str = "bench") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = record["env"]["date"].replace(":", "").replace("-", "")[:13]
    path = out_dir / f"{prefix}-{stamp}.json"
    write_atomic({path: strict_json(record, indent=1)})  # a NaN error becomes null; no half-written file
    return path
