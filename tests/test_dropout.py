"""Dropout of h inside the fused MLP (between the activation and the output projection): nn.Dropout's
keep probability and scaling, the mask drawn from torch's generator (torch.manual_seed governs it),
the backward applying the same mask, identity in eval. Bitwise equality with torch's own masks is
not expected: distributions and gradient consistency are tested, on every path (the Triton GEMM's
epilogue in bf16, cuBLAS + the pointwise kernel in fp32, the torch reference in fp64)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_contract

from fusedmlp import FusedGatedMLP, FusedMLP, options

DTYPES = [torch.bfloat16, torch.float32, torch.float64]


def _identity_out(cls, d, h, p, dtype, **kw):
    """A fused MLP whose output projection is the identity, so y is the dropped h itself."""
    m = cls(d, h, "gelu_tanh", bias=(True, False), out_features=h, hidden_dropout=p, device=DEVICE, **kw)
    m = m.to(dtype)
    with torch.no_grad():
        m.out_weight.copy_(torch.eye(h, dtype=dtype))
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_scaling_mean_and_variance(cls, p, dtype):
    m = _identity_out(cls, 32, 96, p, dtype)
    x = torch.randn(8, 40, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        h = m.eval()(x).double()
        y = m.train()(x).double()
    kept = y != 0
    n = kept.numel()
    rate = kept.double().mean().item()
    print(f"keep rate {rate:.4f} (expected {1 - p}), n={n}")
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # binomial, 5 sigma
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(y[kept], h[kept] / (1 - p), rtol=tol, atol=tol)  # the scaling
    # mean and second moment preserved in expectation: the estimate's error shrinks as 1/sqrt(n)
    assert abs(y.mean() - h.mean()) < 5 * (h.square().mean() * p / (1 - p) / n).sqrt() + tol
    assert abs(y.square().mean() * (1 - p) - h.square().mean()) < 0.1 * h.square().mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", ["none", "activation", "gemm"])
@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
def test_backward_applies_the_forward_mask(cls, recompute, dtype):
    """The gradients are those of y = down(h * mask / (1 - p)) with the mask the forward drew,
    read off the output (an identity output projection shows the dropped h), under the numerics
    contract against float64."""
    p = 0.3
    m = _identity_out(cls, 24, 80, p, dtype, recompute=recompute)
    x = torch.randn(3, 37, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    with options.override(recompute_block_width=16):  # gemm: several blocks of columns
        y = m.train()(x)
        keep = (y != 0).double()
        dy = torch.randn_like(y)
        y.backward(dy)
    w_in, b_in = m.merged_in_weight().detach(), m.merged_in_bias().detach()  # [2H, D] when gated

    def forward(xx, wi, bi, wo, mask):
        pre = F.linear(xx, wi, bi)
        if cls is FusedGatedMLP:
            g, u = pre.chunk(2, -1)
            h = F.gelu(g, approximate="tanh") * u
        else:
            h = F.gelu(pre, approximate="tanh")
        return F.linear(h * mask / (1 - p), wo)

    def grads(cast, mask):
        leaf = lambda t: t.detach().to(cast).clone().requires_grad_()
        xx, wi, bi, wo = leaf(x), leaf(w_in), leaf(b_in), leaf(m.out_weight)
        out = forward(xx, wi, bi, wo, mask.to(cast))
        out.backward(dy.to(cast))
        return out, xx.grad, wi.grad, bi.grad, wo.grad

    eager = grads(dtype, keep)
    ref = grads(torch.float64, keep)
    d_in = (m.in_weight.grad.reshape(w_in.shape), m.in_bias.grad.reshape(b_in.shape))
    fused = (y, x.grad, *d_in, m.out_weight.grad)
    for name, f, e, r in zip(("y", "dx", "d w_in", "d b_in", "d w_out"), fused, eager, ref, strict=True):
        if dtype == torch.float64:  # eager is the reference itself: compare to it directly
            torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)
        else:
            assert_contract(name, f, e, r)


def test_torch_manual_seed_governs_the_mask_and_eval_is_identity():
    m = _identity_out(FusedGatedMLP, 16, 64, 0.5, torch.float32).train()
    x = torch.randn(32, 16, device=DEVICE)
    with torch.no_grad():
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(1)
        b = m(x)
        c = m(x)  # the generator moved on: a new mask
        plain = m.eval()(x)
        no_drop = FusedGatedMLP(16, 64, "gelu_tanh", bias=(True, False), out_features=64, device=DEVICE)
        no_drop.load_state_dict(m.state_dict())
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(plain, no_drop(x))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_probabilities(p):
    m = _identity_out(FusedMLP, 16, 48, p, torch.float32).train()
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    y = m(x)
    y.sum().backward()
    if p == 1.0:
        assert not y.any() and not x.grad.any()
    else:
        torch.testing.assert_close(y, m.eval()(x))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", float("nan")])
def test_bad_probability(bad):
    with pytest.raises(ValueError, match=r"dropout probability must be a number in \[0, 1\]"):
        FusedGatedMLP(16, 32, hidden_dropout=bad)


def test_compiled_module_with_dropout_trains():
    """torch.compile(fullgraph=True) traces the dropout (the seed drawn in the graph, the mask
    hashed from it with tensor arithmetic on a CPU, Philox in the kernels on a GPU)."""
    torch._dynamo.reset()
    m = _identity_out(FusedGatedMLP, 16, 64, 0.4, torch.float32).train()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    rate = (y != 0).double().mean().item()
    assert abs(rate - 0.6) < 0.05 and torch.isfinite(x.grad).all()
    kept = y != 0
    torch.testing.assert_close(y[kept], (m.eval()(x) / 0.6)[kept].detach(), rtol=1e-5, atol=1e-5)
