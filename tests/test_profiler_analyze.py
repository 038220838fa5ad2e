"""Trace loading and the per-variant analysis, on synthetic traces with the H100's kernel names."""

import gzip
import json

import pytest
from synthetic_traces import FUSED_GEMM, INDUCTOR, KERNELS, NVJET, NVJET_BIAS, make_trace, write

from fusedmlp.cli import main
from fusedmlp.profiler import analyze, trace

M, D, H = 8192, 768, 3072  # geglu-article


def _summary(tmp_path, variant, **kw):
    return analyze.analyze(trace.load(write(make_trace(variant, **kw), tmp_path / f"{variant}.json")))


@pytest.mark.parametrize("variant, n", [("eager", 5), ("compile", 4), ("liger", 4), ("fusedmlp", 2)])
def test_kernels_per_forward_and_guess(tmp_path, variant, n):
    s = _summary(tmp_path, variant)
    print(s.expected, s.expected_notes)
    assert (s.variant, s.forwards, s.kernels_per_forward) == (variant, 3, n)
    assert len(s.expected) == n and s.expected_notes == []
    assert [t.name for t in s.timeline] == [k[0] for k in KERNELS[variant]]


def test_eager_gemm_throughput_and_verdict(tmp_path):
    s = _summary(tmp_path, "eager")
    gemm = next(k for k in s.kernels if k.name == NVJET)
    assert gemm.calls == 3 and gemm.roles == ["gate GEMM", "up GEMM", "down GEMM"]
    assert gemm.flops == 3 * 2 * M * D * H
    assert gemm.tflops == pytest.approx(gemm.flops / (60 + 60 + 58) / 1e6)
    assert s.verdict == "compute-bound", s.verdict_reason
    assert s.launches_per_forward == {"cudaLaunchKernel": 5}
    # aten::t launches nothing; aten::mm launches the GEMM
    names = {o["name"]: o["calls"] for o in s.cpu_ops_without_kernels}
    assert names == {"aten::t": 3}


def test_intermediate_bytes_saved(tmp_path):
    eager, compiled, fused = (_summary(tmp_path, v) for v in ("eager", "compile", "fusedmlp"))
    # eager moves 8 [M, H] bf16 tensors (gate, up written; gelu 2; mul 3; down reads 1); compile's
    # fused act*mul 6; fusedmlp 2 (h written by the GEMM epilogue, read by the down GEMM)
    assert eager.intermediate_bytes == 8 * M * H * 2
    assert eager.intermediate_bytes_saved_vs_eager == 0
    assert compiled.intermediate_bytes_saved_vs_eager == 2 * M * H * 2
    assert fused.intermediate_bytes_saved_vs_eager == 6 * M * H * 2


def test_triton_kernels_decode_and_count_driver_launches(tmp_path):
    s = _summary(tmp_path, "compile")
    k = next(k for k in s.kernels if k.name == INDUCTOR)
    assert k.decoded.ops == ("_unsafe_view", "gelu", "mul") and k.roles == ["gelu_tanh*mul (fused)"]
    assert k.gbps == pytest.approx(3 * M * H * 2 / 52 / 1e3)
    assert s.launches_per_forward == {"cudaLaunchKernel": 3, "cuLaunchKernelEx": 1}
    assert s.occupancy_queries_per_forward == 1
    fused = _summary(tmp_path, "fusedmlp")
    assert next(k for k in fused.kernels if k.name == FUSED_GEMM).decoded.library == "Triton (fusedmlp)"


def test_runtime_launch_seen_through_the_driver_counts_once(tmp_path):
    t = make_trace("eager")
    launches = [e for e in t["traceEvents"] if e["name"] == "cudaLaunchKernel"]
    t["traceEvents"] += [
        {**e, "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": e["ts"] + 0.5} for e in launches
    ]
    s = analyze.analyze(trace.load(write(t, tmp_path / "both.json")))
    assert s.launches_per_forward == {"cudaLaunchKernel": 5}


def test_kernel_without_a_recorded_launch_joins_the_forward_it_runs_in(tmp_path):
    t = make_trace("compile")
    t["traceEvents"] = [e for e in t["traceEvents"] if e["name"] != "cuLaunchKernelEx"]
    s = analyze.analyze(trace.load(write(t, tmp_path / "no-driver-events.json")))
    assert s.kernels_per_forward == 4 and not s.expected_notes


def test_linear_with_bias_is_one_gemm_with_bias_epilogue(tmp_path):
    s = _summary(tmp_path, "linear")
    assert s.kernels_per_forward == 1 and s.expected == ["linear GEMM (+bias)"] and not s.expected_notes
    assert s.kernels[0].name == NVJET_BIAS and s.kernels[0].decoded.epilogue == "bias"


def test_guess_disagreement_is_marked(tmp_path):
    extra = [*KERNELS["eager"], ("Memcpy-like copy_kernel", 5.0, "aten::copy_", False)]
    s = _summary(tmp_path, "eager", kernels=extra)
    assert s.kernels_per_forward == 6
    assert "expected 5 kernels per forward, the trace shows 6" in s.expected_notes
    assert s.as_dict()["guess_agrees"] is False
    missing = _summary(tmp_path, "eager", kernels=KERNELS["compile"])  # act and mul fused: not eager
    assert any("expected but not seen: mul" in n for n in missing.expected_notes)


