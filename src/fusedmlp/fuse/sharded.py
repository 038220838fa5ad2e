"""``fuse`` on a block that tensor parallel already sharded, by torch (``parallelize_module`` with
ColwiseParallel on the input projections and RowwiseParallel on the output projection, plain or
with sequence-parallel layouts, a PrepareModuleInput on the block as torchtitan's plans have it)
or by Hugging Face (``tp_plan`` "colwise"/"rowwise", DTensor
weights, forwards patched on the instances): the fused module takes the same local shards,
stacked, under :class:`~fusedmlp.parallel.FusedMLPParallel`.

The proof has two parts. The function: the usual proof (verify.prove) on an unsharded copy of
the block, its weights gathered (one all-gather per weight, during the proof only; every rank
draws the same inputs from the proof's seed, so the ranks decide alike). The wiring: the fused
module, sharded from the block's own local shards (no communication: each rank stacks its
[gate_r; up_r]), runs against the sharded block on the same inputs, output, input gradient and
every weight gradient; plain tensor parallel is tried, then sequence parallel along dim 1, and
the first whose results match is kept. A layout the fused module does not reproduce (other
placements, a 2-D mesh, hooks that are not torch's tensor-parallel ones) is refused with its
reason.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..numerics import ContractCheck, check_contract
from .find import Candidate
from .verify import PROOF_SEED, Proof, forward_backward, modes_restored

# The wiring check compares the same math on the same shards, but a wrong layout (a rank's rows
# summed twice, a gradient n times too large) misses by O(1): atol = 2% of the largest value.
_WIRING_RTOL = 0.02


def _tp_hook(fn: object) -> bool:
    """A hook that torch's tensor-parallel styles installed (distribute_module's lambdas)."""
    return getattr(fn, "__module__", "").startswith("torch.distributed.tensor")


def _hf_tp_forward(fn: object) -> bool:
    """A forward that Hugging Face's tensor parallel patched onto a Linear instance
    (TensorParallelLayer.install_forward in transformers 5)."""
    return getattr(fn, "__module__", "").startswith("transformers.") and getattr(
        fn, "__qualname__", ""
    ).endswith("install_forward.<locals>.tp_forward")


def layout_problem(block: nn.Module, candidate: Candidate) -> str:
    """Why the sharded ``block`` is not the column-then-row split FusedMLPParallel runs; empty
    when it is."""
    params = dict(block.named_parameters())
    if not all(isinstance(p, DTensor) for p in params.values()):
        return "mixes sharded (DTensor) and plain weights"
    meshes = {p.device_mesh for p in params.values()}  # type: ignore[union-attr]
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        return "its weights are not all on one 1-D (tensor-parallel) mesh: fuse before sharding"
    *inputs, output = candidate.projections
    want = {f"{p.name}.weight": (Shard(0),) for p in inputs}
    want |= {f"{p.name}.bias": (Shard(0),) for p in inputs}
    want |= {f"{output.name}.weight": (Shard(1),), f"{output.name}.bias": (Replicate(),)}
    for name, p in params.items():
        if tuple(p.placements) != want.get(name):  # type: ignore[union-attr]
            return (
                f"{name} is sharded as {tuple(p.placements)}, not as ColwiseParallel/RowwiseParallel "  # type: ignore[union-attr]
                "shard an MLP: fuse the unsharded model, then shard it"
            )
    for name, m in block.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if m._backward_hooks or m._backward_pre_hooks or not all(_tp_hook(h) for h in hooks):
            return f"has hooks{f' (on {name})' if name else ''} other than torch's tensor-parallel ones"
        if "forward" in vars(m) and (name == "" or not _hf_tp_forward(vars(m)["forward"])):
            return f"its forward is patched on the instance{f' (on {name})' if name else ''}"
    return ""


def _gathered(block: nn.Module) -> nn.Module:
    """An unsharded copy of ``block``: weights gathered to full tensors, hooks dropped."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)  # type: ignore[union-attr]
        for p in block.parameters()
    }
    copy_ = copy.deepcopy(block, memo)
    for m in copy_.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if _hf_tp_forward(vars(m).get("forward")):
            del m.forward  # the class's forward again
    return copy_


def _wiring(block: nn.Module, cand: nn.Module, x: Tensor, grad_y: Tensor) -> list[ContractCheck] | None:
    got, want = forward_backward(cand, x, grad_y), forward_backward(block, x, grad_y)
    if list(got) != list(want) or any(got[k].shape != want[k].shape for k in want):
        return None
    eps = torch.finfo(x.dtype).eps
    return [
        check_contract(f"tensor-parallel wiring: {k}", got[k], want[k], want[k].double(), _WIRING_RTOL / eps)
        for k in want
    ]


def prove_sharded(block: nn.Module, candidate: Candidate, prove: object) -> Proof:
    """The proof for a block sharded by torch's tensor parallel (module docstring); ``prove``:
    verify.prove, run on the gathered copy."""
    from ..parallel import FusedMLPParallel

    if reason := layout_problem(block, candidate):
        return Proof(None, reason)
    proof = prove(_gathered(block), candidate)  # type: ignore[operator]
    if not proof.ok:
        return Proof(None, f"{proof.reason} (proved on its gathered weights)", proof.checks)
    param = next(iter(block.parameters()))
    mesh, dtype = param.device_mesh, param.dtype  # type: ignore[attr-defined]
    generator = torch.Generator(device=param.device).manual_seed(PROOF_SEED + 1)
    x = torch.randn(2, 8, candidate.projections[0].in_features, generator=generator, device=param.device)
    grad_y = torch.randn(
        2, 8, candidate.projections[-1].out_features, generator=generator, device=param.device
    )
    tried = []
    for sequence_parallel in (False, True):
        style = FusedMLPParallel(sequence_parallel=sequence_parallel, sequence_dim=1)
        style.src_data_rank = None  # each rank keeps its own chunk: no communication
        fused = style._apply(copy.deepcopy(proof.module), mesh)
        with torch.no_grad():
            fused.load_state_dict(block.state_dict())  # the block's own local shards, stacked
        rng = torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else [])
        with rng, modes_restored(block), modes_restored(fused), torch.no_grad():
            block.eval()
            fused.eval()
            try:
                checks = _wiring(block, fused, x.to(dtype), grad_y)
            except Exception as e:  # a layout the fused module cannot take: not this one
                checks, tried = (
                    None,
                    [*tried, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"],
                )
        if checks is not None and all(c.ok for c in checks):
            fused.train(block.training)
            fused.input_name = proof.module.input_name  # type: ignore[union-attr]
            return Proof(fused, "", (*proof.checks, *checks))
        failed = next((c for c in checks or () if not c.ok), None)
        tried.append(f"{'sequence' if sequence_parallel else 'tensor'} parallel: {failed or 'shapes differ'}")
    return Proof(
        None, "its tensor-parallel layout is not one FusedMLPParallel runs (" + "; ".join(tried) + ")"
    )
