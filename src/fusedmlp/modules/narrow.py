"""FusedSequentialMLP: an nn.Sequential of narrow Linear layers and activations as ONE kernel."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .. import functional
from ..activations import SPECS, Activation, activation_of
from ..kernels import narrow_pack
from .mlp import _OneInput


def _parse_sequential(seq: nn.Module) -> tuple[list[tuple[str, nn.Linear, Activation]], str | None]:
    """([(child name, Linear, its activation)], None) or ([], why the stack cannot be fused).

    Exact nn.Linear only (a subclass may override forward: LoRA, quantised Linears, which we
    cannot prove); activations are the torch modules of the registry (activations.py). An
    activation directly after a Linear belongs to it (nn.Identity anywhere is skipped); a Linear
    followed by another Linear gets the identity.
    """
    if not isinstance(seq, nn.Sequential):
        return [], f"{type(seq).__name__} is not an nn.Sequential"
    layers: list[tuple[str, nn.Linear, Activation]] = []
    for name, child in seq.named_children():
        where = f"layer {name} ({child})"
        act = activation_of(child)
        if type(child) is nn.Linear:
            if max(child.in_features, child.out_features) > narrow_pack.MAX_WIDTH:
                return [], (
                    f"{where}: width {max(child.in_features, child.out_features)} > "
                    f"{narrow_pack.MAX_WIDTH}, the widest a narrow MLP keeps on chip"
                )
            if layers and child.in_features != layers[-1][1].out_features:
                return [], f"{where}: in_features {child.in_features} != previous out_features"
            first = layers[0][1].weight if layers else child.weight
            if child.weight.dtype != first.dtype or child.weight.device != first.device:
                return [], f"{where}: dtype/device differ from layer {layers[0][0]}'s"
            layers.append((name, child, Activation.IDENTITY))
        elif act is not None and any(type(child) is t for spec in SPECS for t, _ in spec.modules):
            if act is Activation.IDENTITY:
                continue
            if not layers:
                return [], f"{where}: an activation before the first nn.Linear"
            if layers[-1][2] is not Activation.IDENTITY:
                return [], f"{where}: a second activation after layer {layers[-1][0]}"
            layers[-1] = (*layers[-1][:2], act)
        else:
            known = sorted({t.__name__ for spec in SPECS for t, _ in spec.modules} | {"Linear"})
            return [], f"{where}: unsupported module {type(child).__name__} (supported: {', '.join(known)})"
    if not layers:
        return [], "the nn.Sequential holds no nn.Linear"
    return layers, None


def sequential_unsupported_reason(seq: nn.Module) -> str | None:
    """Why :meth:`FusedSequentialMLP.from_module` would refuse ``seq``; None when it accepts it."""
    return _parse_sequential(seq)[1]


def can_fuse_sequential(seq: nn.Module) -> bool:
    """Whether :meth:`FusedSequentialMLP.from_module` accepts ``seq``
    (:func:`sequential_unsupported_reason` says why not)."""
    return sequential_unsupported_reason(seq) is None


class FusedSequentialMLP(_OneInput):
    """An nn.Sequential of nn.Linear layers (every width <= 256) and activations, run as ONE kernel.

    The Linear layers are kept as children under their Sequential indices, so ``state_dict`` keys
    and values are the Sequential's (``0.weight``, ``0.bias``, ``2.weight``, ...). The kernel wants
    the weights packed into one zero-padded [L, P, P] buffer: in training (gradients wanted) the
    packing is redone each call (one autograd node), so the gradients land on the
    per-layer parameters; otherwise the packed buffer (with the validated widths) is cached and
    reused while the same parameter objects are there, unchanged (their ``_version`` and address),
    and a call checks only x.
    Writes through ``p.data`` bypass the version counter: call :meth:`invalidate_packed` after
    those.
    """

    def __init__(self, layers: list[tuple[str, nn.Linear, Activation]]) -> None:
        super().__init__()
        for name, linear, _ in layers:
            self.add_module(name, linear)
        self.activations = [act for _, _, act in layers]
        self._names = [name for name, _, _ in layers]
        # ((parameter, its version, its address) per parameter, (w, b, widths, names))
        self._packed: tuple[tuple[tuple[Tensor, int, int], ...], tuple] | None = None

    @classmethod
    def from_module(cls, seq: nn.Sequential) -> FusedSequentialMLP:
        """A fused copy of ``seq`` (its current weights, device and dtype); ValueError naming the
        first layer that cannot be fused and why."""
        layers, why = _parse_sequential(seq)
        if why is not None:
            raise ValueError(f"cannot fuse {type(seq).__name__}: {why}")
        return cls([(name, copy.deepcopy(linear), act) for name, linear, act in layers])

    @property
    def linears(self) -> list[nn.Linear]:
        return [self._modules[n] for n in self._names]  # type: ignore[misc]

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def extra_repr(self) -> str:
        return "activations=(" + ", ".join(a.value for a in self.activations) + ")"

    def invalidate_packed(self) -> None:
        self._packed = None

    def _packed_params(
        self, weights: list[Tensor], biases: list[Tensor | None], params: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[int], str]:
        """(w, b, widths, names) for the kernel, validated and packed once per parameter state.

        The cache holds the parameter objects themselves and is reused only while the same
        objects, at the same version and address, are there: a new tensor that happens to get a
        freed one's address (a swap, load_state_dict(assign=True)) is a different object, an
        in-place update (an optimizer step, copy_) bumps the version."""
        cached = self._packed
        if (
            cached is None
            or len(cached[0]) != len(params)
            or not all(
                p is q and v == p._version and a == p.data_ptr()
                for p, (q, v, a) in zip(params, cached[0], strict=True)
            )
        ):
            widths, names = functional.narrow_spec(weights, biases, self.activations)
            first = weights[0]
            for name, m in zip(self._names, self.linears, strict=True):
                for kind, p in (("weight", m.weight), ("bias", m.bias)):
                    if p is not None and (p.dtype, p.device) != (first.dtype, first.device):
                        raise TypeError(
                            f"{name}.{kind} is {p.dtype} on {p.device} but {self._names[0]}.weight is "
                            f"{first.dtype} on {first.device}: the parameters must share one dtype and device"
                        )
            with torch.no_grad():
                w, b = functional.pack_narrow_mlp(weights, biases)
            state = tuple((p, p._version, p.data_ptr()) for p in params)
            cached = self._packed = (state, (w, b, widths, names))
        return cached[1]

    def forward(self, x: Tensor | None = None, **named: Tensor) -> Tensor:
        if named or x is None:
            x = self._input(x, named)
        linears = self.linears
        weights = [m.weight for m in linears]
        biases = [m.bias for m in linears]
        params = [p for p in (*weights, *biases) if p is not None]
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for p in params)
        ):
            # training (or tracing): pack per call, differentiably, so gradients reach each layer
            return functional.narrow_mlp(x, weights, biases, self.activations)
        # inference: the packed parameters are cached; only x is checked per call (host time)
        return functional.narrow_mlp_packed(x, *self._packed_params(weights, biases, params))
