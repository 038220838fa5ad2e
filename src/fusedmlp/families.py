"""What fusedmlp knows about model families, in one place: the child names their MLP blocks use,
where a block keeps its activation, and which config keys name it. ``from_module`` (modules/)
and ``fuse`` (fuse/find.py) both read it; ``fuse`` also recognises blocks whose names are not
listed here, by structure, and proves every guess.

Adding a family whose MLP uses new child names: one row in ``GATED_LAYOUTS`` or
``PLAIN_LAYOUTS``; a new place for its activation: ``ACTIVATION_ATTRS`` or ``CONFIG_ACTIVATION_KEYS``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .activations import Activation, activation_of

# (input projections in row order, output projection), by family.
GATED_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),  # Llama, Mistral, Qwen, Gemma
    (("w1", "w3"), "w2"),  # gpt-fast, Mixtral experts
    (("gate_up_proj",), "down_proj"),  # Phi-3: already merged
)
PLAIN_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("fc1",), "fc2"),  # ViT (timm), CLIP, OPT
    (("c_fc",), "c_proj"),  # GPT-2 (Conv1D)
    (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX, Falcon
    (("lin1",), "lin2"),  # DistilBERT
    (("linear1",), "linear2"),
)

# Attributes (not child modules) that may hold a block's activation: a module, a function such
# as F.silu, or a name. Any attribute whose name contains one of these words is read.
ACTIVATION_ATTRS = ("act", "activation", "nonlinearity")
# Config keys that name the activation (``block.config.<key>``).
CONFIG_ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a Linear whose weight is stored [in_features, out_features]."""
    return type(module).__name__ == "Conv1D"


@dataclasses.dataclass(frozen=True)
class DeclaredActivations:
    """The activations a block names, in order and without repeats: ``explicit`` (a child module
    or an attribute of the block), and ``from_config`` (its ``config``)."""

    explicit: tuple[Activation, ...]
    from_config: tuple[Activation, ...]


def declared_activations(block: nn.Module) -> DeclaredActivations:
    found: list[Activation] = []
    for child in block.children():
        if (act := activation_of(child)) is not None:
            found.append(act)
    for name, value in vars(block).items():
        if name.startswith("_") or isinstance(value, nn.Module):
            continue
        named_like_one = isinstance(value, str) and any(w in name.lower() for w in ACTIVATION_ATTRS)
        if (callable(value) or named_like_one) and (act := activation_of(value)) is not None:
            found.append(act)
    config = getattr(block, "config", None)
    from_config = [a for key in CONFIG_ACTIVATION_KEYS if (a := activation_of(getattr(config, key, None)))]
    return DeclaredActivations(tuple(dict.fromkeys(found)), tuple(dict.fromkeys(from_config)))


def find_activation(block: nn.Module) -> Activation:
    """The one activation a block names (explicitly, else in its config); ValueError otherwise."""
    declared = declared_activations(block)
    for acts in (declared.explicit, declared.from_config):
        if len(acts) == 1:
            return acts[0]
        if len(acts) > 1:
            names = ", ".join(a.value for a in acts)
            who = type(block).__name__
            raise ValueError(f"{who} names several activations ({names}); pass activation=...")
    raise ValueError(f"cannot tell which activation {type(block).__name__} uses; pass activation=...")
