"""Benchmark plumbing that runs without a GPU: presets, the CPU profile command, rendering."""

import json

import pytest
import torch

from fusedmlp.bench import report
from fusedmlp.cases.presets import PRESETS, get_preset
from fusedmlp.cli import main


def test_presets_match_the_anchor_shapes():
    p = get_preset("llama3-8b")
    assert (p.tokens, p.hidden, p.intermediate, p.gated, p.activation.value) == (
        4096,
        4096,
        14336,
        True,
        "silu",
    )
    assert p.flops == 2 * 4096 * 4096 * 14336 * 3
    g = get_preset("gpt2")
    assert not g.gated and g.bias and g.flops == 2 * 8192 * 768 * 3072 * 2
    with pytest.raises(ValueError, match="known presets"):
        get_preset("nope")
    assert {"geglu-article", "llama3-8b", "llama3-8b-decode", "gpt2"} <= set(PRESETS)


def test_profile_cli_on_cpu(capsys):
    assert main(["profile", "--preset", "cpu-small", "--tokens", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fusedmlp" in out and "eager" in out and "-> ok" in out


def test_report_rendering(tmp_path):
    record = {
        "env": {"gpu": "X", "torch": torch.__version__, "triton": "t", "commit": "c", "date": "d"},
        "peaks": {"tflops": 700.0, "gbps": 3000.0},
        "cases": [
            {
                "preset": "geglu-article",
                "M": 8192,
                "D": 768,
                "H": 3072,
                "activation": "gelu_tanh",
                "gated": True,
                "bias": False,
                "dtype": "bfloat16",
                "variants": {
                    "floor": {"wall_us": 180.0, "vs_floor": 1.0},
                    "eager": {"wall_us": 260.0, "vs_floor": 260 / 180, "rel_err": 2e-3, "tflops": 440.0},
                    "liger": {"skipped": "not importable"},
                    "fusedmlp": {"wall_us": 200.0, "vs_floor": 200 / 180, "rel_err": 1e-3, "tflops": 580.0},
                },
            }
        ],
    }
    report.write_markdown(record, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "| fusedmlp | 200.0 | 1.11 |" in md and "| liger | skipped |" in md
    report.plot(record, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    json.dumps(record)
