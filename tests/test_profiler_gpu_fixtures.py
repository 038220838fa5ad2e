"""The profiler on real GPU traces, captured on the H100 by benchmarks/capture_traces.py and
committed under tests/fixtures/traces/. No GPU is needed to run these: they read the files.

Until the fixtures are committed, each test skips and says how to make them.
"""

import json
from pathlib import Path

import pytest

from fusedmlp.cli import main
from fusedmlp.profiler import analyze, trace

FIXTURES = Path(__file__).parent / "fixtures" / "traces"
MAX_BYTES = 1_000_000


def _load(stem):
    path = FIXTURES / f"{stem}.json.gz"
    if not path.exists():
        pytest.skip(
            f"GPU fixture {path.relative_to(Path(__file__).parent.parent)} is missing: run "
            "`PYTHONPATH=src python3 benchmarks/capture_traces.py` on a CUDA machine and commit its output"
        )
    assert path.stat().st_size < MAX_BYTES
    return analyze.analyze(trace.load(path))


def _gemms(s):
    return [k for k in s.kernels if k.decoded.is_gemm]


def test_article_eager_geglu_runs_5_kernels():
    s = _load("geglu_eager")
    print([(k.name, k.decoded.summary()) for k in s.kernels])
    assert s.on_gpu and s.kernels_per_forward == 5 and not s.expected_notes
    assert sum(k.calls for k in _gemms(s)) == 3
    assert {k.decoded.op for k in s.kernels if not k.decoded.is_gemm} == {"gelu", "mul"}
    assert all(k.decoded.library != "unknown" for k in s.kernels)
    assert sum(s.launches_per_forward.values()) >= 5  # cudaLaunchKernel, or cuLaunchKernelEx for clusters
    assert "aten::t" in {o["name"] for o in s.cpu_ops_without_kernels}
    gemm = _gemms(s)[0]
    assert gemm.tflops and gemm.gbps  # FLOPs from the preset against the measured peak


def test_compiled_twin_runs_4_kernels_with_inductors_fused_gelu_mul():
    s = _load("geglu_compile")
    print([(k.name, k.decoded.summary()) for k in s.kernels])
    assert s.kernels_per_forward == 4 and not s.expected_notes
    fused = [k for k in s.kernels if k.decoded.library == "Triton (Inductor)"]
    assert len(fused) == 1 and {"gelu", "mul"} <= set(fused[0].decoded.ops)
    assert s.intermediate_bytes_saved_vs_eager == 2 * 8192 * 3072 * 2


def test_linear_with_bias_is_one_gemm_whose_epilogue_is_bias():
    s = _load("linear_bias")
    print([(k.name, k.decoded.summary()) for k in s.kernels])
    assert s.kernels_per_forward == 1
    assert s.kernels[0].decoded.is_gemm and s.kernels[0].decoded.epilogue == "bias"


def test_fusedmlp_runs_2_kernels():
    """The gate|up GEMM with the activation in its epilogue, then cuBLAS for the down projection."""
    s = _load("geglu_fusedmlp")
    print([(k.name, k.decoded.summary()) for k in s.kernels])
    assert s.kernels_per_forward == 2 and not s.expected_notes
    assert "_gemm_act_kernel" in {k.name for k in s.kernels}


def test_report_on_all_fixtures(tmp_path):
    paths = sorted(FIXTURES.glob("*.json.gz")) if FIXTURES.exists() else []
    if not paths:
        pytest.skip("no GPU fixtures yet: run benchmarks/capture_traces.py on a CUDA machine")
    assert main(["report", *map(str, paths), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["peaks"]["tflops"] > 0 and summary["device"]
    assert all(v["kernels_per_forward"] > 0 for v in summary["variants"].values())
