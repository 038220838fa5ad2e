"""The classes of blocks that used to fool fuse's proof or change a model silently (issue 14):
each class is tested on several instances, real transformers classes among them."""


import pytest
import torch
from conftest import DEVICE
from torch import nn

from fusedmlp import FusedGatedMLP, FusedLinearAct, FusedMLP, FusedSequentialMLP


def _narrow_block():
    return FusedSequentialMLP.from_module(nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24)))


def _linear_act_block():
    return FusedLinearAct(nn.Linear(24, 40), "gelu", name="dense")


@pytest.mark.parametrize(
    "make",
    [
        lambda: FusedGatedMLP(24, 40, device=DEVICE),
        lambda: FusedMLP(24, 40, device=DEVICE),
        _linear_act_block,
        _narrow_block,
    ],
)
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_in_place_residual_after_the_block(make, shape):
    """y = block(x); y += r: allowed as on eager's output (the output is no view), gradients as
    without the in-place add."""
    block = make().to(DEVICE)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    y = block(x)
    r = torch.randn_like(y)
    y += r
    y.square().sum().backward()
    g_inplace = x.grad.clone()
    x.grad = None
    (block(x) + r).square().sum().backward()
    torch.testing.assert_close(g_inplace, x.grad)
