"""Structural detection: which modules look like MLP blocks, and the fused module for each guess.

A guess is cheap and may be wrong; ``verify.prove`` decides. Nothing here looks at class names
of models: a block is recognised by its direct children (projections whose shapes chain, an
activation) and the registration order of those children, which is also its state_dict order.

``MATCHERS`` is the hook point: each matcher maps a block (and its projections and activations,
pre-read as ``BlockParts``) to candidates. A matcher for deeper narrow stacks
(FusedSequentialMLP: an nn.Sequential of Linear/activation pairs) is meant to be appended there;
the proof and the swap need nothing more from it than a ``Candidate``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..activations import Activation, activation_of
from ..families import declared_activations
from ..modules import (
    WITH_OUTPUT_DROPOUT,
    FusedGatedMLP,
    FusedLinearAct,
    FusedMLP,
    FusedSequentialMLP,
    StateLayout,
    can_fuse_sequential,
    linear_params,
)
from .report import SkippedBlock


class BlockKind(str, enum.Enum):
    GATED = "gated"  # down(act(gate(x)) * up(x)), gate|up apart or merged
    PLAIN = "plain"  # fc2(act(fc1(x)))
    LINEAR_ACT = "linear_act"  # act(proj(x)), the second projection lives elsewhere
    NARROW = "narrow"  # nn.Sequential of 3+ Linears (widths <= 256) and activations: one kernel


@dataclasses.dataclass(frozen=True)
class Projection:
    """A direct child that is an nn.Linear or a Hugging Face Conv1D."""

    name: str
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One guess: ``build(block, dropout, hidden_dropout)`` returns the fused module that should
    compute what ``block`` does; ``dropout`` is the block's own output dropout (or None), applied
    last, ``hidden_dropout`` the p of its dropout of h (0.0: none)."""

    kind: BlockKind
    activation: Activation
    projections: tuple[Projection, ...]
    guessed: bool  # the block itself holds no activation: named by its config, or a common one tried
    build: Callable[[nn.Module, nn.Module | None, float], nn.Module] = dataclasses.field(
        compare=False, repr=False
    )

    @property
    def fuses_hidden_dropout(self) -> bool:
        """Whether the fused module applies a dropout of h in its kernels (gated and plain MLPs)."""
        return self.kind in (BlockKind.GATED, BlockKind.PLAIN)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.in_features, p.out_features) for p in self.projections)

    def describe(self) -> str:
        names = "/".join(p.name for p in self.projections)
        return f"{self.kind.value} {names} {self.activation.value}"


@dataclasses.dataclass(frozen=True)
class BlockParts:
    """What a matcher sees: the projections in registration order and the activations found.

    ``explicit`` activations are children or attributes of the block; ``from_config`` come only
    from a ``config`` attribute (hidden_act) and do not on their own make a lone projection
    an MLP, or every module holding a config would look like one. A block that names none
    (``F.gelu`` called inside forward) gets every activation as a guess, for the proof to pick.
    """

    projections: tuple[Projection, ...]
    explicit: tuple[Activation, ...]
    from_config: tuple[Activation, ...]
    unknown: tuple[str, ...] = ()  # stateless children we cannot name (CLIP's QuickGELU, say)

    @property
    def guessed(self) -> bool:
        return not self.explicit

    @property
    def activations(self) -> tuple[Activation, ...]:
        if not (self.explicit or self.from_config):
            return GUESS_ORDER
        return tuple(dict.fromkeys((*self.explicit, *self.from_config)))


# Most common first. gelu_tanh comes before gelu, and the proof's fp32 check tells them apart.
GUESS_ORDER = (
    Activation.SILU,
    Activation.GELU_TANH,
    Activation.GELU,
    Activation.RELU,
    Activation.RELU2,
    Activation.SIGMOID,
)


Matcher = Callable[[nn.Module, BlockParts], list[Candidate]]


def _projection(name: str, child: nn.Module) -> Projection | None:
    is_proj = isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D"
    if not is_proj or not isinstance(getattr(child, "weight", None), Tensor):
        return None
    try:
        weight, _, _ = linear_params(child)
    except ValueError:
        return None
    return Projection(name, weight.shape[1], weight.shape[0])


def block_parts(block: nn.Module) -> BlockParts:
    projections = []
    unknown: list[str] = []
    for name, child in block.named_children():
        proj = _projection(name, child)
        if proj is not None:
            projections.append(proj)
        elif activation_of(child) is None and not isinstance(child, _DropoutNd) and not child.state_dict():
            unknown.append(type(child).__name__)  # stateless, and not one we can name
    declared = declared_activations(block)
    # Identity is no activation to fuse, and a Sequential's positional activation is explicit.
    keep = lambda acts: tuple(a for a in acts if a is not Activation.IDENTITY)
    return BlockParts(tuple(projections), keep(declared.explicit), keep(declared.from_config), tuple(unknown))


FUSED_TYPES = (FusedGatedMLP, FusedMLP, FusedLinearAct)


