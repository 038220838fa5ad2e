"""The proof: a candidate replaces a block only if it computes the same function.

Structural guessing is only safe because of this step. For one candidate it checks, in order:
1. the state_dict is unchanged (same keys, order, values): nothing of the block is left out;
2. the block does not behave differently in training (dropout inside the block, batch
   statistics): its output in train mode, with its own output dropout held in eval, must equal
   its eval output bit for bit; an output dropout, found by watching which dropout produced the
   block's output, is kept and applied by the fused module;
3. on fresh random inputs, in fp32 and in the block's dtype, the candidate agrees with the block
   under the numerics contract, against a float64 copy of the block.
Forward only: the fused modules' gradients are held to the contract by their own tests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..numerics import ContractCheck, check_contract, state_dict_equal
from .find import Candidate

# [2, 3, D] inputs: a batch and a sequence dimension, as models call their MLPs, and enough rows
# for errors to show while staying cheap for any block size.
PROOF_LEAD = (2, 3)


@dataclasses.dataclass(frozen=True)
class Proof:
    """The outcome for one candidate: ``module`` is the proven replacement, or None with ``reason``."""

    module: nn.Module | None
    reason: str = ""
    checks: tuple[ContractCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return self.module is not None


@contextlib.contextmanager
def modes_restored(module: nn.Module) -> Iterator[None]:
    """Put back every submodule's train/eval flag on exit."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _output_dropout(block: nn.Module, x: Tensor) -> tuple[Tensor, str | None]:
    """The block's (eval) output on ``x``, and the name of the dropout child that produced it."""
    outputs: dict[str, object] = {}
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, n=name: outputs.__setitem__(n, out))
        for name, child in block.named_children()
        if isinstance(child, _DropoutNd)
    ]
    try:
        y = block(x)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(y, Tensor):
        raise TypeError(f"the block returns {type(y).__name__}, not a tensor")
    return y, next((n for n, out in outputs.items() if out is y), None)


def _changes_in_training(block: nn.Module, x: Tensor, y_eval: Tensor, output_dropout: str | None) -> bool:
    with modes_restored(block):
        block.train()
        if output_dropout is not None:
            block.get_submodule(output_dropout).eval()
        return not torch.equal(block(x), y_eval)


def prove(block: nn.Module, candidate: Candidate) -> Proof:
    """Build ``candidate`` for ``block`` and prove it equivalent (see the module docstring).

    ``block`` is left as it was (weights, train/eval flags); the proof runs without grad. The
    inputs come from a fresh nondeterministic seed (named in a failure, to reproduce it) on a
    private generator, so the caller's random stream is untouched.
    """
    param = next(iter(block.parameters()))
    device, dtype = param.device, param.dtype
    if device.type == "meta":
        return Proof(None, "weights are on the meta device; load them before fusing")
    d = candidate.projections[0].in_features
    generator = torch.Generator()
    seed = generator.seed()
    x64 = torch.randn(*PROOF_LEAD, d, generator=generator, dtype=torch.float64).to(device)
    try:
        # fork_rng: building a fused module initialises weights (before copying), and dropout in
        # train mode draws; neither may move the caller's random stream.
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with modes_restored(block), torch.no_grad(), rng:
            block.eval()
            y, drop_name = _output_dropout(block, x64.to(dtype))
            if _changes_in_training(block, x64.to(dtype), y, drop_name):
                return Proof(None, "output changes in training mode (dropout or batch statistics inside)")
            fused = candidate.build(block, block.get_submodule(drop_name) if drop_name else None)
            if not state_dict_equal(fused.state_dict(), block.state_dict()):
                missing = sorted(set(block.state_dict()) - set(fused.state_dict()))
                return Proof(None, f"state_dict would change (not covered: {missing or 'key order'})")
            reference = copy.deepcopy(block).double()
            checks = []
            for dt in dict.fromkeys((torch.float32, dtype)):
                eager, cand = (
                    (block, fused) if dt == dtype else (copy.deepcopy(m).to(dt) for m in (block, fused))
                )
                x = x64.to(dt)
                checks.append(check_contract(f"output {dt}", cand(x), eager(x), reference(x.double())))
    except Exception as e:  # a guess whose forward breaks is a failed proof, not a crash
        return Proof(None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    failed = [c for c in checks if not c.ok]
    if failed:
        return Proof(None, f"outputs differ (input seed {seed}): {failed[0]}", tuple(checks))
    fused.train(block.training)
    return Proof(fused, "", tuple(checks))
