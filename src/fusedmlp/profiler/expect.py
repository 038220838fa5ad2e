"""Guess first, then look: the kernels each variant should run, from the module's structure.

The articles' method: before opening a trace, write down the kernels the code must launch.
An eager gated MLP runs gate GEMM, up GEMM, act, mul, down GEMM (5); torch.compile and Liger fuse
act*mul (4); fusedmlp runs gate|up as one GEMM with bias, activation and product in its epilogue,
then the down GEMM (2). A plain MLP runs fc1 GEMM (bias in the epilogue), act, fc2 GEMM (3);
fusedmlp puts the activation in fc1's epilogue (2). Each expected kernel carries its FLOPs
and bytes from the preset's shapes, which give the achieved TFLOP/s and GB/s once matched to
a kernel of the trace, and the bytes of [tokens, intermediate] tensors it moves.
"""

from __future__ import annotations

import collections
import dataclasses

from ..cases.presets import Preset
from ..cases.variants import PROFILE_VARIANTS
from ..kernels.profile import Cost

try:  # our kernels declare their costs; without Triton there is no guess for fusedmlp
    from ..kernels import gemm_act as k_gemm_act
    from ..kernels import narrow_mlp as k_narrow
except ImportError:  # pragma: no cover - Triton is installed wherever the tests run
    k_gemm_act = k_narrow = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Role:
    """One expected kernel. ``gemm``: a matmul (else memory-bound elementwise work)."""

    label: str
    gemm: bool
    flops: int
    bytes: int
    intermediate_bytes: int  # the part of ``bytes`` that is [tokens, intermediate] tensors


def _gemm(
    label: str,
    m: int,
    k: int,
    n: int,
    e: int,
    bias: bool,
    reads_mid: bool,
    writes_mid: bool,
    n_out: int | None = None,
) -> Role:
    """x[m, k] @ w[k, n] (+ bias) -> [m, n]; ``*_mid``: the input / output is an intermediate.
    ``n_out``: the width actually written, when an epilogue reduces it (gated: n = 2 * n_out)."""
    a, w, out = m * k * e, k * n * e, m * (n if n_out is None else n_out) * e
    return Role(
        label,
        gemm=True,
        flops=2 * m * k * n,
        bytes=a + w + out + (n * e if bias else 0),
        intermediate_bytes=(a if reads_mid else 0) + (out if writes_mid else 0),
    )


def _from_cost(label: str, cost: Cost) -> Role:
    """The role of one of fusedmlp's matrix kernels: its cost as the kernel file declares it."""
    return Role(label, True, cost.flops, cost.bytes, cost.intermediate_bytes)


def _pointwise(label: str, elements: int, tensors: int, flops_per_element: int, e: int) -> Role:
    """Reads ``tensors - 1`` and writes 1 tensor of ``elements`` intermediates. FLOPs are a lower
    bound (one per fused op per element): transcendental functions cost more."""
    moved = elements * tensors * e
    return Role(label, gemm=False, flops=elements * flops_per_element, bytes=moved, intermediate_bytes=moved)


def expected_kernels(preset: Preset, variant: str, element_size: int) -> list[Role] | None:
    """The kernels one forward of ``variant`` should launch, in order; None when we cannot say."""
    m, d, h, e, b = preset.tokens, preset.hidden, preset.intermediate, element_size, preset.bias
    act = preset.activation.value
    if variant not in PROFILE_VARIANTS or (variant == "fusedmlp" and k_gemm_act is None):
        return None
    if preset.layers == 1:  # one Linear: one GEMM, bias in its epilogue, whatever the variant
        return [_gemm("linear GEMM" + (" (+bias)" if b else ""), m, d, h, e, b, False, False)]
    if preset.layers > 2:  # a narrow stack: GEMM and act per layer; fusedmlp: ONE kernel
        shapes = preset.linear_shapes()
        if variant == "fusedmlp":
            return [_from_cost("whole stack, one kernel", k_narrow.forward_cost(m, shapes, b, e))]
        roles: list[Role] = []
        for i, (k, n) in enumerate(shapes):
            last = i == len(shapes) - 1
            roles.append(_gemm(f"layer {i} GEMM", m, k, n, e, b, i > 0, not last))
            if not last:
                roles.append(_pointwise(f"layer {i} {act}", m * n, 2, 1, e))
        return roles
    if variant == "fusedmlp":
        first = f"gate|up GEMM + {act}(gate)*up epilogue" if preset.gated else f"fc1 GEMM + {act} epilogue"
        return [
            _from_cost(first, k_gemm_act.cost(m, d, h, preset.gated, b, e)),
            _gemm("down GEMM" if preset.gated else "fc2 GEMM", m, h, d, e, b, True, False),
        ]
    if not preset.gated:
        return [
            _gemm("fc1 GEMM" + (" (+bias)" if b else ""), m, d, h, e, b, False, True),
            _pointwise(act, m * h, 2, 1, e),
            _gemm("fc2 GEMM" + (" (+bias)" if b else ""), m, h, d, e, b, True, False),
        ]
    down = _gemm("down GEMM", m, h, d, e, b, True, False)
    gate = _gemm("gate GEMM", m, d, h, e, b, False, True)
    up = _gemm("up GEMM", m, d, h, e, b, False, True)
    if variant == "eager":
        return [gate, up, _pointwise(act, m * h, 2, 1, e), _pointwise("mul", m * h, 3, 1, e), down]
    return [gate, up, _pointwise(f"{act}*mul (fused)", m * h, 3, 2, e), down]  # compile, liger


@dataclasses.dataclass
class Match:
    """Expected roles laid against the kernels of one forward (in launch order)."""

    roles: list[Role | None]  # per kernel of the forward: its role, or None if not expected
    missing: list[Role]  # expected, not seen
    notes: list[str]

    @property
    def agrees(self) -> bool:
        return not self.notes


def match(expected: list[Role], kernels_are_gemm: list[bool]) -> Match:
    """Pair kernels with roles in order, GEMMs with GEMM roles and the rest with the rest,
    so one extra or missing elementwise kernel does not shift every GEMM's FLOPs."""
    queues = {g: collections.deque(r for r in expected if r.gemm == g) for g in (True, False)}
    roles: list[Role | None] = [queues[g].popleft() if queues[g] else None for g in kernels_are_gemm]
    missing = [*queues[True], *queues[False]]
    notes = []
    if len(kernels_are_gemm) != len(expected):
        notes.append(f"expected {len(expected)} kernels per forward, the trace shows {len(kernels_are_gemm)}")
    extra = sum(r is None for r in roles)
    if extra:
        notes.append(f"{extra} kernel(s) not in the guess")
    if missing:
        notes.append("expected but not seen: " + ", ".join(r.label for r in missing))
    return Match(roles, missing, notes)
