"""Bad input is a clear error naming the argument; valid input that looks odd (one column with
any stride, empty non-contiguous tensors, zero-width layers, scalars) computes what eager does;
gradients never silently wrong (the identity activation, whose h would alias its input)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_contract

from fusedmlp import FusedGatedMLP, FusedMLP, FusedSequentialMLP, functional, reference
from fusedmlp.activations import Activation


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


D, H, OUT = 8, 6, 5
GATED = dict(x=_t(3, D), w_in=_t(2 * H, D), b_in=_t(2 * H), w_out=_t(OUT, H), b_out=_t(OUT))


def _gated(**changes):
    a = {**GATED, **changes}
    return lambda: functional.gated_mlp(a["x"], a["w_in"], a["b_in"], a["w_out"], a["b_out"])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (_gated(b_in=_t(1)), ValueError, r"gate_up_bias has shape \(1,\); expected \(12,\)"),
        (_gated(b_in=torch.tensor(1.0)), ValueError, r"gate_up_bias has shape \(\); expected \(12,\)"),
        (_gated(b_in=_t(6)), ValueError, r"gate_up_bias has shape \(6,\)"),  # too short: eager raises too
        (_gated(b_out=_t(OUT, 1)), ValueError, r"down_bias has shape \(5, 1\)"),
        (_gated(w_in=_t(2 * H)), ValueError, "gate_up_weight has shape .* expected a 2-D weight"),
        (_gated(w_in=_t(2 * H + 1, D)), ValueError, "odd number of rows"),
        (_gated(w_out=_t(OUT, H + 1)), ValueError, r"down_weight has shape \(5, 7\); expected \[D_out, 6\]"),
        (_gated(w_in=None), TypeError, "gate_up_weight must be a torch.Tensor, got NoneType"),
        (_gated(b_out=[1.0]), TypeError, "down_bias must be a torch.Tensor or None, got list"),
        (_gated(x=torch.tensor(1.0)), ValueError, "input has shape"),
        (_gated(x=_t(3, D + 1)), ValueError, "hidden_size=8"),
        (_gated(b_in=_t(2 * H, dtype=torch.float64)), TypeError, "gate_up_bias has dtype torch.float64"),
        (_gated(w_out=torch.ones(OUT, H, dtype=torch.int32, device=DEVICE)), TypeError, "floating-point"),
        (lambda: functional.linear_act(_t(3, D), _t(4, D), _t(1)), ValueError, r"bias has shape \(1,\)"),
        (lambda: functional.linear_act(_t(3, D), None), TypeError, "weight must be a torch.Tensor"),
        (lambda: functional.gated_act(_t(3, 4), "up"), TypeError, "up must be a torch.Tensor, got str"),
        (lambda: functional.gated_act(_t(3, 4), _t(3, 5)), ValueError, "but up has shape"),
        (lambda: functional.gated_act(_t(3, 4), _t(3, 4, dtype=torch.float64)), TypeError, "up has dtype"),
        (lambda: functional.gated_act(_t(3, 5)), ValueError, "even last dimension"),
        (lambda: functional.narrow_mlp(_t(3, D), [None], [None], ["silu"]), TypeError, "layer 0: weight"),
        (lambda: functional.narrow_mlp(_t(3, D), [_t(D)], [None], ["silu"]), ValueError, "2-D weight"),
        (lambda: functional.narrow_mlp(_t(3, D), [_t(4, D)], [torch.tensor(1.0)], ["silu"]), ValueError,
         r"layer 0: bias has shape \(\); expected \(4,\)"),
        (lambda: functional.narrow_mlp(_t(3, D), [_t(4, D)], ["b"], ["silu"]), TypeError, "layer 0: bias"),
        (lambda: functional.mlp(_t(3, D), _t(H, D), None, _t(OUT, H), None, activation="nope"), ValueError,
         "unknown activation 'nope'"),
        (lambda: functional.gated_mlp(_t(3, D), _t(2 * H, D), None, _t(OUT, H), None, recompute="most"),
         ValueError, "recompute"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "\n" not in str(info.value)  # one line


def _against_eager(fused_fn, eager_fn, *tensors):
    """Output and every gradient against eager and a float64 reference."""

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        y = fn(*ts)
        dy = torch.ones_like(y)
        grads = torch.autograd.grad(y, ts, dy, allow_unused=True) if y.numel() else [None] * len(ts)
        return [y, *(torch.zeros_like(t) if g is None else g for t, g in zip(ts, grads, strict=True))]

    fused, eager = run(fused_fn, tensors), run(eager_fn, tensors)
    ref = run(eager_fn, [t.double() for t in tensors])
    for i, (f, e, r) in enumerate(zip(fused, eager, ref, strict=True)):
        assert f.shape == e.shape
        assert_contract(f"[{i}]", f, e, r)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(5, 2)[:, :1],  # one column, unit stride
        torch.randn(5, 2)[:, ::2],  # one column of stride 2
        torch.randn(2, 0).t(),  # empty, transposed
        torch.randn(3, 0, 1).transpose(0, 1),  # empty 3-D, non-contiguous
        torch.randn(4, 2, 3)[:, :1, ::3],  # 3-D, strided, one column
    ],
)
@pytest.mark.parametrize("gated", [True, False])
def test_odd_but_valid_inputs_compute_what_eager_does(x, gated):
    x = x.to(DEVICE)
    d = x.shape[-1]
    w_in, w_out, b_in = _t(2 * H if gated else H, d), _t(OUT, H), _t(2 * H if gated else H)
    fused = functional.gated_mlp if gated else functional.mlp
    eager = reference.gated_mlp if gated else reference.mlp
    act = Activation.GELU_TANH
    _against_eager(
        lambda *t: fused(*t, None, activation=act), lambda *t: eager(*t, None, act), x, w_in, b_in, w_out
    )
    _against_eager(lambda x: functional.act(x, act), act, x)
    _against_eager(
        lambda x, w: functional.linear_act(x, w, None, act), lambda x, w: act(F.linear(x, w)), x, w_in
    )


@pytest.mark.parametrize("shapes", [(0, H, OUT), (D, 0, OUT), (D, H, 0)])  # hidden, intermediate, output
@pytest.mark.parametrize("gated", [True, False])
def test_zero_width_layers_compute_what_eager_does(shapes, gated):
    d, h, o = shapes
    rows = 2 * h if gated else h
    tensors = [_t(3, 2, d), _t(rows, d), _t(rows), _t(o, h), _t(o)]
    fused = functional.gated_mlp if gated else functional.mlp
    eager = reference.gated_mlp if gated else reference.mlp
    act = Activation.SILU
    _against_eager(lambda *t: fused(*t, activation=act), lambda *t: eager(*t, act), *tensors)


def test_scalars_and_zero_width_narrow_layers():
    x = torch.tensor(0.7, device=DEVICE)
    for act in Activation:
        torch.testing.assert_close(functional.act(x, act), act(x))
    assert functional.act(x, "identity") is not x  # an op's output never aliases its input
    w = [_t(0, 3), _t(2, 0)]
    y = functional.narrow_mlp(_t(4, 3), w, [None, _t(2)], ["silu", "identity"])
    assert y.shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [True, False])
def test_identity_activation_gradients(gated, dtype):
    """h = act(x) is x itself for the identity: no backward may write into a buffer h aliases."""
    x = _t(5, D, dtype=dtype)
    w_in, b_in, w_out = _t(2 * H if gated else H, D, dtype=dtype), None, _t(OUT, H, dtype=dtype)
    fused = functional.gated_mlp if gated else functional.mlp
    eager = reference.gated_mlp if gated else reference.mlp
    act = Activation.IDENTITY
    for recompute in ("none", "activation", "gemm"):
        _against_eager(
            lambda x, w1, w2, r=recompute: fused(x, w1, b_in, w2, None, activation=act, recompute=r),
            lambda x, w1, w2: eager(x, w1, b_in, w2, None, act),
            x, w_in, w_out,
        )
    _against_eager(lambda x: functional.act(x, act) * 2, lambda x: x * 2, x)


def test_module_parameters_replaced_with_wrong_shapes_are_named():
    m = FusedGatedMLP(D, H, "silu", device=DEVICE)
    m.in_bias = torch.nn.Parameter(_t(1))
    with pytest.raises(ValueError, match=r"bias has shape \(1,\)"):
        m(_t(3, D))
    n = FusedMLP(D, H, "gelu", device=DEVICE)
    n.out_weight = torch.nn.Parameter(_t(OUT, H + 2))
    with pytest.raises(ValueError, match="has shape"):
        n(_t(3, D))
    seq = FusedSequentialMLP.from_module(torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.SiLU()))
    seq.get_submodule("0").bias = torch.nn.Parameter(_t(3))
    with pytest.raises(ValueError, match=r"layer 0: bias has shape \(3,\); expected \(4,\)"):
        seq(_t(2, D))
