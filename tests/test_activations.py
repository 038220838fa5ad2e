import pytest
import torch
from torch import nn

from fusedmlp.activations import Activation, activation_of, resolve


@pytest.mark.parametrize(
    "name,expected",
    [
        ("silu", Activation.SILU),
        ("swish", Activation.SILU),
        ("gelu", Activation.GELU),
        ("gelu_tanh", Activation.GELU_TANH),
        ("gelu_pytorch_tanh", Activation.GELU_TANH),
        ("gelu_new", Activation.GELU_TANH),
        ("relu", Activation.RELU),
        ("relu2", Activation.RELU2),
        ("sigmoid", Activation.SIGMOID),
        ("GELU", Activation.GELU),
        (Activation.SILU, Activation.SILU),
    ],
)
def test_resolve(name, expected):
    assert resolve(name) is expected


@pytest.mark.parametrize("bad", ["mish", "", 3, None])
def test_unknown_activation_lists_known(bad):
    with pytest.raises(ValueError, match=r"known activations: .*gelu_tanh.*silu"):
        resolve(bad)


@pytest.mark.parametrize("act", list(Activation))
def test_derivative_matches_autograd(act):
    x = (torch.randn(4097, dtype=torch.float64) * 3).requires_grad_()
    (g,) = torch.autograd.grad(act(x).sum(), x)
    torch.testing.assert_close(act.derivative(x.detach()), g, rtol=1e-9, atol=1e-10)


def test_activation_of():
    assert activation_of(nn.SiLU()) is Activation.SILU
    assert activation_of(nn.GELU()) is Activation.GELU
    assert activation_of(nn.GELU(approximate="tanh")) is Activation.GELU_TANH
    assert activation_of(nn.ReLU()) is Activation.RELU
    assert activation_of(torch.nn.functional.silu) is Activation.SILU
    assert activation_of("gelu_pytorch_tanh") is Activation.GELU_TANH
    assert activation_of(nn.Tanh()) is None
    assert activation_of("gelu_10") is None  # HF's clipped GELU: not implemented
    assert activation_of("quick_gelu") is Activation.QUICK_GELU  # CLIP
    assert activation_of(nn.ReLU6()) is Activation.RELU6 and activation_of("relu6") is Activation.RELU6
