"""Second derivatives through the fused ops (``create_graph=True``: gradient penalties, eikonal
losses of implicit networks, meta-learning).

The kernels' backward computes numbers, not a graph: differentiating its output again would
silently give zero or a wrong result. So every backward of the package asks
:func:`wants_graph` first; where a graph of the gradients is wanted, it recomputes the forward
from the saved inputs with torch's own differentiable ops (the eager reference) and returns
``torch.autograd.grad(..., create_graph=True)`` of it: exact higher derivatives, at eager's
speed and memory, only in the calls that ask for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def wants_graph() -> bool:
    """Whether the running backward must build a graph (grad mode is on inside a backward only
    under ``create_graph=True``)."""
    return torch.is_grad_enabled()


def differentiable_grads(
    forward: Callable[..., Tensor], inputs: Sequence[Tensor | None], grad: Tensor
) -> list[Tensor | None]:
    """d<forward(*inputs), grad> / d inputs, each a differentiable function of ``inputs`` and
    ``grad``; None for an input that is None or needs no gradient (or that y does not use)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not wanted:
        return [None] * len(inputs)
    with torch.enable_grad():
        y = forward(*inputs)
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def no_dropout(dropout: object) -> None:
    """Raise where a dropout of h took part: its mask lives in the kernels (a different random
    stream from any torch op), so no recomputation can reproduce it."""
    if dropout is not None:
        raise RuntimeError(
            "second derivatives (create_graph=True) through fusedmlp's dropout of h are not supported; "
            "use hidden_dropout=0 (dropout=0.0) for this loss"
        )
