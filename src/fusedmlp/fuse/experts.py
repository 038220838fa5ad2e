"""fuse for mixture-of-experts blocks: the experts module of a Hugging Face MoE block (its
3-D ``gate_up_proj`` / ``down_proj`` parameters, called as ``experts(hidden_states, top_k_index,
top_k_weights)``) becomes a FusedGatedExperts; the router and any shared expert stay as they are
(a shared expert is an ordinary MLP, which the dense matchers fuse).

The proof is the dense one's, on what an experts module is called with: random tokens over the
magnitudes where activations differ, random distinct top-k indices (k from 1 to 4) with one
expert left empty and one taking many tokens, softmax routing weights; the output and the
gradients of the tokens, the routing weights and every weight and bias under the numerics
contract against a float64 copy, in fp32 on a copy with fresh random weights and in the model's
dtype with its own; the state_dict unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..modules.experts import FusedGatedExperts, experts_spec
from ..numerics import ContractCheck, check_contract, state_dict_equal
from .verify import ATOL_EPS, PROOF_SEED, Proof, modes_restored

PROOF_TOKENS = 37


def is_experts(block: nn.Module) -> bool:
    """Whether ``block`` looks like a Hugging Face experts module (3-D gate_up_proj/down_proj)."""
    w, d = getattr(block, "gate_up_proj", None), getattr(block, "down_proj", None)
    return isinstance(w, Tensor) and isinstance(d, Tensor) and w.dim() == 3 and d.dim() == 3


def _forward_arity(block: nn.Module) -> int:
    import inspect

    try:
        return len(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return -1


def _routing(T: int, E: int, k: int, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Distinct top-k experts per token, expert 0 never chosen (an empty expert) and expert 1 in
    every token's choice where k > 1 (a skewed one), softmax weights."""
    scores = torch.rand(T, E, generator=g, device=device)
    scores[:, 0] = -1.0
    if k > 1 and E > 2:
        scores[:, 1] = 2.0
    index = scores.topk(k, dim=1).indices
    weights = torch.softmax(torch.randn(T, k, generator=g, device=device, dtype=torch.float64), -1)
    return index, weights


def _run(module: nn.Module, x: Tensor, index: Tensor, weights: Tensor, dy: Tensor) -> dict[str, Tensor]:
    x = x.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    with torch.enable_grad():
        y = module(x, index, w)
        y.backward(dy.to(y.dtype))
    named = dict(module.named_parameters())
    grads = {n: p.grad for n, p in named.items()}
    if isinstance(module, FusedGatedExperts):  # under the replaced module's names
        probe = copy.copy(module)
        probe._parameters = {n: g for n, g in grads.items()}  # type: ignore[assignment]
        grads = dict(FusedGatedExperts.state_dict(probe))
    module.zero_grad(set_to_none=True)
    return {"y": y.detach(), "d x": x.grad, "d weights": w.grad, **{f"d {n}": g for n, g in grads.items()}}


def _checks(
    name: str, block: nn.Module, fused: nn.Module, dtype: torch.dtype, g: torch.Generator
) -> list[ContractCheck]:
    device = next(block.parameters()).device
    out = []
    E = fused.num_experts  # type: ignore[attr-defined]
    for k in sorted({1, min(2, E), min(4, E)}):
        scales = torch.tensor([1.0, 8.0], device=device, dtype=torch.float64)
        width = fused.hidden_size  # type: ignore[attr-defined]
        x = torch.randn(2 * PROOF_TOKENS, width, generator=g, device=device, dtype=torch.float64)
        x = x * scales.repeat_interleave(PROOF_TOKENS)[:, None]
        index, weights = _routing(x.shape[0], E, k, g, device)
        dy = torch.randn(x.shape, generator=g, device=device, dtype=torch.float64)
        reference = copy.deepcopy(block).double()
        config = getattr(reference, "config", None)
        if hasattr(config, "_experts_implementation"):  # Hugging Face's grouped_mm takes no float64
            config._experts_implementation = "eager"  # type: ignore[union-attr]  # the copy's own config
        r = _run(reference, x, index, weights, dy)
        e = _run(block, x.to(dtype), index, weights.to(dtype), dy)
        f = _run(fused, x.to(dtype), index, weights.to(dtype), dy)
        if list(f) != list(e):
            raise ValueError(f"gradients differ in which tensors they cover: {list(f)} vs {list(e)}")
        out += [check_contract(f"{name}, k={k}: {key}", f[key], e[key], r[key], ATOL_EPS) for key in e]
    return out


def prove_experts(block: nn.Module) -> Proof:
    """Build a FusedGatedExperts for ``block`` and prove it (see the module docstring)."""
    spec = experts_spec(block)
    if isinstance(spec, str):
        return Proof(None, spec)
    if _forward_arity(block) < 3:
        return Proof(None, "its forward takes pre-routed tokens (Llama 4's), not (tokens, indices, weights)")
    param = next(block.parameters())
    if param.device.type == "meta":
        return Proof(None, "weights are on the meta device; load them before fusing")
    if not param.is_floating_point():
        return Proof(None, f"its weights are {param.dtype}: quantized experts are not fused")
    g = torch.Generator(device=param.device).manual_seed(PROOF_SEED)
    try:
        rng = torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else [])
        with modes_restored(block), rng:
            block.eval()
            fused = FusedGatedExperts.from_module(block)
            fused.requires_grad_(param.requires_grad)
            if not state_dict_equal(fused.state_dict(), block.state_dict()):
                return Proof(None, "state_dict would change")
            probe = copy.deepcopy(block).float()
            with torch.no_grad():
                for p in probe.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.5)
            probe.requires_grad_(True)
            probe_fused = FusedGatedExperts.from_module(probe).requires_grad_(True)
            checks = _checks("fp32, random weights", probe, probe_fused, torch.float32, g)
            del probe
            if param.dtype != torch.float32:
                block_grad = copy.deepcopy(block).requires_grad_(True)
                fused_grad = FusedGatedExperts.from_module(block_grad).requires_grad_(True)
                checks += _checks(f"{param.dtype}, model weights", block_grad, fused_grad, param.dtype, g)
    except Exception as e:  # a forward that breaks is a failed proof, not a crash
        return Proof(None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    failed = [c for c in checks if not c.ok]
    if failed:
        return Proof(None, f"outputs differ: {failed[0]}", tuple(checks))
    fused.train(block.training)
    return Proof(fused, "", tuple(checks))
