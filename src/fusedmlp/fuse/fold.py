"""fold: merge adjacent affine layers of nn.Sequential containers into one Linear, for inference.

Linear -> Linear is W2 W1 x + (W2 b1 + b2); a Dropout or Identity in eval between them is the
identity; a BatchNorm1d in eval with running statistics is a per-feature scale and shift. The
merged weight is computed in float64 and cast once, and every fold is proven like fuse (numerics
contract against a float64 copy of the layers, fresh random [rows, features] inputs).

Folding necessarily changes the state_dict: the merged layers' keys go and the Sequential is
renumbered. Fold a model you serve, not one whose checkpoints must keep their layout. A
BatchNorm1d is folded as normalising the last dimension, which is what it does after a Linear
on [N, C] inputs (the 2-D case, as in heads and narrow MLPs).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..numerics import check_contract
from .report import FoldedRun, FoldReport, SkippedRun
from .verify import ATOL_EPS

_PASS_THROUGH = (_DropoutNd, nn.Identity)  # the identity in eval
PROOF_ROWS = 7


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


def _fold_run(layers: list[nn.Module]) -> tuple[nn.Linear | None, str]:
    first = layers[0]
    assert isinstance(first, nn.Linear)
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
    generator = torch.Generator()
    seed = generator.seed()
    x = torch.randn(PROOF_ROWS, w.shape[1], generator=generator).to(p.device, p.dtype)
    with torch.no_grad():
        check = check_contract(
            "output", merged(x), eager(x), copy.deepcopy(eager).double()(x.double()), ATOL_EPS
        )
    if not check.ok:
        return None, f"outputs differ (input seed {seed}): {check}"
    merged.train(False)
    return merged, str(check)


def fold(model: nn.Module) -> FoldReport:
    """Merge, in place, runs of affine layers inside every nn.Sequential of ``model`` (eval only).

    Raises RuntimeError if any module is in training mode: Dropout and BatchNorm1d are affine
    only in eval, and folded layers cannot be trained apart again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    training = [n or "(model)" for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"fold is for inference and merges layers for good; call model.eval() first "
            f"(in training mode: {', '.join(training[:5])}{', ...' if len(training) > 5 else ''})"
        )
    folded: list[FoldedRun] = []
    skipped: list[SkippedRun] = []
    # Deepest and last first: every path and child name in the report is as before folding.
    for path, seq in reversed(list(model.named_modules())):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        layers = list(seq)
        for start, stop in reversed(_runs(layers)):  # from the end, so indices stay valid
            run_names = tuple(names[start:stop])
            merged, check = _fold_run(layers[start:stop])
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
