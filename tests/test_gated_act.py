"""The pointwise (gated) activation kernels against the float64 reference, through the ops."""

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_contract

import fusedmlp.functional as FF
from fusedmlp import ops, reference
from fusedmlp.activations import Activation

ACTS = list(Activation)


def _eager_and_ref(fn, inputs, grad):
    """Eager same-dtype result and float64 reference of fn, with gradients for each input."""
    outs = {}
    for kind, cast in (("eager", lambda t: t), ("ref", lambda t: t.double())):
        xs = [cast(t.detach()).requires_grad_() for t in inputs]
        y = fn(*xs)
        y.backward(cast(grad))
        outs[kind] = (y.detach(), [t.grad for t in xs])
    return outs["eager"], outs["ref"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(6, 42), (2, 3, 123), (1, 431), (0, 5)])
def test_gated_act_merged(act, dtype, shape):
    *lead, H = shape
    gate_up = (torch.randn(*lead, 2 * H, device=DEVICE) * 2).to(dtype).requires_grad_()
    grad = torch.randn(*lead, H, device=DEVICE).to(dtype)
    h = FF.gated_act(gate_up, activation=act)
    h.backward(grad)

    def eager(gu):
        g, u = gu.chunk(2, -1)
        return reference.gated_act(g, u, act)

    (e_h, (e_d,)), (r_h, (r_d,)) = _eager_and_ref(eager, [gate_up], grad)
    assert h.shape == (*lead, H) and h.dtype == dtype
    assert_contract("h", h, e_h, r_h)
    assert_contract("d gate_up", gate_up.grad, e_d, r_d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [Activation.SILU, Activation.GELU_TANH, Activation.GELU])
def test_gated_act_split_noncontiguous(act, dtype):
    M, H = 37, 123
    # gate: every second column (copied to unit stride by the op); up: an offset row window
    gate = (torch.randn(M, 2 * H, device=DEVICE) * 2).to(dtype)[:, ::2].detach().requires_grad_()
    up_big = torch.randn(M, H + 9, device=DEVICE).to(dtype)
    up = up_big[:, 5 : 5 + H].detach().requires_grad_()
    assert not gate.is_contiguous() and not up.is_contiguous()
    grad = torch.randn(M, H, device=DEVICE).to(dtype).t().contiguous().t()  # column-major grad
    h = FF.gated_act(gate, up, act)
    h.backward(grad)
    (e_h, (e_g, e_u)), (r_h, (r_g, r_u)) = _eager_and_ref(
        lambda g, u: reference.gated_act(g, u, act), [gate, up], grad
    )
    assert_contract("h", h, e_h, r_h)
    assert_contract("d gate", gate.grad, e_g, r_g)
    assert_contract("d up", up.grad, e_u, r_u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_act(act, dtype):
    x = (torch.randn(5, 7, 77, device=DEVICE) * 2).to(dtype).requires_grad_()
    grad = torch.randn(5, 7, 77, device=DEVICE).to(dtype)
    h = FF.act(x, act)
    h.backward(grad)
    (e_h, (e_d,)), (r_h, (r_d,)) = _eager_and_ref(act, [x], grad)
    assert_contract("h", h, e_h, r_h)
    assert_contract("dx", x.grad, e_d, r_d)


@pytest.mark.parametrize("act", ACTS)
def test_nonfinite_propagate_like_eager(act):
    inf, nan = float("inf"), float("nan")
    g = torch.tensor([[nan, inf, -inf, 1.0, -2.0, 0.0, 3.0]], device=DEVICE)
    u = torch.tensor([[1.0, 2.0, 3.0, nan, inf, 1.0, -inf]], device=DEVICE)
    g.requires_grad_()
    h = FF.gated_act(g, u, act)
    h.backward(torch.ones_like(h))
    eager_g = g.detach().clone().requires_grad_()
    eager = reference.gated_act(eager_g, u, act)
    eager.backward(torch.ones_like(eager))
    ref_g = g.detach().double().requires_grad_()
    ref = reference.gated_act(ref_g, u.double(), act)
    ref.backward(torch.ones_like(ref))
    assert_contract("h", h, eager, ref)
    assert_contract("d gate", g.grad, eager_g.grad, ref_g.grad)


def test_every_element_written():
    """Poison the output buffer: the kernel must overwrite all of it (odd M and N)."""
    if not ops.use_triton(torch.empty(1, device=DEVICE)):
        pytest.skip("Triton path not active")
    from fusedmlp.kernels import pointwise as k

    M, N = 67, 333
    x, u = torch.randn(M, N, device=DEVICE), torch.randn(M, N, device=DEVICE)
    out = torch.full((M, N), float("nan"), device=DEVICE)
    k.gated_act_forward(x, u, Activation.SILU, out=out)
    torch.testing.assert_close(out, reference.gated_act(x, u, Activation.SILU))


def test_triton_path_taken():
    """CI runs the kernels under the interpreter; make sure the dispatch really picks them."""
    assert ops.use_triton(torch.empty(1, device=DEVICE))
    assert not ops.use_triton(torch.empty(1, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("up", [False, True])
def test_opcheck(up):
    gu = torch.randn(3, 2 * 24, device=DEVICE, requires_grad=True)
    u = torch.randn(3, 2 * 24, device=DEVICE, requires_grad=True) if up else None
    torch.library.opcheck(ops.gated_act, (gu, u, "silu"))
    torch.library.opcheck(ops.act, (gu, "gelu_tanh"))


def test_float64_uses_reference():
    g = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: FF.gated_act(g, u, "gelu"), (g, u))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: FF.gated_act(torch.randn(3, 5)), ValueError, "even last dimension"),
        (lambda: FF.gated_act(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "but up has shape"),
        (lambda: FF.gated_act(torch.ones(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: FF.gated_act(torch.randn(3, 4), torch.randn(3, 4).half()), TypeError, "dtype"),
        (lambda: FF.act(torch.randn(3, 4), "mish"), ValueError, "unknown activation 'mish'"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
def test_int64_offsets_large():
    """M * 2H > 2^31 elements of the merged buffer: row offsets must not overflow."""
    M, H = 70_000, 16_384  # merged buffer: 2.29e9 elements (4.6 GB in bf16)
    gu = torch.randn(M, 2 * H, device="cuda", dtype=torch.bfloat16)
    h = FF.gated_act(gu, activation="silu")
    for rows in (slice(0, 4), slice(M - 4, M)):
        g, u = gu[rows].float().chunk(2, -1)
        torch.testing.assert_close(h[rows].float(), torch.nn.functional.silu(g) * u, rtol=1e-2, atol=1e-2)
