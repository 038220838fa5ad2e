"""The MoE layer cases of `fusedmlp bench --moe` and `fusedmlp profile --moe` (cases/moe.py,
bench/moe.py) on the CPU: presets, routings, variants sharing one set of weights, the profile
end to end with its numerics check, and the bench record (GPU timing is the device's job)."""

import json

import pytest
import torch

from fusedmlp.cli import main

pytest.importorskip("transformers")
from fusedmlp.cases import moe

TINY = moe.MOE_PRESETS["moe-tiny"]


def test_presets_are_the_issue_sizes():
    q, m = moe.MOE_PRESETS["qwen3-30b-a3b"], moe.MOE_PRESETS["mixtral-8x7b"]
    assert (q.hidden, q.expert_width, q.experts, q.top_k) == (2048, 768, 128, 8)
    assert (m.hidden, m.expert_width, m.experts, m.top_k) == (4096, 14336, 8, 2)
    assert q.flops == 6 * 8192 * 8 * 2048 * 768
    with pytest.raises(ValueError, match="top_k 9 > 8 experts"):
        moe.MoEPreset("bad", "mixtral", 8, 8, 8, 9, 4)
    with pytest.raises(ValueError, match="unknown MoE preset 'nope'"):
        moe.get_moe_preset("nope")


def test_skewed_routing_has_a_hot_expert_and_empty_ones():
    index, weights = moe.routing(TINY, "skewed", torch.device("cpu"), torch.float32)
    counts = torch.bincount(index.reshape(-1), minlength=TINY.experts)
    assert counts[0] >= TINY.tokens // 2 and (counts[-(TINY.experts // 4) :] == 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(TINY.tokens))
    balanced, _ = moe.routing(TINY, "balanced", torch.device("cpu"), torch.float32)
    assert (torch.bincount(balanced.reshape(-1), minlength=TINY.experts) > 0).all()
    with pytest.raises(ValueError, match="unknown routing"):
        moe.routing(TINY, "hot", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", moe.ROUTINGS)
def test_variants_share_weights_and_agree(kind):
    variants, x = moe.build(
        TINY, ["hf", "hf-eager", "fusedmlp", "floor"], torch.device("cpu"), torch.float32, kind
    )
    ref = moe.reference(TINY, x, kind)
    by_name = {v.name: v.module for v in variants}
    with torch.no_grad():
        for name in ("hf", "hf-eager", "fusedmlp"):
            out = by_name[name](x)
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5, name
        gate_up, down = by_name["floor"](x)
    assert gate_up.shape == (TINY.tokens * TINY.top_k, 2 * TINY.expert_width)
    assert down.shape == (TINY.tokens * TINY.top_k, TINY.hidden)
    with pytest.raises(ValueError, match="unknown MoE variant"):
        moe.build(TINY, ["liger"], torch.device("cpu"), torch.float32)


def test_bench_record(monkeypatch):
    """run_case's record: every variant measured (timing stubbed: on a CPU under the interpreter
    it would take minutes; the GPU run measures), errors against float64, ratios to hf."""
    from fusedmlp.bench import moe as bench_moe
    from fusedmlp.bench import run

    calls = iter(range(1, 1000))
    monkeypatch.setattr(
        run, "wall_us", lambda fn, device, **kw: (fn(), {"wall": float(next(calls)), "host": 1.0})[1]
    )
    case = bench_moe.run_case(
        TINY, "skewed", torch.float32, ("floor", "hf", "fusedmlp"), None, train=True, device="cpu"
    )
    assert case["routing"] == "skewed" and case["experts"] == TINY.experts
    v = case["variants"]
    assert set(v) == {"floor", "hf", "fusedmlp"} and not any("error" in r for r in v.values()), v
    assert v["fusedmlp"]["rel_err"] < 1e-5 and v["floor"]["rel_err"] is None
    assert "train_wall_us" in v["fusedmlp"] and "train_wall_us" not in v["floor"]
    assert v["fusedmlp"]["wall_vs_eager"] == v["fusedmlp"]["wall_us"] / v["hf"]["wall_us"]


def test_profile_moe_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "out"
    assert main(["profile", "--moe", "moe-tiny", "--variants", "hf,fusedmlp", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"hf", "fusedmlp"}
    assert "FusedGatedExperts" in summary["notes"]["fusedmlp"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("numerics: "))
    assert "fusedmlp output" in line and line.endswith("ok"), line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "--moe", "moe-tiny", "--variants", "hf,eager"], "unknown MoE variant(s) eager"),
        (["profile", "--moe", "moe-tiny", "--preset", "cpu-small"], "not allowed with argument"),
        (["profile", "--moe", "qwen3"], "invalid choice"),
        (
            ["profile", "--moe", "moe-tiny", "--hidden", "64", "--bias"],
            "--hidden, --bias do not apply to --moe",
        ),
        (
            ["profile", "--hf-config", "llama", "--activation", "gelu"],
            "--activation does not apply to --hf-config",
        ),
        (["bench", "--moe", "moe-tiny", "--preset", "gpt2"], "--moe cannot be combined with --preset"),
        (["bench", "--moe", "moe-tiny", "--seq", "128"], "--seq does not apply without --hf-config"),
    ],
)
def test_bad_moe_flags_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("fusedmlp") and " error: " in err and message in err, err
    assert len(err.strip().splitlines()) == 1
