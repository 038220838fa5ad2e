"""Mixture-of-experts layers side by side (issue 18's targets), on the GPU.

    PYTHONPATH=src python3 benchmarks/moe_bench.py [--out DIR] [--tokens 8192] [--preset NAME]

For each preset (Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b expert sizes, routed top-k) and
balanced and skewed routing: Hugging Face's experts module as the model runs it (its default
experts implementation, and "eager", the Python loop over experts), the floor (the two grouped
GEMMs alone through ``torch._grouped_mm``, the activation free), torch.compile of the eager
experts, and FusedGatedExperts; forward and forward+backward, wall time through the host
(back-to-back calls) and GPU time (CUDA graphs, where the variant can be captured), peak memory
of a training step. With --out, writes DIR/moe-bench-<UTC stamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
from pathlib import Path

import torch

from fusedmlp.cases.timing import graph_us, wall_us
from fusedmlp.modules.experts import FusedGatedExperts


@dataclasses.dataclass(frozen=True)
class MoEPreset:
    name: str
    model_type: str  # the transformers experts class whose layer this is
    hidden: int
    expert_width: int
    experts: int
    top_k: int


EXPERTS_CLASSES = {"qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts", "gpt_oss": "GptOssExperts"}
PRESETS = {
    p.name: p
    for p in (
        MoEPreset("qwen3-30b-a3b", "qwen3_moe", 2048, 768, 128, 8),
        MoEPreset("mixtral-8x7b", "mixtral", 4096, 14336, 8, 2),
        MoEPreset("gpt-oss-20b", "gpt_oss", 2880, 2880, 32, 4),
    )
}


def hf_experts(p: MoEPreset, implementation: str | None) -> torch.nn.Module:
    from transformers import AutoConfig

    overrides = {"hidden_size": p.hidden, "num_experts_per_tok": p.top_k}
    if p.model_type == "qwen3_moe":
        overrides |= {"moe_intermediate_size": p.expert_width, "num_experts": p.experts}
    else:
        overrides |= {"intermediate_size": p.expert_width, "num_local_experts": p.experts}
    config = AutoConfig.for_model(p.model_type, **overrides)
    if implementation is not None:
        config._experts_implementation = implementation
    module = importlib.import_module(f"transformers.models.{p.model_type}.modeling_{p.model_type}")
    cls = getattr(module, EXPERTS_CLASSES[p.model_type])
    experts = cls(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for t in experts.parameters():
            t.normal_(0, 0.02)
    return experts


def routing(T: int, p: MoEPreset, skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(T, p.experts, generator=g, device="cuda")
    if skewed:  # one expert takes half the tokens; the last quarter of the experts get none
        scores[: T // 2, 0] = 2.0
        scores[:, -(p.experts // 4) :] = -1.0
    index = scores.topk(p.top_k, dim=1).indices
    weights = torch.softmax(torch.randn(T, p.top_k, generator=g, device="cuda"), -1).to(torch.bfloat16)
    return index, weights


def floor_fn(x, index, weights, w_gu, w_down):
    """The two grouped GEMMs alone (tokens already sorted by expert; the activation free)."""
    E = w_gu.shape[0]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // index.shape[1]]

    def run():
        h = torch._grouped_mm(xs, w_gu.transpose(1, 2), offs=offs)[:, : w_down.shape[2]]
        return torch._grouped_mm(h.contiguous(), w_down.transpose(1, 2), offs=offs)

    return run


def measure(fn, train: bool) -> dict[str, float | None]:
    times = wall_us(fn, "cuda", host=False)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {
        "wall_us": times["wall"],
        "gpu_us": graph_us(fn),
        "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if train else None,
    }


def run_preset(p: MoEPreset, T: int, rows: list[dict], save) -> None:
    for skewed in (False, True):
        index, weights = routing(T, p, skewed)
        x = torch.randn(T, p.hidden, device="cuda", dtype=torch.bfloat16)
        default = hf_experts(p, None)
        variants = {
            "hf (default experts implementation)": default,
            "hf eager (loop over experts)": hf_experts(p, "eager"),
            "fusedmlp": FusedGatedExperts.from_module(default),
        }
        variants["torch.compile(hf eager)"] = torch.compile(variants["hf eager (loop over experts)"])
        for name, m in variants.items():
            for train in (False, True):
                xx = x.clone().requires_grad_(train)

                def step(m=m, xx=xx, train=train, index=index, weights=weights):
                    if not train:
                        with torch.no_grad():
                            return m(xx, index, weights)
                    y = m(xx, index, weights)
                    y.float().square().mean().backward()
                    return y

                try:
                    r = measure(step, train)
                except Exception as e:  # a variant that fails is reported, not fatal
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                rows.append(
                    {
                        "preset": p.name,
                        "tokens": T,
                        "skewed": skewed,
                        "variant": name,
                        "mode": "train" if train else "forward",
                        **r,
                    }
                )
                print(rows[-1], flush=True)
                save()
        if hasattr(torch, "_grouped_mm") and p.model_type != "gpt_oss":
            f = variants["fusedmlp"]
            w_gu = f.gate_up.detach().flatten(1, 2).contiguous()
            fn = floor_fn(x, index, weights, w_gu, f.down.detach())
            floor = "floor: 2 x torch._grouped_mm"
            rows.append(
                {
                    "preset": p.name,
                    "tokens": T,
                    "skewed": skewed,
                    "variant": floor,
                    "mode": "forward",
                    **measure(fn, False),
                }
            )
            print(rows[-1], flush=True)
            save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append")
    a = ap.parse_args()
    rows: list[dict] = []
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = Path(a.out) / f"moe-bench-{stamp}.json" if a.out else None

    def save() -> None:  # after every row, so that a run cut short keeps what it measured
        if path is not None:
            path.write_text(json.dumps({"env": env, "rows": rows}, indent=1, allow_nan=False))

    for name in a.preset or sorted(PRESETS):
        run_preset(PRESETS[name], a.tokens, rows, save)
    if path is not None:
        print("wrote", path)


if __name__ == "__main__":
    main()
