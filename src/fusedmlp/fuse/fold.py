"""fold: merge adjacent affine layers of nn.Sequential containers into one Linear, for inference.

Linear -> Linear is W2 W1 x + (W2 b1 + b2); a Dropout or Identity in eval between them is the
identity; a BatchNorm1d in eval with running statistics is a per-feature scale and shift. The
merged weight is computed in float64 and cast once, and every fold is proven like fuse (numerics
contract against a float64 copy of the layers, seeded random inputs spanning small to large
magnitudes).

A Linear acts on the last dimension whatever the input's rank, so Linear/Dropout runs fold for
every input. A BatchNorm1d normalises dimension 1: the last one only on 2-D [N, C] inputs (heads,
narrow MLPs); on [N, C, L] it normalises C while the Linear mixed L. A run holding a
BatchNorm1d therefore folds only when ``example_inputs`` show the shapes the run really sees,
and the proof runs on those shapes; without them, or where the model never reaches the run, it
is refused with the reason.

Folding necessarily changes the state_dict: the merged layers' keys go and the Sequential is
renumbered. Fold a model you serve, not one whose checkpoints must keep their layout.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..numerics import check_contract
from .report import FoldedRun, FoldReport, SkippedRun
from .verify import ATOL_EPS, PROOF_SCALES, PROOF_SEED

_PASS_THROUGH = (_DropoutNd, nn.Identity)  # the identity in eval
PROOF_ROWS = 7
Shape = tuple[int, ...]


def _foldable_bn(m: nn.Module, features: int) -> bool:
    return (
        isinstance(m, nn.BatchNorm1d)
        and m.running_mean is not None
        and m.running_var is not None
        and m.num_features == features
    )


def _runs(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """[start, stop) index ranges: a Linear, then Linears/BatchNorm1ds with pass-throughs between,
    holding at least two affine layers. A trailing pass-through stays outside the run."""
    runs = []
    i = 0
    while i < len(layers):
        if not isinstance(layers[i], nn.Linear):
            i += 1
            continue
        features, stop, affine, j = layers[i].out_features, i + 1, 1, i + 1
        while j < len(layers):
            m = layers[j]
            if isinstance(m, _PASS_THROUGH):
                j += 1
                continue
            if isinstance(m, nn.Linear) and m.in_features == features:
                features = m.out_features
            elif not _foldable_bn(m, features):
                break
            affine, j, stop = affine + 1, j + 1, j + 1
        if affine >= 2:
            runs.append((i, stop))
        i = max(stop, i + 1)
    return runs


def _compose(layers: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of the whole run, in float64."""
    first = layers[0]
    assert isinstance(first, nn.Linear)
    w = first.weight.double()
    b = first.bias.double() if first.bias is not None else w.new_zeros(w.shape[0])
    for m in layers[1:]:
        if isinstance(m, nn.Linear):
            w2 = m.weight.double()
            w, b = w2 @ w, w2 @ b + (m.bias.double() if m.bias is not None else 0.0)
        elif isinstance(m, nn.BatchNorm1d):
            scale = (m.running_var.double() + m.eps).rsqrt()  # type: ignore[union-attr]
            shift = -m.running_mean.double() * scale  # type: ignore[union-attr]
            if m.affine:
                scale, shift = scale * m.weight.double(), shift * m.weight.double() + m.bias.double()
            w, b = scale[:, None] * w, scale * b + shift
    return w, b


def _proof_shapes(layers: list[nn.Module], seen: set[Shape] | None) -> list[Shape] | str:
    """The input shapes to prove a run on (leading dimension cut to PROOF_ROWS), or why none."""
    features = layers[0].in_features  # type: ignore[union-attr]
    if not any(isinstance(m, nn.BatchNorm1d) for m in layers):
        return [(PROOF_ROWS, features)]  # rank-independent: each row is mapped alone
    if seen is None:
        return (
            "holds a BatchNorm1d, which normalises dim 1 (the features only on 2-D inputs): "
            "pass example_inputs to fold to prove the ranks the model uses"
        )
    if not seen:
        return "holds a BatchNorm1d and the example inputs never reach it"
    return sorted({(min(s[0], PROOF_ROWS), *s[1:]) for s in seen})


