"""The activations as Triton device functions: a forward/backward pair per activation, selected
by one constexpr (``ACT`` = :attr:`fusedmlp.activations.Activation.code`) in :func:`act` and
:func:`act_and_grad`, which every kernel's epilogue calls.

Math is fp32 (callers upcast before and cast once on store). tanh is written through the
sigmoid, 0.5 * (1 + tanh(z)) == sigmoid(2z): exact algebra, one special function fewer.
``1 - sigmoid(z)`` is computed as ``sigmoid(-z)``: the subtraction loses all precision where
sigmoid(z) nears 1 (x > 8 for silu), and the backward kernels are memory-bound enough to pay a
second exp for it. Scalar constants stand to the right of tensors, which Triton's interpreter
needs. A backward function returns (act(x), grad * act'(x)), with torch's conventions at NaN and
Inf: ReLU's gradient is a select, as in torch's threshold_backward (0 where x <= 0 whatever grad
holds, even Inf; grad where x is NaN).

Adding an activation: its pair here, one branch in each selector, and its entry in
``fusedmlp/activations.py``.
"""

import triton
import triton.language as tl

from ..activations import GELU_TANH_COEF, QUICK_GELU_COEF, Activation

SILU: tl.constexpr = tl.constexpr(Activation.SILU.code)
GELU: tl.constexpr = tl.constexpr(Activation.GELU.code)
GELU_TANH: tl.constexpr = tl.constexpr(Activation.GELU_TANH.code)
RELU: tl.constexpr = tl.constexpr(Activation.RELU.code)
RELU2: tl.constexpr = tl.constexpr(Activation.RELU2.code)
SIGMOID: tl.constexpr = tl.constexpr(Activation.SIGMOID.code)
QUICK_GELU: tl.constexpr = tl.constexpr(Activation.QUICK_GELU.code)
RELU6: tl.constexpr = tl.constexpr(Activation.RELU6.code)
_QUICK_C: tl.constexpr = tl.constexpr(QUICK_GELU_COEF)

_TANH_C: tl.constexpr = tl.constexpr(GELU_TANH_COEF)
_3_TANH_C: tl.constexpr = tl.constexpr(3 * GELU_TANH_COEF)
_TWO_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(2 * 0.7978845608028654)
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def silu_bwd(x, grad):
    s = tl.sigmoid(x)
    return x * s, grad * s * (1.0 + x * tl.sigmoid(-x))


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT_2))


@triton.jit
def gelu_bwd(x, grad):
    cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
    return x * cdf, grad * (cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI)


@triton.jit
def gelu_tanh(x):
    return x * tl.sigmoid((x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI)


@triton.jit
def gelu_tanh_bwd(x, grad):
    z = (x + x * x * x * _TANH_C) * _TWO_SQRT_2_OVER_PI
    s = tl.sigmoid(z)
    d = s + x * s * tl.sigmoid(-z) * (1.0 + x * x * _3_TANH_C) * _TWO_SQRT_2_OVER_PI
    return x * s, grad * d


@triton.jit
def relu(x):
    return tl.where(x < 0.0, 0.0, x)  # NaN propagates, as in torch


@triton.jit
def relu_bwd(x, grad):
    return tl.where(x < 0.0, 0.0, x), tl.where(x <= 0.0, 0.0, grad)


@triton.jit
def relu2(x):
    r = tl.where(x < 0.0, 0.0, x)
    return r * r


@triton.jit
def relu2_bwd(x, grad):
    r = tl.where(x < 0.0, 0.0, x)
    return r * r, tl.where(x <= 0.0, 0.0, 2.0 * r * grad)


@triton.jit
def sigmoid(x):
    return tl.sigmoid(x)


@triton.jit
def sigmoid_bwd(x, grad):
    s = tl.sigmoid(x)
    return s, grad * s * tl.sigmoid(-x)


@triton.jit
def quick_gelu(x):
    return x * tl.sigmoid(x * _QUICK_C)


@triton.jit
def quick_gelu_bwd(x, grad):
    # grad enters each term of the product rule apart, as eager's autograd of x * sigmoid(c x)
    # computes it: an infinite grad then gives NaN where the two terms cancel, as there
    s = tl.sigmoid(x * _QUICK_C)
    return x * s, grad * s + grad * x * s * tl.sigmoid(-x * _QUICK_C) * _QUICK_C


@triton.jit
def relu6(x):
    r = tl.where(x < 0.0, 0.0, x)
    return tl.where(r > 6.0, 6.0, r)  # NaN propagates, as in torch


@triton.jit
def relu6_bwd(x, grad):
    # as torch's hardtanh_backward: 0 at and beyond the clip points, grad passed on elsewhere
    # (a NaN x included)
    return relu6(x), tl.where((x <= 0.0) | (x >= 6.0), 0.0, grad)


@triton.jit
def dropout_keep(seed_ptr, rows, cols, width, col0, p):
    """Which elements of an [M, width] tensor dropout keeps: a Philox uniform >= p, from the seed
    torch's generator drew (so torch.manual_seed governs it) and the element's flat index
    row * width + col0 + col. A backward regenerates the same mask from the same seed and
    indices: no mask is stored. ``col0``: the first column of a block of columns."""
    seed = tl.load(seed_ptr)
    return tl.rand(seed, rows * width + col0 + cols) >= p


@triton.jit
def act(x, ACT: tl.constexpr):
    """act(x) for fp32 x."""
    if ACT == SILU:
        return silu(x)
    elif ACT == GELU:
        return gelu(x)
    elif ACT == GELU_TANH:
        return gelu_tanh(x)
    elif ACT == RELU:
        return relu(x)
    elif ACT == RELU2:
        return relu2(x)
    elif ACT == SIGMOID:
        return sigmoid(x)
    elif ACT == QUICK_GELU:
        return quick_gelu(x)
    elif ACT == RELU6:
        return relu6(x)
    else:  # identity
        return x


@triton.jit
def act_and_grad(x, grad, ACT: tl.constexpr):
    """(act(x), grad * act'(x)) for fp32 x."""
    if ACT == SILU:
        return silu_bwd(x, grad)
    elif ACT == GELU:
        return gelu_bwd(x, grad)
    elif ACT == GELU_TANH:
        return gelu_tanh_bwd(x, grad)
    elif ACT == RELU:
        return relu_bwd(x, grad)
    elif ACT == RELU2:
        return relu2_bwd(x, grad)
    elif ACT == SIGMOID:
        return sigmoid_bwd(x, grad)
    elif ACT == QUICK_GELU:
        return quick_gelu_bwd(x, grad)
    elif ACT == RELU6:
        return relu6_bwd(x, grad)
    else:  # identity
        return x, grad
