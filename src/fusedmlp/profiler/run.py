"""Run MLP variants side by side under torch.profiler and save one Chrome trace per variant.

Each variant is warmed up first (torch.compile compiles, Triton autotunes, cuBLAS picks its
kernels), then profiled with schedule(wait=1, warmup=1, active=3): only the 3 active steps are
written, each forward inside a ``fusedmlp/<variant>/forward`` record_function label and
followed by a synchronize, so that one step holds exactly one forward's kernels. The trace
gets our metadata (variant, preset, dtype, peaks) under its top-level ``fusedmlp`` key, which
is what lets ``fusedmlp report`` redo the whole analysis from the file alone.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from ..activations import resolve
from ..cases import variants as V
from ..cases.presets import Preset, default_preset, get_preset
from ..cases.timing import wall_us
from ..cases.variants import Variant
from ..numerics import ContractCheck, check_contract
from .analyze import preset_to_dict
from .trace import add_metadata

WAIT, WARMUP, ACTIVE = 1, 1, 3


class ProfileError(RuntimeError):
    """A run that cannot start: the message says why and what to do."""


def resolve_preset(
    name: str | None,
    tokens: int | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    activation: str | None = None,
    gated: bool | None = None,
    bias: bool | None = None,
) -> Preset:
    """A named preset (default: the machine's), with any shape flag replacing its field."""
    preset = get_preset(name) if name else default_preset()
    changes: dict[str, Any] = {
        k: v
        for k, v in (("hidden", hidden), ("intermediate", intermediate), ("gated", gated), ("bias", bias))
        if v is not None
    }
    if activation is not None:
        changes["activation"] = resolve(activation)
    if changes:
        changes["name"] = "custom"
        changes["description"] = f"from {preset.name}, changed: {', '.join(sorted(changes))}"
        preset = dataclasses.replace(preset, **changes)
    return preset.with_tokens(tokens) if tokens else preset


def build_variants(
    preset: Preset,
    names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    eager: nn.Module | None = None,
) -> list[Variant]:
    """The requested variants of ``preset`` (cases/variants.py), all holding ``eager``'s weights
    (a fresh eager module when not given)."""
    eager = eager if eager is not None else preset.eager(device, dtype).eval()
    try:
        return V.build(preset, names, eager, preset.input(device, dtype))
    except ValueError as e:
        raise ProfileError(str(e)) from None


def hf_variants(
    config: str, names: list[str], device: torch.device, dtype: torch.dtype, tokens: int
) -> tuple[list[Variant], dict[str, torch.Tensor]]:
    """A transformers model from its config (random weights): eager, compiled, and fused by
    ``fusedmlp.fuse``. ``config``: a local config path, or a model type with tiny sizes."""
    import copy

    from ..fuse import fuse

    try:
        from ..cases import hf_models

        model = hf_models.build_model(hf_models.hf_config(config), device, dtype)
    except ImportError:
        raise ProfileError("--hf-config needs transformers (pip install 'fusedmlp[hf]')") from None
    except (ValueError, OSError) as e:
        raise ProfileError(f"--hf-config {config}: {e}") from None
    except Exception as e:  # a config that loads can still name an unknown activation or bad sizes
        raise ProfileError(f"--hf-config {config}: cannot build the model: {type(e).__name__}: {e}") from None
    out = []
    for name in names:
        if name == "eager":
            out.append(Variant(name, model, type(model).__name__))
        elif name == "compile":
            out.append(Variant(name, torch.compile(model), "torch.compile (default mode)"))
        elif name == "fusedmlp":
            fused = copy.deepcopy(model)
            out.append(Variant(name, fused, str(fuse(fused))))
        else:
            out.append(Variant(name, None, f"skipped: {name} is not offered for a whole model"))
    vocab = int(getattr(model.config, "vocab_size", None) or 1000)
    return out, {"input_ids": torch.randint(0, vocab, (1, tokens), device=device)}


def check_numerics(
    preset: Preset, eager: nn.Module, variants: list[Variant], x: torch.Tensor
) -> list[ContractCheck]:
    """Each non-eager variant's output against eager's and a float64 reference, under the numerics
    contract: a profile of a fast but wrong variant would be worth nothing."""
    reference = preset.eager(x.device, torch.float64).eval()
    reference.load_state_dict(eager.state_dict())
    with torch.no_grad():
        want, base = reference(x.double()), eager(x)
        return [
            check_contract(f"{v.name} output", v.module(x), base, want)
            for v in variants
            if v.module is not None and v.name != "eager"
        ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_variant(
    variant: Variant, inputs: Any, device: torch.device, trace_path: Path, metadata: dict[str, Any]
) -> Path:
    """Warm up, time back-to-back forwards (wall, host included: recorded in the metadata, since a
    trace shows each forward synchronized on its own), profile the 3 active steps, write the
    trace with our metadata."""
    assert variant.module is not None
    module = variant.module
    call: Callable[[], object] = (
        (lambda: module(**inputs)) if isinstance(inputs, dict) else (lambda: module(inputs))
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for _ in range(3):
            call()
        _sync(device)
        wall = wall_us(call, device, seconds=0.1)["wall"]
        with profile(
            activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE)
        ) as prof:
            for _ in range(WAIT + WARMUP + ACTIVE):
                with record_function(f"fusedmlp/{variant.name}/forward"):
                    call()
                _sync(device)  # outside the label: the label times CPU dispatch only
                prof.step()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        prof.export_chrome_trace(str(raw))
        meta = {**metadata, "variant": variant.name, "note": variant.note, "wall_us": wall}
        return add_metadata(raw, meta, trace_path)


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    import fusedmlp

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "element_size": torch.empty(0, dtype=dtype).element_size(),
        "torch": torch.__version__,
        "fusedmlp": fusedmlp.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def run_metadata(
    preset: Preset | None, device: torch.device, dtype: torch.dtype, peaks: dict[str, float] | None
) -> dict[str, Any]:
    """What every trace of a run carries under its "fusedmlp" key (the variant is added per trace)."""
    meta = {**environment(device, dtype), "peaks": peaks}
    meta["preset"] = preset_to_dict(preset) if preset else None
    return meta


def run(
    preset: Preset | None,
    variants: list[Variant],
    inputs: Any,
    device: torch.device,
    dtype: torch.dtype,
    trace_dir: Path,
    peaks: dict[str, float] | None,
) -> Iterator[tuple[Variant, Path | None]]:
    """Profile each variant in turn (a generator, so the caller can show progress)."""
    meta = run_metadata(preset, device, dtype, peaks)
    for v in variants:
        if v.module is None:
            yield v, None
            continue
        yield v, profile_variant(v, inputs, device, trace_dir / f"{v.name}.pt.trace.json", meta)
