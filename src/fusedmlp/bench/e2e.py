"""End to end: whole Hugging Face models built from their configs (random weights), timed as a
user runs them: forward (prefill) and training step, wall time with the host included and GPU
time (CUDA-graph replay), peak memory; decode at M=1 with and without CUDA graphs.

Variants: ``eager``; ``compile`` (torch.compile of every transformer layer, regional
compilation: the layers are alike, so one compile serves all and compile time stays within a
device lease; embedding, head and loss run eager in every variant alike); ``fuse``
(fusedmlp.fuse); ``compile(fuse)``; ``liger`` where Liger has the family's MLP (its SwiGLU MLP
in place of each gated MLP, as its monkey patch installs it). Sizes follow the anchors
(../shared/anchors/README.md). transformers is required (the ``hf`` extra).
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..cases import hf_models
from ..cases.timing import graph_us, wall_us
from ..fuse import fuse

VARIANTS = ("eager", "compile", "fuse", "compile(fuse)", "liger")


@dataclasses.dataclass(frozen=True)
class Model:
    """A model family at given sizes (config overrides on the family's defaults) and its input."""

    model_type: str
    sizes: dict[str, Any]
    batch: int
    seq: int
    task: str = "causal"  # "causal" (next-token loss) or "masked" (masked-LM loss)
    decode: bool = False  # also time M=1 forwards


MODELS: dict[str, Model] = {
    "gpt2": Model("gpt2", {}, 16, 1024),  # GPT-2 small: the family's defaults
    "bert-base": Model("bert", {}, 32, 512, task="masked"),
    "qwen2-0.5b-like": Model(
        "qwen2",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 8,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
        },
        8,
        2048,
    ),
    "llama3-8b-2layers": Model(
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 2,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
        2,
        2048,
        decode=True,
    ),
}


def build(spec: Model, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = hf_models.hf_config(spec.model_type, spec.sizes, tiny=False)
    auto = AutoModelForMaskedLM if spec.task == "masked" else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config).to(device=device, dtype=dtype).eval()


def _layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers: the longest nn.ModuleList of one module type."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of layers to compile")
    return max(lists, key=len)


def _liger(model: nn.Module) -> str | None:
    """Each gated SiLU MLP replaced by Liger's LigerSwiGLUMLP holding its weights; None when done,
    else why not."""
    try:
        from liger_kernel.transformers import LigerSwiGLUMLP
    except ImportError:
        return "liger_kernel is not installed"
    config = model.config  # type: ignore[attr-defined]
    if getattr(config, "hidden_act", None) != "silu":
        return "Liger has no kernel for this family's MLP"
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in child.named_children()}:
                cfg = types.SimpleNamespace(
                    hidden_size=child.gate_proj.in_features,
                    intermediate_size=child.gate_proj.out_features,
                    hidden_act="silu",
                )
                liger = LigerSwiGLUMLP(cfg).to(child.gate_proj.weight.device, child.gate_proj.weight.dtype)
                liger.load_state_dict(child.state_dict())
                setattr(parent, name, liger)
                swapped += 1
    return None if swapped else "no gated MLP found"


def variant(base: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """(the model for this variant, a note), or (None, why not)."""
    model = copy.deepcopy(base)
    note = ""
    if name in ("fuse", "compile(fuse)"):
        report = fuse(model)
        reasons = sorted({s.reason for s in report.skipped})
        note = f"fused {len(report.fused)} blocks, skipped {len(report.skipped)}" + (
            f" ({'; '.join(reasons)[:300]})" if reasons else ""
        )
    if name == "liger" and (why := _liger(model)) is not None:
        return None, why
    if name in ("compile", "compile(fuse)"):
        for layer in _layers(model):
            layer.compile()
    return model, note


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        _loss(model, ids).backward()

    return step


def _peak_mib(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _decode(model: nn.Module, one: torch.Tensor, device: str) -> dict[str, float]:
    """M=1 forwards: plain, and under torch.compile(mode="reduce-overhead") (CUDA graphs)."""
    graphed = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        plain = wall_us(lambda: model(input_ids=one, use_cache=False), device, host=False)["wall"]
        replayed = wall_us(lambda: graphed(input_ids=one, use_cache=False), device, host=False)["wall"]
    return {"decode_wall_us": plain, "decode_reduce_overhead_wall_us": replayed}


def _measure(
    model: nn.Module, name: str, note: str, spec: Model, ids: torch.Tensor, train: bool, device: str
) -> dict[str, Any]:
    r: dict[str, Any] = {"note": note}
    with torch.no_grad():
        fwd = lambda: model(input_ids=ids)
        r["fwd_wall_us"] = wall_us(fwd, device, seconds=0.4, host=False)["wall"]
        r["fwd_graph_us"] = graph_us(fwd) if device == "cuda" else None
    if train:
        model.train()
        step = _train_step(model, ids)
        r["train_wall_us"] = wall_us(step, device, seconds=0.8, host=False)["wall"]
        r["train_peak_mib"] = _peak_mib(step) if device == "cuda" else None
        model.eval()
    if spec.decode and name in ("eager", "fuse"):
        r.update(_decode(model, ids[:1, :1], device))
    return r


def run_model(key: str, variants: tuple[str, ...], train: bool, device: str = "cuda") -> dict[str, Any]:
    spec = MODELS[key]
    dtype = torch.bfloat16
    base = build(spec, device, dtype)
    vocab = base.config.vocab_size  # type: ignore[attr-defined]
    ids = torch.randint(3, vocab, (spec.batch, spec.seq), device=device)
    results: dict[str, Any] = {}
    for name in variants:
        model, note = variant(base, name)
        if model is None:
            results[name] = {"skipped": note}
            continue
        try:
            r = _measure(model, name, note, spec, ids, train, device)
        except Exception as e:  # one failing variant must not sink the run: recorded, reported
            first_line = str(e).splitlines()[0] if str(e) else ""
            r = {"note": note, "error": f"{type(e).__name__}: {first_line}"[:300]}
        results[name] = r
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": key,
        "type": spec.model_type,
        "sizes": spec.sizes,
        "batch": spec.batch,
        "seq": spec.seq,
        "variants": results,
    }
