"""Minimal torch.profiler-style Chrome traces with the kernel names seen on the H100
(shared/anchors/README.md), for testing the analysis without a GPU.

Each forward: a ProfilerStep#N, our fusedmlp/<variant>/forward label, and per kernel a CPU op
(with an aten::t that launches nothing for every GEMM) holding the launch call, then the kernel
on the GPU, linked by ``correlation`` as Kineto links them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

from fusedmlp.cases.presets import PRESETS
from fusedmlp.profiler.analyze import preset_to_dict

NVJET = "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT"
NVJET_BIAS = "nvjet_sm90_tst_8x64_64x16_2x1_v_bz_bias_TNN"
# ATen's elementwise kernels as the trace names them (one string, split here for line length).
_GELU_FUNCTOR = (
    "at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::"
    "operator()() const::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}"
)
GELU = (
    f"void at::native::vectorized_elementwise_kernel<4, {_GELU_FUNCTOR}, std::array<char*, 2ul> >"
    f"(int, {_GELU_FUNCTOR}, std::array<char*, 2ul>)"
)
_MUL_FUNCTOR = (
    "at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
    "at::native::binary_internal::MulFunctor<float> >"
)
MUL = (
    f"void at::native::vectorized_elementwise_kernel<4, {_MUL_FUNCTOR}, std::array<char*, 3ul> >"
    f"(int, {_MUL_FUNCTOR}, std::array<char*, 3ul>)"
)
INDUCTOR = "triton_poi_fused__unsafe_view_gelu_mul_0"
LIGER = "_geglu_tanh_forward_kernel"
FUSED_GEMM = "_gemm_act_kernel"
PEAKS = {"tflops": 739.0, "gbps": 3020.0}

# (kernel, GPU us, CPU op that launches it, launched by Triton's driver call) per variant,
# durations in the proportions of the anchors (GeGLU, M=8192, 768 -> 3072, bf16).
KERNELS: dict[str, list[tuple[str, float, str, bool]]] = {
    "eager": [
        (NVJET, 60.0, "aten::mm", False),
        (NVJET, 60.0, "aten::mm", False),
        (GELU, 36.0, "aten::gelu", False),
        (MUL, 50.0, "aten::mul", False),
        (NVJET, 58.0, "aten::mm", False),
    ],
    "compile": [
        (NVJET, 60.0, "aten::mm", False),
        (NVJET, 60.0, "aten::mm", False),
        (INDUCTOR, 52.0, INDUCTOR, True),
        (NVJET, 58.0, "aten::mm", False),
    ],
    "liger": [
        (NVJET, 60.0, "aten::mm", False),
        (NVJET, 60.0, "aten::mm", False),
        (LIGER, 52.0, "LigerGELUMulFunction", True),
        (NVJET, 58.0, "aten::mm", False),
    ],
    "fusedmlp": [
        (FUSED_GEMM, 140.0, "MLPFunction", True),
        (NVJET, 58.0, "aten::mm", False),
    ],
    "linear": [(NVJET_BIAS, 30.0, "aten::addmm", False)],
}


def make_trace(
    variant: str,
    kernels: list[tuple[str, float, str, bool]] | None = None,
    preset: str = "geglu-article",
    steps: int = 3,
    cpu_us_per_kernel: float = 8.0,
    metadata: bool = True,
) -> dict[str, Any]:
    """A trace dict; ``kernels`` default to KERNELS[variant]."""
    kernels = KERNELS[variant] if kernels is None else kernels
    events: list[dict[str, Any]] = []
    corr = 0
    t = 1_000_000.0

    def x(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args: Any) -> None:
        events.append(
            {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}
        )

    for step in range(steps):
        cpu = 5.0 + cpu_us_per_kernel * len(kernels)
        gpu_t = t + 10.0
        x("user_annotation", f"ProfilerStep#{step + 2}", t, cpu + sum(k[1] for k in kernels) + 20)
        x("user_annotation", f"fusedmlp/{variant}/forward", t + 1, cpu)
        c = t + 2
        for name, dur, op, driver in kernels:
            corr += 1
            is_gemm = op in ("aten::mm", "aten::addmm")
            x("cpu_op", op, c, cpu_us_per_kernel - 1)
            if is_gemm:
                x("cpu_op", "aten::t", c + 0.1, 0.5)  # a view: launches nothing
            api = "cuLaunchKernelEx" if driver else "cudaLaunchKernel"
            if driver:
                x("cuda_runtime", "cudaOccupancyMaxActiveClusters", c + 0.8, 0.3)
            x("cuda_driver" if driver else "cuda_runtime", api, c + 2, 3.0, correlation=corr)
            gpu_t = max(gpu_t, c + 5)
            x("kernel", name, gpu_t, dur, tid=7, correlation=corr, stream=7)
            gpu_t += dur + 1.0
            c += cpu_us_per_kernel
        t += cpu + sum(k[1] for k in kernels) + 100
    trace: dict[str, Any] = {
        "schemaVersion": 1,
        "deviceProperties": [{"name": "NVIDIA H100"}],
        "traceEvents": events,
    }
    if metadata:
        p = PRESETS[preset if variant != "linear" else "linear-bias"]
        trace["fusedmlp"] = {
            "variant": variant if variant != "linear" else "eager",
            "preset": preset_to_dict(dataclasses.replace(p)),
            "dtype": "bfloat16",
            "element_size": 2,
            "device": "NVIDIA H100 80GB HBM3 (synthetic)",
            "torch": "2.11.0",
            "peaks": PEAKS,
        }
    return trace


def write(trace: dict[str, Any], path: Path) -> Path:
    text = json.dumps(trace)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path