def _fold_run(layers: list[nn.Module], seen: set[Shape] | None) -> tuple[nn.Linear | None, str]:
    first = layers[0]
    assert isinstance(first, nn.Linear)
    shapes = _proof_shapes(layers, seen)
    if isinstance(shapes, str):
        return None, shapes
    w, b = _compose(layers)
    has_bias = any(getattr(m, "bias", None) is not None for m in layers) or any(
        isinstance(m, nn.BatchNorm1d) for m in layers
    )
    p = first.weight
    merged = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        merged.weight.copy_(w)
        if merged.bias is not None:
            merged.bias.copy_(b)
    eager = nn.Sequential(*layers)
    reference = copy.deepcopy(eager).double()
    generator = torch.Generator().manual_seed(PROOF_SEED)
    checks = []
    for shape in shapes:
        for scale in PROOF_SCALES:
            x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(p.device)
            where = f"input {list(shape)} x{scale:g}"
            try:
                with torch.no_grad():
                    y, y_eager, y_ref = merged(x.to(p.dtype)), eager(x.to(p.dtype)), reference(x)
            except RuntimeError as e:  # the layers reject this shape: the model never sees it folded
                return None, f"{where}: {str(e).splitlines()[0]}"[:200]
            if y.shape != y_eager.shape:
                return None, f"{where}: output shape {list(y_eager.shape)}, folded {list(y.shape)}"
            check = check_contract(f"output ({where})", y, y_eager, y_ref, ATOL_EPS)
            if not check.ok:
                return None, f"outputs differ: {check}"
            checks.append(check)
    merged.train(False)
    return merged, str(checks[-1])


def _seen_shapes(
    model: nn.Module, firsts: list[nn.Module], example_inputs: tuple[Any, ...] | Mapping[str, Any]
) -> dict[int, set[Shape]]:
    """The input shapes each of ``firsts`` (keyed by id) receives when ``model`` runs on the example."""
    seen: dict[int, set[Shape]] = {id(m): set() for m in firsts}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            seen[id(module)].add(tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in firsts]
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def fold(
    model: nn.Module, example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None
) -> FoldReport:
    """Merge, in place, runs of affine layers inside every nn.Sequential of ``model`` (eval only).

    ``example_inputs`` (positional arguments as a tuple, or keyword arguments as a dict) are run
    through the model once to see the input shapes of each run: runs holding a BatchNorm1d are
    proven on those and refused without them. Raises RuntimeError if any module is in training
    mode: Dropout and BatchNorm1d are affine only in eval, and folded layers cannot be trained
    apart again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    training = [n or "(model)" for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"fold is for inference and merges layers for good; call model.eval() first "
            f"(in training mode: {', '.join(training[:5])}{', ...' if len(training) > 5 else ''})"
        )
    if example_inputs is not None and not isinstance(example_inputs, (tuple, Mapping)):
        example_inputs = (example_inputs,)  # one tensor
    sequentials = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Sequential)]
    runs = {id(seq): _runs(list(seq)) for _, seq in sequentials}
    seen = None
    if example_inputs is not None:  # before any change: the shapes of the model as given
        firsts = [seq[start] for _, seq in sequentials for start, _ in runs[id(seq)]]
        seen = _seen_shapes(model, firsts, example_inputs)
    folded: list[FoldedRun] = []
    skipped: list[SkippedRun] = []
    # Deepest and last first: every path and child name in the report is as before folding.
    for path, seq in reversed(sequentials):
        names = list(seq._modules)
        layers = list(seq)
        for start, stop in reversed(runs[id(seq)]):  # from the end, so indices stay valid
            run_names = tuple(names[start:stop])
            run_seen = None if seen is None else seen[id(layers[start])]
            merged, check = _fold_run(layers[start:stop], run_seen)
            if merged is None:
                skipped.append(SkippedRun(path, run_names, check))
                continue
            folded.append(
                FoldedRun(
                    path,
                    run_names,
                    tuple(type(m).__name__ for m in layers[start:stop]),
                    (merged.in_features, merged.out_features),
                    check,
                )
            )
            for i in reversed(range(start + 1, stop)):
                del seq[i]  # Sequential renumbers its children after a deletion
            seq[start] = merged
    return FoldReport(tuple(reversed(folded)), tuple(reversed(skipped)))
