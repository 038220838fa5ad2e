"""Options: what training saves (:class:`Recompute`), and the kernel choices (:class:`KernelOptions`).

Kernel options are read when a kernel is chosen (under torch.compile: when the graph is traced).
Set them for a scope with :func:`override` or for the process with :func:`configure`; no
environment variable changes what the library computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator


class Recompute(str, enum.Enum):
    """What training saves for the backward, per token (H = intermediate size, e = bytes per
    element; gated MLPs, halve the gate|up term for plain ones). x is saved in every mode.

    - ``NONE``: gate|up and h, 3H*e: the backward recomputes nothing.
    - ``ACTIVATION``: gate|up, 2H*e: the backward recomputes h in its pointwise kernel (free: that
      kernel reads gate|up anyway). The default.
    - ``GEMM``: nothing beyond x: the backward recomputes gate|up (about a third more backward
      FLOPs), a block of hidden columns at a time, so even inside the backward only
      [tokens, 3H/4] of intermediates live at once: the least memory, and the slowest.

    A forward that no gradient flows through saves nothing, whatever the level.
    """

    NONE = "none"
    ACTIVATION = "activation"
    GEMM = "gemm"

    @property
    def saves_preactivation(self) -> bool:
        return self is not Recompute.GEMM


def resolve_recompute(value: str | Recompute) -> Recompute:
    try:
        return Recompute(value)
    except ValueError:
        known = ", ".join(r.value for r in Recompute)
        raise ValueError(f"unknown recompute mode {value!r}; known: {known}") from None


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Which kernels run.

    ``autotune``: time the candidate configs of each GEMM shape bucket on first use and keep the
    fastest (else the first config that fits: tests, which try many odd shapes once).
    ``fused_backward_gemm``: the backward's dh GEMM with the activation derivative in its
    epilogue (kernels/gemm_act_bwd.py) instead of cuBLAS + the pointwise kernel; off while it
    measures slower (docs/perf-notes.md).
    ``recompute_block_width``: Recompute.GEMM's backward walks blocks of at least this many
    hidden columns (4 blocks where H >= 4x this), so one block's [tokens, 3 * width] lives at a time.
    ``gluon``: on Hopper (sm_90), the forward GEMM + activation without a pre-activation store
    (inference, Recompute.GEMM training) runs the Gluon kernel (kernels/gluon_gemm.py: 0.97-1.02x
    cuBLAS on the merged gate|up GEMM where the tl.dot kernel runs ~0.8x). Opt-in until the
    integrated path has run on the GPU (docs/perf-notes.md).
    """

    autotune: bool = True
    fused_backward_gemm: bool = False
    recompute_block_width: int = 512
    gluon: bool = False

    def __post_init__(self) -> None:
        if self.recompute_block_width < 1:
            raise ValueError(f"recompute_block_width must be >= 1, got {self.recompute_block_width}")


_current = KernelOptions()


def kernel_options() -> KernelOptions:
    return _current


def configure(**changes: object) -> KernelOptions:
    """Change the kernel options for the process; returns the previous ones."""
    global _current
    previous, _current = _current, dataclasses.replace(_current, **changes)  # type: ignore[arg-type]
    return previous


@contextlib.contextmanager
def override(**changes: object) -> Iterator[KernelOptions]:
    """The kernel options with ``changes`` inside the ``with`` block."""
    previous = configure(**changes)
    try:
        yield _current
    finally:
        configure(**dataclasses.asdict(previous))
