"""The activation registry: every activation fusedmlp implements, in ONE table.

Each entry (:class:`ActivationSpec`) holds what the rest of the library needs to know about an
activation: its canonical name and aliases (Hugging Face's ``hidden_act`` names among them), its
forward and derivative in plain torch (the reference every kernel is tested against), the torch
modules and functions that compute it and the Hugging Face activation classes that do. The
Triton side is a pair of device functions per activation in ``kernels/epilogue.py``, selected
by :attr:`Activation.code`.

Adding an activation: one ``ActivationSpec`` below, one member of :class:`Activation`, and its
Triton pair in ``kernels/epilogue.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Fn = Callable[[Tensor], Tensor]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_COEF = 0.044715


def _silu_d(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_d(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x * _INV_SQRT_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh_d(x: Tensor) -> Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_COEF * x * x)


def _sigmoid_d(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


QUICK_GELU_COEF = 1.702  # CLIP's QuickGELU: x * sigmoid(1.702 x)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(QUICK_GELU_COEF * x)


def _quick_gelu_d(x: Tensor) -> Tensor:
    s = torch.sigmoid(QUICK_GELU_COEF * x)
    return s + QUICK_GELU_COEF * x * s * (1 - s)


def _relu6_d(x: Tensor) -> Tensor:
    # as torch's hardtanh_backward: 0 at and beyond the clip points, 1 elsewhere (NaN included)
    return (~((x <= 0) | (x >= 6))).to(x.dtype)


# Backward formulas where grad * derivative would differ from torch's own backward: a
# piecewise-linear activation's gradient is selected, not multiplied (torch's threshold_backward
# and hardtanh_backward), so an infinite incoming gradient gives 0 where the activation is flat
# (not 0 * inf = NaN) and a NaN input passes the gradient on.
def _relu_bwd(grad: Tensor, x: Tensor) -> Tensor:
    return torch.where(x <= 0, 0.0, grad)


def _relu2_bwd(grad: Tensor, x: Tensor) -> Tensor:
    return torch.where(x <= 0, 0.0, grad * 2 * x)


def _relu6_bwd(grad: Tensor, x: Tensor) -> Tensor:
    return torch.where((x <= 0) | (x >= 6), 0.0, grad)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """Everything known about one activation.

    ``modules``: torch module types that compute it, each with a predicate on the instance (nn.GELU
    is the erf or the tanh form depending on its ``approximate``); matched by exact type, since a
    subclass may override forward. ``hf_classes``: names of Hugging Face activation classes that
    compute it (matched by name, so transformers need not be imported).
    """

    name: str
    fn: Fn
    derivative: Fn
    backward: Callable[[Tensor, Tensor], Tensor] | None = None  # (grad, x) -> dx; else grad * derivative
    aliases: tuple[str, ...] = ()
    modules: tuple[tuple[type[nn.Module], Callable[[nn.Module], bool]], ...] = ()
    functions: tuple[Callable[..., Tensor], ...] = ()
    hf_classes: tuple[str, ...] = ()


_ALWAYS: Callable[[nn.Module], bool] = lambda _m: True

SPECS: tuple[ActivationSpec, ...] = (
    ActivationSpec(
        "silu",
        F.silu,
        _silu_d,
        aliases=("swish",),
        modules=((nn.SiLU, _ALWAYS),),
        functions=(F.silu,),
        hf_classes=("SiLUActivation",),
    ),
    ActivationSpec(
        "gelu",  # exact (erf) form
        F.gelu,
        _gelu_d,
        modules=((nn.GELU, lambda m: m.approximate == "none"),),
        functions=(F.gelu,),
        hf_classes=("GELUActivation",),
    ),
    ActivationSpec(
        "gelu_tanh",
        lambda x: F.gelu(x, approximate="tanh"),
        _gelu_tanh_d,
        aliases=("gelu_pytorch_tanh", "gelu_new"),
        modules=((nn.GELU, lambda m: m.approximate == "tanh"),),
        # FastGELU is the tanh form with x*(1 + c*x^2) factored; Bloom's GELU is the tanh form
        # with sqrt(2/pi) rounded to 0.79788456 (1e-9 relative: below fp32's resolution)
        hf_classes=("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "BloomGelu"),
    ),
    ActivationSpec(
        "relu",
        F.relu,
        lambda x: (x > 0).to(x.dtype),
        _relu_bwd,
        modules=((nn.ReLU, _ALWAYS),),
        functions=(F.relu, torch.relu),
    ),
    ActivationSpec(
        "relu2",  # squared ReLU (Primer, Nemotron)
        lambda x: F.relu(x).square(),
        lambda x: 2 * F.relu(x),
        _relu2_bwd,
        aliases=("relu_squared",),
        hf_classes=("ReLUSquaredActivation",),
    ),
    ActivationSpec(
        "sigmoid",  # GLU when gated
        torch.sigmoid,
        _sigmoid_d,
        modules=((nn.Sigmoid, _ALWAYS),),
        functions=(torch.sigmoid, F.sigmoid),
    ),
    ActivationSpec(
        "quick_gelu",  # CLIP
        _quick_gelu,
        _quick_gelu_d,
        hf_classes=("QuickGELUActivation",),
    ),
    ActivationSpec(
        "relu6",  # MobileNet-style clipped ReLU: min(max(x, 0), 6)
        F.relu6,
        _relu6_d,
        _relu6_bwd,
        modules=((nn.ReLU6, _ALWAYS),),
        functions=(F.relu6,),
    ),
    ActivationSpec(
        "identity",  # bilinear when gated; a plain affine layer in narrow stacks
        lambda x: x,
        torch.ones_like,
        aliases=("none", "linear"),
        modules=((nn.Identity, _ALWAYS),),
    ),
)
_BY_NAME = {s.name: s for s in SPECS}


class Activation(enum.Enum):
    """The activations fusedmlp implements. The value is the canonical name; the rest of what is
    known about each is its :attr:`spec`."""

    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"
    RELU2 = "relu2"
    SIGMOID = "sigmoid"
    IDENTITY = "identity"
    QUICK_GELU = "quick_gelu"
    RELU6 = "relu6"

    @property
    def spec(self) -> ActivationSpec:
        return _BY_NAME[self.value]

    @property
    def code(self) -> int:
        """Stable integer id: the constexpr that selects the Triton pair in kernels/epilogue.py."""
        return _CODES[self]

    def __call__(self, x: Tensor) -> Tensor:
        """act(x), computed by torch in x's dtype."""
        return self.spec.fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        """d act(x) / dx, in x's dtype; computed in float32 for 16-bit x (as torch's own
        backward kernels compute in float32: x**3 or exp(x) would overflow in half precision)."""
        if x.dtype in _HALF:
            return self.spec.derivative(x.float()).to(x.dtype)
        return self.spec.derivative(x)

    def backward(self, grad: Tensor, x: Tensor) -> Tensor:
        """d x of act(x) given the incoming gradient, with torch's conventions: for 16-bit
        inputs in float32, rounded once; a piecewise-linear activation's gradient selected, not
        multiplied (0 where flat even for an infinite gradient, passed on for a NaN input)."""
        half = x.dtype in _HALF or grad.dtype in _HALF
        g, z = (grad.float(), x.float()) if half else (grad, x)
        fn = self.spec.backward
        dx = fn(g, z) if fn is not None else g * self.spec.derivative(z)
        return dx.to(torch.promote_types(grad.dtype, x.dtype)) if half else dx


