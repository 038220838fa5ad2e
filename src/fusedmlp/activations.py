"""Activations: their names, Hugging Face aliases, and forward and derivative in plain torch.

This is the single source of truth for what an activation name means. The Triton kernels
implement the same functions (``kernels/activation.py``) and are tested against these.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor


class Activation(enum.Enum):
    """The activations fusedmlp implements. The value is the canonical name."""

    SILU = "silu"
    GELU = "gelu"  # exact (erf) form
    GELU_TANH = "gelu_tanh"
    RELU = "relu"
    RELU2 = "relu2"  # squared ReLU (Primer, Nemotron)
    SIGMOID = "sigmoid"  # GLU when gated
    IDENTITY = "identity"  # bilinear when gated; a plain affine layer in narrow stacks

    @property
    def code(self) -> int:
        """Stable integer id, passed to the Triton kernels as a constexpr."""
        return _CODES[self]

    def __call__(self, x: Tensor) -> Tensor:
        return act_forward(self, x)


_CODES = {a: i for i, a in enumerate(Activation)}

ALIASES: dict[str, Activation] = {
    "swish": Activation.SILU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
    "relu_squared": Activation.RELU2,
    "none": Activation.IDENTITY,
    "linear": Activation.IDENTITY,
}


def known_names() -> list[str]:
    return sorted([a.value for a in Activation] + list(ALIASES))


def resolve(activation: str | Activation) -> Activation:
    """Map a name, an alias or an :class:`Activation` to an :class:`Activation`.

    Raises ValueError naming the known activations for anything else.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key in ALIASES:
            return ALIASES[key]
        try:
            return Activation(key)
        except ValueError:
            pass
    raise ValueError(f"unknown activation {activation!r}; known activations: {', '.join(known_names())}")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_COEF = 0.044715


def act_forward(activation: str | Activation, x: Tensor) -> Tensor:
    """act(x) computed by torch, in x's dtype."""
    a = resolve(activation)
    if a is Activation.SILU:
        return F.silu(x)
    if a is Activation.GELU:
        return F.gelu(x)
    if a is Activation.GELU_TANH:
        return F.gelu(x, approximate="tanh")
    if a is Activation.RELU:
        return F.relu(x)
    if a is Activation.RELU2:
        return F.relu(x).square()
    if a is Activation.SIGMOID:
        return torch.sigmoid(x)
    return x


def act_derivative(activation: str | Activation, x: Tensor) -> Tensor:
    """d act(x) / dx computed by torch, in x's dtype (compute in float64 for a reference)."""
    a = resolve(activation)
    if a is Activation.SILU:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if a is Activation.GELU:
        cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
        return cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if a is Activation.GELU_TANH:
        t = torch.tanh(_SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_COEF * x * x)
    if a is Activation.RELU:
        return (x > 0).to(x.dtype)
    if a is Activation.RELU2:
        return 2 * F.relu(x)
    if a is Activation.SIGMOID:
        s = torch.sigmoid(x)
        return s * (1 - s)
    return torch.ones_like(x)


# Hugging Face activation classes, matched by name so that transformers need not be imported.
# Each computes exactly the function named (FastGELU is the tanh form with x*(1 + c*x^2) factored).
_HF_CLASSES = {
    "SiLUActivation": Activation.SILU,
    "GELUActivation": Activation.GELU,
    "NewGELUActivation": Activation.GELU_TANH,
    "GELUTanh": Activation.GELU_TANH,
    "PytorchGELUTanh": Activation.GELU_TANH,
    "FastGELUActivation": Activation.GELU_TANH,
    "ReLUSquaredActivation": Activation.RELU2,
}

_FUNCTIONS = {
    F.silu: Activation.SILU,
    F.relu: Activation.RELU,
    torch.relu: Activation.RELU,
    torch.sigmoid: Activation.SIGMOID,
    F.sigmoid: Activation.SIGMOID,
    F.gelu: Activation.GELU,
}


def activation_of(obj: object) -> Activation | None:
    """The :class:`Activation` an object computes (a name, an nn module, an F function, a Hugging
    Face activation object), or None when it is not one of ours. Callers prove the result."""
    if isinstance(obj, (str, Activation)):
        try:
            return resolve(obj)
        except ValueError:
            return None
    if isinstance(obj, torch.nn.SiLU):
        return Activation.SILU
    if isinstance(obj, torch.nn.GELU):
        return Activation.GELU if obj.approximate == "none" else Activation.GELU_TANH
    if isinstance(obj, torch.nn.ReLU):
        return Activation.RELU
    if isinstance(obj, torch.nn.Sigmoid):
        return Activation.SIGMOID
    if isinstance(obj, torch.nn.Identity):
        return Activation.IDENTITY
    name = type(obj).__name__
    if name in _HF_CLASSES:
        return _HF_CLASSES[name]
    try:
        return _FUNCTIONS.get(obj)  # type: ignore[call-overload]
    except TypeError:  # unhashable
        return None
