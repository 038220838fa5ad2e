"""`fusedmlp profile` end to end on this machine's CPU: real torch.profiler traces, then
`fusedmlp report` on the saved traces must reproduce the analysis.

On a CPU trace the CPU ops that do the work stand in for kernels (aten::mm, aten::gelu, a
custom op as one unit, Inductor's C++ kernel), so the article's counts hold here too."""

import json

import pytest
import torch

from fusedmlp.cli import main

SMALL = ["--preset", "cpu-small", "--tokens", "32"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One profile run of the three variants this machine has (compile takes a few seconds)."""
    out = tmp_path_factory.mktemp("profile")
    assert main(["profile", *SMALL, "--variants", "eager,compile,liger,fusedmlp", "--out", str(out)]) == 0
    return out


def test_profile_counts_the_articles_kernels(profiled):
    summary = _summary(profiled)
    variants = summary["variants"]
    print({v: [k["name"] for k in s["kernels"]] for v, s in variants.items()})
    counts = {v: s["kernels_per_forward"] for v, s in variants.items()}
    assert counts["eager"] == 5 and counts["compile"] == 4
    # fusedmlp's Triton GEMM runs under the interpreter here: Python, invisible to the profiler but
    # for its tensor copies, so its CPU count says little (the GPU fixtures check its 2 kernels).
    assert counts["fusedmlp"] < counts["eager"]
    assert variants["eager"]["guess_agrees"] and variants["compile"]["guess_agrees"]
    # Liger runs where it is installed on a GPU; elsewhere it is skipped with the reason
    assert ("liger" in summary["skipped"]) != ("liger" in variants)
    compiled = {k["name"]: k["decoded"] for k in variants["compile"]["kernels"]}
    assert any(d.get("ops") == ["gelu", "mul"] for d in compiled.values()), compiled
    assert "aten::t" in {o["name"] for o in variants["eager"]["cpu_ops_without_kernels"]}
    assert summary["preset"]["tokens"] == 32
    assert (summary["peaks"] is None) != torch.cuda.is_available()  # peaks are measured on GPUs only


def test_profile_writes_traces_and_report(profiled):
    traces = sorted(p.name for p in (profiled / "traces").iterdir() if not p.name.startswith("liger"))
    assert traces == ["compile.pt.trace.json", "eager.pt.trace.json", "fusedmlp.pt.trace.json"]
    meta = json.loads((profiled / "traces" / "eager.pt.trace.json").read_text())["fusedmlp"]
    assert meta["variant"] == "eager" and meta["preset"]["name"] == "cpu-small@M=32"
    assert (profiled / "report.html").read_text().count("data:image/svg+xml;base64,") == 3


def test_report_from_saved_traces_matches_profile(profiled, tmp_path):
    assert main(["report", str(profiled / "traces"), "--out", str(tmp_path)]) == 0
    again, first = _summary(tmp_path)["variants"], _summary(profiled)["variants"]
    assert {v: s["kernels_per_forward"] for v, s in again.items()} == {
        v: s["kernels_per_forward"] for v, s in first.items()
    }
    assert again["eager"]["expected"] == first["eager"]["expected"]


def test_shape_flags_single_linear_and_narrow_stack(tmp_path):
    out = tmp_path / "lin"
    flags = ["--tokens", "16", "--hidden", "8", "--intermediate", "16", "--variants", "eager,fusedmlp"]
    assert main(["profile", "--preset", "linear-bias", *flags, "--out", str(out)]) == 0
    summary = _summary(out)
    eager = summary["variants"]["eager"]
    assert summary["preset"]["hidden"] == 8 and eager["kernels_per_forward"] == 1
    assert eager["kernels"][0]["decoded"]["kind"] == "gemm" and eager["expected"] == ["linear GEMM (+bias)"]
    assert "fusedmlp" in summary["skipped"]
    out = tmp_path / "narrow"
    assert (
        main(
            ["profile", "--preset", "narrow-mlp", "--tokens", "16", "--variants", "eager", "--out", str(out)]
        )
        == 0
    )
    assert _summary(out)["variants"]["eager"]["kernels_per_forward"] == 17  # 9 Linear + 8 ReLU


def test_profile_checks_the_numerics_of_fused_variants(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["profile", *SMALL, "--variants", "eager,fusedmlp", "--out", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("numerics: "))
    assert "fusedmlp output" in line and "ok" in line, line


def test_hf_config_profiles_a_whole_fused_model(tmp_path):
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    config.save_pretrained(tmp_path / "tiny-llama")
    argv = ["--hf-config", str(tmp_path / "tiny-llama"), "--tokens", "8", "--variants", "eager,fusedmlp"]
    assert main(["profile", *argv, "--out", str(tmp_path / "out")]) == 0
    summary = _summary(tmp_path / "out")
    print(summary["notes"]["fusedmlp"])
    assert summary["preset"] is None and "FusedGatedMLP" in summary["notes"]["fusedmlp"]
    counts = {v: s["kernels_per_forward"] for v, s in summary["variants"].items()}
    assert counts["eager"] > counts["fusedmlp"]  # the MLP's GEMMs and pointwise ops are gone
    assert summary["variants"]["eager"]["expected"] is None  # no guess for a whole model


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "eager,bogus"], "unknown variant(s) bogus"),
        (["--hf-config", "no-such-model-type"], "is neither a local"),
        (["--preset", "linear-bias", "--gated"], "gated preset has 2 layers"),
        (["--activation", "swishy"], "swishy"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["profile", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fusedmlp: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")
def test_default_preset_on_cpu_is_small():
    from fusedmlp.profiler.run import resolve_preset

    p = resolve_preset(None)
    assert p.name == "cpu-small" and p.flops < 1e9
