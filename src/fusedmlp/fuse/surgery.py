"""fuse and unfuse: one generic walk over the module tree, no per-model code.

Each module is offered to the matchers (``find.MATCHERS``); the first candidate that passes the
proof (``verify.prove``) replaces it in its parent. The replaced module is kept on the fused one,
its own weights dropped to the meta device (the fused module holds the live ones), so that
``unfuse`` can put the original type back with the current weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from ..modules.experts import experts_spec
from . import experts, find, verify
from .report import FusedBlock, FuseReport, SkippedBlock

FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass(frozen=True)
class _Source:
    """The replaced module, weightless. A plain object, so nn.Module does not register it as a
    child (it would add its keys to the state_dict)."""

    module: nn.Module


def _strip(original: nn.Module, keep: nn.Module) -> None:
    """Move ``original``'s parameters and buffers to meta, except those ``keep`` shares with it
    (FusedLinearAct holds the original projection itself)."""
    shared = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    for m in original.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None and id(t) not in shared:
                    meta = t.detach().to("meta")
                    store[name] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta


@dataclasses.dataclass(frozen=True)
class _Sharing:
    """Who holds what, over the whole model: id(parameter) -> ids of the modules holding it
    directly (more than one: tied weights); id(module) -> ids of its parents (more than one: a
    module registered in several places, e.g. one nn.Linear in two blocks)."""

    owners: dict[int, set[int]]
    parents: dict[int, set[int]]

    @staticmethod
    def of(model: nn.Module) -> _Sharing:
        owners: dict[int, set[int]] = {}
        parents: dict[int, set[int]] = {}
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(m))
            for child in m._modules.values():  # every registration, not named_children()'s first
                if child is not None:
                    parents.setdefault(id(child), set()).add(id(m))
        return _Sharing(owners, parents)

    def problem(self, block: nn.Module) -> str:
        """Why ``block`` cannot be swapped alone: a weight or a submodule of it is also used
        outside it (fusing would untie the weight, or leave the other user weightless)."""
        inside = {id(m) for m in block.modules()}
        if any(self.owners.get(id(p), set()) - inside for p in block.parameters()):
            return "shares (ties) weights with modules outside it; fusing would untie them"
        for name, m in block.named_modules(remove_duplicate=False):
            if m is not block and self.parents.get(id(m), set()) - inside:
                return (
                    f"its submodule {name} ({type(m).__name__}) is also used outside it; fusing would "
                    "leave the other user a weightless copy (fuse the blocks apart, or untie them)"
                )
        return ""


def _try_experts(
    block: nn.Module, path: str, sharing: _Sharing
) -> tuple[FusedBlock | SkippedBlock, nn.Module | None]:
    """A mixture-of-experts block's experts module: proven as fuse/experts.py says."""
    spec = experts_spec(block)
    if isinstance(spec, str):
        return SkippedBlock(path, spec, "experts"), None
    _, E, D, H, act, gpt_oss, _ = spec
    kind, act_name = f"experts x{E}", "gpt_oss_swiglu" if gpt_oss else act.value
    shapes = ((D, 2 * H), (H, D))
    if any(type(p).__name__ == "DTensor" for p in block.parameters()):
        reason = "its weights are sharded (DTensor): fuse the unsharded model, then apply ExpertsParallel"
        return SkippedBlock(path, reason, kind, act_name, shapes), None
    if reason := sharing.problem(block) or verify._not_swappable(block):
        return SkippedBlock(path, reason, kind, act_name, shapes), None
    proof = experts.prove_experts(block)
    if proof.module is None:
        return SkippedBlock(path, proof.reason, kind, act_name, shapes), None
    record = FusedBlock(path, kind, act_name, shapes, type(proof.module).__name__, str(proof.checks[-1]))
    return record, proof.module


