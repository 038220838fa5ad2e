"""The numerics contract (docs/design.md), as code that tests, benchmarks and ``fuse`` all apply.

A fused result passes when its max and mean absolute error against a float64 reference are at
most twice those of the same-dtype eager computation, plus a small atol (two roundings of the
reference's largest value for the max error, of its mean magnitude for the mean error: at fp32,
where both errors are a few ulps, the max over a matrix otherwise decides on noise, e.g. which
cuBLAS kernel a merged weight-gradient GEMM gets). NaN and Inf must sit where eager puts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float

    @staticmethod
    def of(out: Tensor, ref: Tensor) -> ErrorStats:
        """Errors over the entries where the reference is finite."""
        finite = torch.isfinite(ref)
        if not finite.any():
            return ErrorStats(0.0, 0.0)
        err = (out.double()[finite] - ref.double()[finite]).abs()
        if not torch.isfinite(err).all():
            return ErrorStats(float("inf"), float("inf"))
        return ErrorStats(err.max().item(), err.mean().item())


@dataclasses.dataclass(frozen=True)
class ContractCheck:
    """One comparison under the contract; ``ok`` says whether it passed, ``str`` shows why."""

    name: str
    fused: ErrorStats
    eager: ErrorStats
    atol_max: float
    atol_mean: float
    nonfinite_match: bool

    @property
    def ok(self) -> bool:
        return (
            self.nonfinite_match
            and self.fused.max_abs <= 2 * self.eager.max_abs + self.atol_max
            and self.fused.mean_abs <= 2 * self.eager.mean_abs + self.atol_mean
        )

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: fused max {self.fused.max_abs:.3e} mean {self.fused.mean_abs:.3e} | eager max "
            f"{self.eager.max_abs:.3e} mean {self.eager.mean_abs:.3e} | "
            f"atol {self.atol_max:.1e}/{self.atol_mean:.1e}"
            f"{'' if self.nonfinite_match else ' | NaN/Inf placement differs'} -> {verdict}"
        )


def _nonfinite_pattern(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def check_contract(
    name: str, fused: Tensor, eager: Tensor, reference: Tensor, atol_scale: float = 1.0
) -> ContractCheck:
    """Compare ``fused`` and ``eager`` (same dtype) against a float64 ``reference``.

    atol is two epsilons of the dtype times the reference's largest magnitude for the max error
    (two roundings of the largest value) and times its mean magnitude for the mean error.
    NaN/Inf must sit where eager or the float64 reference puts them (torch's own CPU and CUDA
    kernels disagree at some infinities, e.g. fp32 gelu(inf)).
    """
    if fused.shape != reference.shape or eager.shape != reference.shape:
        raise ValueError(
            f"{name}: shapes differ: fused {tuple(fused.shape)}, eager {tuple(eager.shape)}, "
            f"reference {tuple(reference.shape)}"
        )
    finite = torch.isfinite(reference)
    mags = reference.double()[finite].abs()
    eps = 2 * torch.finfo(eager.dtype).eps * atol_scale
    atol_max = eps * mags.max().item() if mags.numel() else 0.0
    atol_mean = eps * mags.mean().item() if mags.numel() else 0.0
    pattern = _nonfinite_pattern(fused)
    match = any(
        all(torch.equal(a, b) for a, b in zip(pattern, _nonfinite_pattern(other), strict=True))
        for other in (eager, reference)
    )
    return ContractCheck(
        name, ErrorStats.of(fused, reference), ErrorStats.of(eager, reference), atol_max, atol_mean, match
    )


def state_dict_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same keys in the same order, and tensors equal in dtype, shape and every bit."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )
