"""Second derivatives (create_graph=True) through every fused op and module: gradient penalties,
eikonal losses of implicit networks (the narrow MLP), meta-learning (gradients of weights taken
with a graph). Checked with torch.autograd.gradgradcheck in float64, and against the eager
reference's second derivatives on the kernel path; a dropout of h refuses with the reason."""

import pytest
import torch
from conftest import DEVICE
from torch import nn

from fusedmlp import FusedGatedMLP, FusedMLP, FusedSequentialMLP, functional
from fusedmlp.activations import Activation

F64 = {"device": DEVICE, "dtype": torch.float64}


def _randn(*shape, grad=True):
    return torch.randn(*shape, **F64).requires_grad_(grad)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu2", "sigmoid"])
@pytest.mark.parametrize("op", ["gated_mlp", "mlp", "linear_act", "act", "gated_act", "gated_act_merged"])
def test_gradgradcheck(op, act):
    x = _randn(3, 5)
    if op == "gated_mlp":
        args = (x, _randn(8, 5), _randn(8), _randn(4, 4), _randn(4))
        fn = lambda *a: functional.gated_mlp(*a, activation=act)
    elif op == "mlp":
        args = (x, _randn(6, 5), _randn(6), _randn(4, 6), None)
        fn = lambda x, w1, b1, w2, b2: functional.mlp(x, w1, b1, w2, b2, activation=act)
    elif op == "linear_act":
        args = (x, _randn(6, 5), _randn(6))
        fn = lambda *a: functional.linear_act(*a, activation=act)
    elif op == "act":
        args = (x,)
        fn = lambda x: functional.act(x, act)
    elif op == "gated_act":
        args = (x, _randn(3, 5))
        fn = lambda g, u: functional.gated_act(g, u, act)
    else:
        args = (_randn(3, 6),)
        fn = lambda gu: functional.gated_act(gu, None, act)
    assert torch.autograd.gradgradcheck(fn, args, atol=1e-6, rtol=1e-5)


def test_narrow_mlp_gradgradcheck():
    x = _randn(4, 3)
    weights = [_randn(7, 3), _randn(5, 7), _randn(1, 5)]
    biases = [_randn(7), None, _randn(1)]
    acts = ["silu", "gelu_tanh", "identity"]

    def fn(x, w0, w1, w2, b0, b2):
        return functional.narrow_mlp(x, [w0, w1, w2], [b0, None, b2], acts)

    assert torch.autograd.gradgradcheck(fn, (x, *weights, biases[0], biases[2]), atol=1e-6, rtol=1e-5)


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of an eikonal-style loss, (|dy/dx| - 1)^2, for x and every parameter."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    loss = (dx.norm(dim=-1) - 1).square().mean() + y.square().mean()
    return list(torch.autograd.grad(loss, [x, *model.parameters()]))


def _sdf_net(width: int, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers = (nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
    return nn.Sequential(*layers).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eikonal_loss_of_a_narrow_network_matches_eager(dtype):
    """An implicit network (SDF) trained with an eikonal term: the fused stack's second
    derivatives equal eager's, for the input and every weight (the kernel path under the
    interpreter for float32)."""
    eager = _sdf_net(32, dtype)
    fused = FusedSequentialMLP.from_module(eager)
    x = torch.randn(37, 3, device=DEVICE, dtype=dtype)
    ref = _penalty_grads(eager.double(), x.double())
    got = _penalty_grads(fused, x)
    eager.to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("recompute", ["none", "activation", "gemm"])
@pytest.mark.parametrize("cls,act", [(FusedGatedMLP, "silu"), (FusedMLP, "gelu")])
def test_gradient_penalty_through_fused_modules(cls, act, recompute):
    torch.manual_seed(0)
    fused = cls(6, 10, act, recompute=recompute, device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 5, 6, **F64)
    got = _penalty_grads(fused, x)

    # the same loss on the eager formula, over the same parameters
    w_out, b_out = fused.out_weight, fused.out_bias
    a = Activation(act)

    def reference(x):
        z = torch.nn.functional.linear(x, fused.merged_in_weight(), fused.merged_in_bias())
        if cls is FusedGatedMLP:
            g, u = z.chunk(2, dim=-1)
            return torch.nn.functional.linear(a(g) * u, w_out, b_out)
        return torch.nn.functional.linear(a(z), w_out, b_out)

    probe = nn.Module()
    probe.forward = reference  # type: ignore[method-assign]
    probe.register_module("m", fused)  # parameters in the same order
    ref = _penalty_grads(probe, x)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_weights_gradient_with_a_graph_meta_learning():
    """MAML's inner step: grads of the weights taken with create_graph, then a loss on the
    updated weights differentiated back to the original ones."""
    torch.manual_seed(0)
    weights = [_randn(8, 4), _randn(2, 8)]
    biases = [_randn(8), _randn(2)]
    x, t = torch.randn(9, 4, **F64), torch.randn(9, 2, **F64)

    def step(mlp):
        inner = (mlp(x, weights, biases) - t).square().mean()
        grads = torch.autograd.grad(inner, weights + biases, create_graph=True)
        fast = [p - 0.1 * g for p, g in zip(weights + biases, grads, strict=True)]
        outer = (mlp(x, fast[:2], fast[2:]) - t).square().mean()
        return torch.autograd.grad(outer, weights + biases)

    fused = step(lambda x, w, b: functional.narrow_mlp(x, w, b, ["silu", "identity"]))
    linear = nn.functional.linear
    eager = step(lambda x, w, b: linear(nn.functional.silu(linear(x, w[0], b[0])), w[1], b[1]))
    for g, r in zip(fused, eager, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
def test_second_derivatives_through_dropout_are_refused(cls):
    m = cls(6, 10, "silu", hidden_dropout=0.2, device=DEVICE, dtype=torch.float64).train()
    x = torch.randn(4, 6, **F64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"second derivatives .* dropout of h are not supported"):
        torch.autograd.grad(m(x).sum(), x, create_graph=True)
    (dx,) = torch.autograd.grad(m(x).sum(), x)  # first derivatives: fine
    assert torch.isfinite(dx).all()
    m.eval()  # no dropout in eval: second derivatives work
    (dx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    assert dx.requires_grad