def _try(
    block: nn.Module, path: str, sharing: _Sharing, parent: nn.Module | None = None, name: str = ""
) -> tuple[FusedBlock | SkippedBlock, nn.Module | None] | None:
    """None when ``block`` is no candidate (or only a guess that failed: not worth reporting);
    else the record and, when proven, the fused module."""
    if experts.is_experts(block):
        return _try_experts(block, path, sharing)
    cands = find.candidates(block)
    if not cands:
        skipped = find.conv_mlp(block)
        return None if skipped is None else (dataclasses.replace(skipped, path=path), None)
    if reason := sharing.problem(block) or verify.call_problem(block, parent, name):
        if all(c.guessed for c in cands):  # nothing but its shapes says it is an MLP: not reported
            return None
        return SkippedBlock(
            path, reason, cands[0].kind.value, cands[0].activation.value, cands[0].shapes
        ), None
    failures = []
    for cand in cands:
        proof = verify.prove(block, cand)
        if proof.ok:
            record = FusedBlock(
                path,
                cand.kind.value,
                cand.activation.value,
                cand.shapes,
                type(proof.module).__name__,  # the proven replacement
                str(proof.checks[-1]),
                float(getattr(proof.module, "hidden_dropout", 0.0)),
            )
            return record, proof.module
        failures.append(f"[{cand.describe()}] {proof.reason}")
        if not proof.checks:  # failed before comparing outputs: no other activation can help
            break
    first = cands[0]
    if all(c.guessed for c in cands):
        unknown = find.block_parts(block).unknown
        if not unknown or len(failures) < len(cands):
            return None  # no sign of an MLP beyond the shapes, or not a forward that fits one
        reason = f"its activation ({', '.join(unknown)}) is none fusedmlp implements; every guess failed"
        return SkippedBlock(path, reason, first.kind.value, "?", first.shapes), None
    return SkippedBlock(
        path, "; ".join(failures), first.kind.value, first.activation.value, first.shapes
    ), None


def fuse(model: nn.Module, *, filter: FilterFn | None = None, dry_run: bool = False) -> FuseReport:
    """Replace, in place, every MLP block of ``model`` that can be proven equivalent.

    ``filter(module, path)`` chooses which modules are examined (as torchao's ``filter_fn``);
    their children are still visited. ``dry_run`` proves but replaces nothing. Weights are not
    modified and the state_dict is unchanged. Already-fused modules are reported and left alone,
    so fusing twice is a no-op. The model itself is never replaced (it has no parent to hold
    the replacement); wrap a bare MLP, e.g. in ``nn.Sequential``, to fuse it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be a callable (module, path) -> bool, got {type(filter).__name__}")
    fused: list[FusedBlock] = []
    skipped: list[SkippedBlock] = []
    sharing = _Sharing.of(model)
    # A module registered under two parents (shared layers) is fused once and both get the result.
    replaced: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): that one hides the second registration of a module.
        for name, child in list(parent._modules.items()):
            path = f"{prefix}{name}"
            if child is None:
                continue
            if id(child) in replaced:
                if not dry_run:
                    setattr(parent, name, replaced[id(child)])
                continue
            if isinstance(child, find.FUSED_TYPES):
                skipped.append(SkippedBlock(path, "already fused"))
                continue
            chosen = filter is None or filter(child, path)
            outcome = _try(child, path, sharing, parent, name) if chosen else None
            if outcome is not None:
                record, module = outcome
                if module is not None:
                    fused.append(record)  # type: ignore[arg-type]
                    replaced[id(child)] = module
                    if not dry_run:
                        _strip(child, keep=module)
                        module._fusedmlp_source = _Source(child)
                        setattr(parent, name, module)
                    continue
                skipped.append(record)  # type: ignore[arg-type]
            visit(child, f"{path}.")

    if find.candidates(model):  # say why a bare MLP passed as the model was left alone
        skipped.append(
            SkippedBlock(
                "(model)",
                "the model itself looks like an MLP block; fuse replaces "
                "submodules in place, so wrap it (e.g. nn.Sequential(model))",
            )
        )
    visit(model, "")
    return FuseReport(tuple(fused), tuple(skipped), dry_run)


def unfuse(model: nn.Module) -> nn.Module:
    """Put back the modules ``fuse`` replaced, with the fused modules' current weights (as trained
    since), on their device and dtype and in their train/eval mode. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse expects an nn.Module, got {type(model).__name__}")
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # every registration, as in fuse
            source = getattr(child, "_fusedmlp_source", None)
            if not isinstance(source, _Source):
                continue
            original = source.module
            # assign=True takes the tensors as they are now (device, dtype), over the meta ones.
            original.load_state_dict(child.state_dict(), assign=True)
            original.train(child.training)
            setattr(parent, name, original)
    return model