def test_copies_are_listed_apart_from_kernels(tmp_path):
    t = make_trace("eager")
    launch = next(e for e in t["traceEvents"] if e["name"] == "cudaLaunchKernel")
    # A fill launched in the first forward, run by the GPU after the forward's label has closed
    memset = {**launch, "cat": "gpu_memset", "name": "Memset (Device)", "tid": 7, "ts": launch["ts"] + 500}
    t["traceEvents"] += [
        {**launch, "name": "cudaMemsetAsync", "args": {"correlation": 999}},
        {**memset, "dur": 2.0, "args": {"correlation": 999}},
    ]
    s = analyze.analyze(trace.load(write(t, tmp_path / "memset.json")))
    assert s.kernels_per_forward == 5  # a fill is not a kernel of the MLP
    assert s.memory_ops == [{"name": "Memset (Device)", "calls": 1 / 3, "time_us": 2.0 / 3}]


def test_overhead_bound_when_dispatch_outlasts_kernels(tmp_path):
    tiny = [(NVJET, 2.0, "aten::mm", False)] * 3
    s = _summary(tmp_path, "eager", kernels=tiny, cpu_us_per_kernel=30.0)
    assert s.verdict == "overhead-bound", s.verdict_reason


def test_trace_without_metadata_still_analyses(tmp_path):
    s = _summary(tmp_path, "eager", metadata=False)
    assert (s.variant, s.kernels_per_forward, s.expected) == ("eager", 5, None)
    assert s.kernels[0].tflops is None


def test_bad_metadata_fields_read_as_unknown(tmp_path):
    t = make_trace("eager")
    t["fusedmlp"].update(peaks={"tflops": 739}, element_size={"x": 1}, variant=["eager"])
    s = analyze.analyze(trace.load(write(t, tmp_path / "hand-edited.json")))
    assert s.variant == "eager"  # from the forward labels, since the metadata's is not a string
    assert s.kernels_per_forward == 5 and "GEMMs count as compute" in s.verdict_reason  # no peaks
    t["fusedmlp"]["preset"] = {"name": "half a preset"}
    assert analyze.analyze(trace.load(write(t, tmp_path / "worse.json"))).expected is None


def test_gzip_and_plain_load_the_same(tmp_path):
    t = make_trace("eager")
    a = trace.load(write(t, tmp_path / "a.json"))
    b = trace.load(write(t, tmp_path / "b.json.gz"))
    assert a.kernels == b.kernels and a.metadata == b.metadata and len(a.kernels) == 15


def _report(tmp_path, *paths):
    return main(["report", *map(str, paths), "--out", str(tmp_path / "out")])


def test_report_writes_summary_and_html(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells at the default 80
    paths = [write(make_trace(v), tmp_path / f"{v}.json.gz") for v in ("eager", "compile", "fusedmlp")]
    assert _report(tmp_path, *paths) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {v: s["kernels_per_forward"] for v, s in summary["variants"].items()} == {
        "eager": 5,
        "compile": 4,
        "fusedmlp": 2,
    }
    k = summary["variants"]["eager"]["kernels"][0]
    assert set(k) >= {"name", "calls", "time_us", "decoded"} and k["decoded"]["library"] == "cuBLAS (nvjet)"
    assert summary["variants"]["eager"]["cpu_ops_without_kernels"] == [{"name": "aten::t", "calls": 3.0}]
    assert summary["totals"]["fastest"] == "fusedmlp" and summary["peaks"]["tflops"] == 739.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('src="data:image/svg+xml;base64,') == 3
    out = capsys.readouterr().out
    assert "5 as guessed" in out and "nvjet" in out


def test_report_of_a_folder_names_two_runs_apart(tmp_path):
    (tmp_path / "traces").mkdir()
    for i in (1, 2):
        write(make_trace("eager"), tmp_path / "traces" / f"run{i}.json")
    assert _report(tmp_path, tmp_path / "traces") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["variants"]) == ["eager", "eager#2"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"traceEvents": [{"ph": "X", "cat": "kernel", "na',  # truncated JSON
        gzip.compress(json.dumps(make_trace("eager")).encode(), mtime=0)[:200],  # truncated gzip
        b'{"something": "else"}',
        b"\xff\xfe\x00garbage",
    ],
    ids=["empty", "not-json", "truncated-json", "truncated-gzip", "wrong-structure", "binary"],
)
def test_corrupt_trace_is_a_one_line_error_naming_the_file(tmp_path, capsys, content):
    bad = tmp_path / "broken.json.gz"
    bad.write_bytes(content)
    good = write(make_trace("eager"), tmp_path / "good.json")
    with pytest.raises(SystemExit) as e:
        _report(tmp_path, good, bad)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    print(lines)
    assert e.value.code == 2 and len(lines) == 1 and str(bad) in lines[0]
    assert lines[0].startswith("fusedmlp: error:") and "Traceback" not in out.err


def test_missing_file_and_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        _report(tmp_path, tmp_path / "nope.json")
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="2"):
        _report(tmp_path, tmp_path / "empty")
    assert "no trace files" in capsys.readouterr().err