_HALF = (torch.float16, torch.bfloat16)
_CODES = {a: i for i, a in enumerate(Activation)}
assert set(_BY_NAME) == {a.value for a in Activation}, "every Activation needs exactly one spec"
_ALIASES = {alias: Activation(s.name) for s in SPECS for alias in s.aliases}


def known_names() -> list[str]:
    return sorted([a.value for a in Activation] + list(_ALIASES))


def resolve(activation: str | Activation) -> Activation:
    """Map a name, an alias or an :class:`Activation` to an :class:`Activation`.

    Raises ValueError naming the known activations for anything else.
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        try:
            return Activation(key)
        except ValueError:
            pass
    raise ValueError(f"unknown activation {activation!r}; known activations: {', '.join(known_names())}")


def activation_of(obj: object) -> Activation | None:
    """The :class:`Activation` an object computes (a name, an nn module, an F function, a Hugging
    Face activation object), or None when it is not one of ours. Callers prove the result."""
    if isinstance(obj, (str, Activation)):
        try:
            return resolve(obj)
        except ValueError:
            return None
    for spec in SPECS:
        if isinstance(obj, nn.Module):
            if any(type(obj) is t and pred(obj) for t, pred in spec.modules):
                return Activation(spec.name)
            if type(obj).__name__ in spec.hf_classes:
                return Activation(spec.name)
        elif any(obj is f for f in spec.functions):
            return Activation(spec.name)
    return None


def module_for(activation: Activation) -> nn.Module | None:
    """A torch module computing ``activation`` (what users put in nn.Sequential), or None."""
    if activation is Activation.GELU_TANH:
        return nn.GELU(approximate="tanh")
    types = [t for t, _ in activation.spec.modules]
    return types[0]() if types else None