def _build(
    cls: type[nn.Module], block: nn.Module, dropout: nn.Module | None, hidden_dropout: float, **kwargs: Any
) -> nn.Module:
    if hidden_dropout:
        kwargs["hidden_dropout"] = hidden_dropout
    module: nn.Module = (cls if dropout is None else WITH_OUTPUT_DROPOUT[cls]).from_module(block, **kwargs)  # type: ignore[attr-defined]
    if dropout is not None:
        module.dropout = dropout
    module.training = block.training  # the block's mode, not a fresh module's train mode
    return module


def _layout(inputs: tuple[Projection, ...], output: Projection) -> StateLayout:
    return StateLayout(tuple(p.name for p in inputs), output.name)


def match_gated(_block: nn.Module, parts: BlockParts) -> list[Candidate]:
    """gate, up [D->H] and down [H->D'] in that registration order; or merged gate_up [D->2H], down."""
    projs = parts.projections
    if len(projs) == 3:
        gate, up, down = projs
        chains = (gate.in_features, gate.out_features) == (up.in_features, up.out_features)
        if not (chains and down.in_features == gate.out_features):
            return []
    elif len(projs) == 2:
        gate_up, down = projs
        if gate_up.out_features != 2 * down.in_features:
            return []
    else:
        return []
    layout = _layout(projs[:-1], projs[-1])
    return [
        Candidate(
            BlockKind.GATED,
            act,
            projs,
            parts.guessed,
            lambda b, d, p, a=act: _build(FusedGatedMLP, b, d, p, activation=a, layout=layout),
        )
        for act in parts.activations
    ]


def match_plain(_block: nn.Module, parts: BlockParts) -> list[Candidate]:
    """fc1 [D->H] then fc2 [H->D'] in registration order."""
    if len(parts.projections) != 2:
        return []
    fc1, fc2 = parts.projections
    if fc1.out_features != fc2.in_features:
        return []
    layout = _layout((fc1,), fc2)
    return [
        Candidate(
            BlockKind.PLAIN,
            act,
            parts.projections,
            parts.guessed,
            lambda b, d, p, a=act: _build(FusedMLP, b, d, p, activation=a, layout=layout),
        )
        for act in parts.activations
    ]


def match_linear_act(_block: nn.Module, parts: BlockParts) -> list[Candidate]:
    """One projection and an activation held by the block itself (not only named in its config)."""
    if len(parts.projections) != 1:
        return []
    (proj,) = parts.projections
    return [
        Candidate(
            BlockKind.LINEAR_ACT,
            act,
            parts.projections,
            False,
            lambda b, d, p, a=act: _build(FusedLinearAct, b, d, p, name=proj.name, activation=a),
        )
        for act in parts.explicit
    ]


def match_narrow_stack(block: nn.Module, parts: BlockParts) -> list[Candidate]:
    """An nn.Sequential of three or more Linear layers, every width <= 256, with activations
    between them: the whole stack as one FusedSequentialMLP kernel. Two-Linear stacks are left
    to match_plain (FusedMLP)."""
    if not isinstance(block, nn.Sequential) or len(parts.projections) < 3 or not can_fuse_sequential(block):
        return []
    act = next(iter(parts.explicit), Activation.IDENTITY)
    return [
        Candidate(
            BlockKind.NARROW,
            act,
            parts.projections,
            False,
            lambda b, d, p: FusedSequentialMLP.from_module(b),
        )
    ]


MATCHERS: list[Matcher] = [match_narrow_stack, match_gated, match_plain, match_linear_act]


def conv_mlp(block: nn.Module) -> SkippedBlock | None:
    """The report line for an MLP of pointwise (1x1) convolutions on channels-first maps (timm's
    ConvMlp, ConvNeXt with conv_mlp, PoolFormer, SwiftFormer, EfficientFormer): a look-alike
    fusedmlp does not fuse, reported so that a user sees why it stayed."""
    convs = [
        (name, c)
        for name, c in block.named_children()
        if isinstance(c, (nn.Conv1d, nn.Conv2d)) and set(c.kernel_size) == {1} and c.groups == 1
    ]
    acts = declared_activations(block).explicit
    if len(convs) < 2 or not acts or block._parameters:
        return None
    conv_ids = {id(c) for _, c in convs}
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    if any(c.state_dict() and id(c) not in conv_ids and not isinstance(c, norms) for c in block.children()):
        return None  # holds more than pointwise convolutions and norms: a larger block
    names = "/".join(n for n, _ in convs)
    return SkippedBlock(
        "",
        f"an MLP of 1x1 convolutions ({names}) on channels-first maps: fusedmlp fuses nn.Linear "
        "projections (channels-last) only",
        "conv",
        acts[0].value,
        tuple((c.in_channels, c.out_channels) for _, c in convs),
    )


def candidates(block: nn.Module) -> list[Candidate]:
    """Every guess the matchers make for ``block``, most specific first."""
    parts = block_parts(block)
    if not parts.projections:
        return []
    return [c for matcher in MATCHERS for c in matcher(block, parts)]
