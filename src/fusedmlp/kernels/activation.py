"""The activations as Triton device functions, shared by every kernel's epilogue.

Math is fp32 (callers upcast before and cast once on store). tanh is written through the
sigmoid, 0.5 * (1 + tanh(z)) == sigmoid(2z): exact algebra, one special function fewer.
Scalar constants stand to the right of tensors, which Triton's interpreter needs.
The codes match :attr:`fusedmlp.activations.Activation.code`.
"""

import triton
import triton.language as tl

from ..activations import GELU_TANH_COEF, Activation

SILU: tl.constexpr = tl.constexpr(Activation.SILU.code)
GELU: tl.constexpr = tl.constexpr(Activation.GELU.code)
GELU_TANH: tl.constexpr = tl.constexpr(Activation.GELU_TANH.code)
RELU: tl.constexpr = tl.constexpr(Activation.RELU.code)
RELU2: tl.constexpr = tl.constexpr(Activation.RELU2.code)
SIGMOID: tl.constexpr = tl.constexpr(Activation.SIGMOID.code)

_TANH_C: tl.constexpr = tl.constexpr(GELU_TANH_COEF)
_3_TANH_C: tl.constexpr = tl.constexpr(3 * GELU_TANH_COEF)
_TWO_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(2 * 0.7978845608028654)
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    """act(x) for fp32 x. NaN propagates as in torch (relu(NaN) is NaN)."""
    if ACT == SILU:
        return x * tl.sigmoid(x)
    elif ACT == GELU:
        return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT_2))
    elif ACT == GELU_TANH:
        return x * tl.sigmoid((x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI)
    elif ACT == RELU:
        return tl.where(x < 0.0, 0.0, x)
    elif ACT == RELU2:
        r = tl.where(x < 0.0, 0.0, x)
        return r * r
    elif ACT == SIGMOID:
        return tl.sigmoid(x)
    else:
        return x


@triton.jit
def apply_act_bwd(x, grad_a, ACT: tl.constexpr):
    """(act(x), grad_a * act'(x)) for fp32 x, with torch's conventions at NaN and Inf.

    1 - sigmoid(z) is computed as sigmoid(-z): the subtraction loses all precision where
    sigmoid(z) nears 1 (x > 8 for silu), and the backward kernels are memory-bound enough to
    pay a second exp for it. ReLU's gradient is a select, as in torch's threshold_backward:
    0 where x <= 0 whatever grad_a holds (even Inf), grad_a where x is NaN.
    """
    if ACT == SILU:
        s = tl.sigmoid(x)
        return x * s, grad_a * s * (1.0 + x * tl.sigmoid(-x))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        return x * cdf, grad_a * (cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI)
    elif ACT == GELU_TANH:
        z = (x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI
        s = tl.sigmoid(z)
        d = s + x * s * tl.sigmoid(-z) * (1.0 + x * x * _3_TANH_C) * _TWO_SQRT_2_OVER_PI
        return x * s, grad_a * d
    elif ACT == RELU:
        return tl.where(x < 0.0, 0.0, x), tl.where(x <= 0.0, 0.0, grad_a)
    elif ACT == RELU2:
        r = tl.where(x < 0.0, 0.0, x)
        return r * r, tl.where(x <= 0.0, 0.0, 2.0 * r * grad_a)
    elif ACT == SIGMOID:
        s = tl.sigmoid(x)
        return s, grad_a * s * tl.sigmoid(-x)
    else:
        return x, grad_a
