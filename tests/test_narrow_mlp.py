"""FusedSequentialMLP (the narrow-MLP kernel) against the nn.Sequential it replaces."""

import copy

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_contract
from torch import nn

import fusedmlp.functional as FF
from fusedmlp import FusedSequentialMLP, can_fuse_sequential, ops, sequential_unsupported_reason
from fusedmlp.numerics import state_dict_equal

_ACT_MODULES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "none": None,  # consecutive Linears: the first gets the identity
}


def make_seq(widths, acts, bias=True, dtype=torch.float32):
    """nn.Sequential of Linear(widths[i] -> widths[i+1]) each followed by acts[i]."""
    biases = bias if isinstance(bias, (list, tuple)) else [bias] * len(acts)
    mods = []
    for d_in, d_out, act, b in zip(widths, widths[1:], acts, biases, strict=False):
        mods.append(nn.Linear(d_in, d_out, bias=b))
        if _ACT_MODULES[act] is not None:
            mods.append(_ACT_MODULES[act]())
    return nn.Sequential(*mods).to(DEVICE, dtype)


def _run(module, x, grad):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


def check_contract(seq, x):
    """Output, input gradient and every weight and bias gradient under the numerics contract."""
    fused = FusedSequentialMLP.from_module(seq)
    ref64 = copy.deepcopy(seq).double()
    grad = torch.randn(*x.shape[:-1], fused.out_features, device=DEVICE).to(x.dtype)
    y_f, dx_f = _run(fused, x, grad)
    y_e, dx_e = _run(seq, x, grad)
    y_r, dx_r = _run(ref64, x.double(), grad.double())
    assert y_f.dtype == x.dtype and y_f.shape == y_e.shape
    assert_contract("y", y_f, y_e, y_r)
    assert_contract("dx", dx_f, dx_e, dx_r)
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (fused, seq, ref64)]
    assert list(grads[0]) == list(grads[1])
    for name in grads[1]:
        assert_contract(f"d {name}", grads[0][name], grads[1][name], grads[2][name])


# (widths, activations, bias per layer, leading dims of x): odd widths, depth 1 and 5, mixed bias;
# 300 rows are 3 row blocks, so backward programs walk more than one block
STACKS = {
    "odd": ([7, 33, 50, 5], ["gelu", "none", "sigmoid"], [True, False, True], (300,)),
    "depth1": ([12, 9], ["silu"], [True], (5, 7)),
    "depth5": ([16, 20, 17, 24, 16, 3], ["relu", "gelu_tanh", "silu", "gelu", "identity"], True, (37,)),
    # P = 256: the kernels at their widest (fp32 takes the torch path there)
    "wide": ([100, 256, 3], ["silu", "identity"], [False, True], (70,)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stack", list(STACKS))
def test_contract(stack, dtype):
    widths, acts, bias, lead = STACKS[stack]
    seq = make_seq(widths, acts, bias, dtype)
    check_contract(seq, torch.randn(*lead, widths[0], device=DEVICE).to(dtype))


@pytest.mark.parametrize("seed", range(6))
def test_contract_random_stacks(seed):
    """Seeded random stacks: depth 1-6, widths 1-70 (padded widths 16, 32, 64, 128), any
    activation per layer, bias or not per layer, 1-200 rows, every dtype in turn; outputs and
    all gradients under the numerics contract."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    depth = 1 + pick(6)
    widths = [1 + pick(70) for _ in range(depth + 1)]
    acts = [list(_ACT_MODULES)[pick(len(_ACT_MODULES))] for _ in range(depth)]
    bias = [bool(pick(2)) for _ in range(depth)]
    dtype = DTYPES[seed % len(DTYPES)]
    torch.manual_seed(seed)
    seq = make_seq(widths, acts, bias, dtype)
    check_contract(seq, torch.randn(1 + pick(200), widths[0], device=DEVICE).to(dtype))


@pytest.mark.parametrize("act", list(_ACT_MODULES))
def test_every_activation(act):
    seq = make_seq([10, 24, 6], [act, act], [False, True], torch.bfloat16)
    check_contract(seq, (2 * torch.randn(19, 10, device=DEVICE)).to(torch.bfloat16))


def test_noncontiguous_3d_and_empty_inputs():
    seq = make_seq([20, 40, 8], ["relu", "sigmoid"], True, torch.bfloat16)
    x = torch.randn(3, 5, 40, device=DEVICE).to(torch.bfloat16)[..., ::2]  # last-dim stride 2
    assert not x.is_contiguous()
    check_contract(seq, x)
    check_contract(seq, torch.randn(20, 11, device=DEVICE).to(torch.bfloat16).t())  # transposed
    fused = FusedSequentialMLP.from_module(seq)
    for shape in [(0, 20), (2, 0, 20)]:
        x0 = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        y = fused(x0)
        assert y.shape == (*shape[:-1], 8)
        y.sum().backward()
        assert x0.grad.shape == x0.shape
        assert fused.get_submodule("0").weight.grad is not None
        assert not fused.get_submodule("0").weight.grad.any()
        fused.zero_grad()


def test_state_dict_matches_sequential():
    seq = make_seq([6, 30, 30, 4], ["gelu_tanh", "none", "relu"], [True, False, True])
    sd = seq.state_dict()
    fused = FusedSequentialMLP.from_module(seq)
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "3.weight", "3.bias"]
    assert state_dict_equal(fused.state_dict(), sd)
    # the Sequential's checkpoint loads (strict) into a fresh fused module, and back
    spec = ([6, 30, 30, 4], ["gelu_tanh", "none", "relu"], [True, False, True])
    fresh = FusedSequentialMLP.from_module(make_seq(*spec))
    fresh.load_state_dict(sd)
    assert state_dict_equal(fresh.state_dict(), sd)
    seq2 = make_seq(*spec)
    seq2.load_state_dict(fresh.state_dict())
    assert state_dict_equal(seq2.state_dict(), sd)
    x = torch.randn(9, 6, device=DEVICE)
    torch.testing.assert_close(fresh(x), seq(x), rtol=1e-5, atol=1e-6)


def test_inference_cache_follows_parameter_updates():
    seq = make_seq([8, 16, 3], ["silu", "identity"])
    fused = FusedSequentialMLP.from_module(seq)
    x = torch.randn(5, 8, device=DEVICE)
    with torch.no_grad():
        y0 = fused(x)
        packed = fused._packed
        assert packed is not None
        torch.testing.assert_close(fused(x), y0)
        assert fused._packed is packed  # reused, not re-packed
        fused.get_submodule("2").weight.mul_(2)  # an optimizer-style in-place update
        torch.testing.assert_close(fused(x), 2 * y0 - fused.get_submodule("2").bias)
        assert fused._packed is not packed
    # frozen weights and an input that wants a gradient, after an inference_mode call: the
    # cached buffer (an inference tensor) serves the backward too
    fused.requires_grad_(False)
    with torch.inference_mode():
        fused(x)
    x.requires_grad_()
    fused(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "seq,match",
    [
        (nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 4)), r"layer 0 .*width 300 > 256"),
        (nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1)), r"layer 1 .*unsupported module Dropout"),
        (nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)), r"layer 1 .*unsupported module LayerNorm"),
        (nn.Sequential(nn.ReLU(), nn.Linear(8, 4)), r"layer 0 .*before the first nn.Linear"),
        (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.SiLU()), r"layer 2 .*a second activation"),
        (nn.Sequential(nn.Linear(8, 16), nn.Linear(12, 4)), r"layer 1 .*in_features 12"),
        (nn.Sequential(nn.Identity()), "no nn.Linear"),
        (nn.Linear(8, 4), "not an nn.Sequential"),
    ],
)
def test_unsupported_stacks(seq, match):
    assert sequential_unsupported_reason(seq) is not None and not can_fuse_sequential(seq)
    with pytest.raises(ValueError, match=match):
        FusedSequentialMLP.from_module(seq)


def test_bad_input():
    seq = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    assert sequential_unsupported_reason(seq) is None and can_fuse_sequential(seq)
    fused = FusedSequentialMLP.from_module(seq)
    for grad_mode in (True, False):  # training packs per call; inference checks x against the cache
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(ValueError, match="hidden_size=16"):
                fused(torch.randn(3, 17))
            with pytest.raises(TypeError, match="floating-point"):
                fused(torch.ones(3, 16, dtype=torch.int64))
            with pytest.raises(TypeError, match=r"dtype torch\.float64 but"):
                fused(torch.randn(3, 16, dtype=torch.float64))
    fused.get_submodule("2").to(torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match=r"2.weight is torch.float64 .* share one dtype"):
        fused(torch.randn(3, 16))
    with pytest.raises(ValueError, match="every width <= 256"):
        FF.narrow_mlp(torch.randn(2, 8), [torch.randn(300, 8)], [None], ["relu"])
    with pytest.raises(ValueError, match="layer 1: weight has shape"):
        FF.narrow_mlp(torch.randn(2, 8), [torch.randn(5, 8), torch.randn(3, 6)], [None, None], ["relu"] * 2)
    with pytest.raises(ValueError, match="one activation per layer"):
        FF.narrow_mlp(torch.randn(2, 8), [torch.randn(5, 8)], [None], ["relu", "relu"])


def test_opcheck():
    w, b = FF.pack_narrow_mlp([torch.randn(20, 7), torch.randn(5, 20)], [torch.randn(20), None])
    x = torch.randn(6, 7)
    for t in (w, b, x):
        t.requires_grad_()
    torch.library.opcheck(ops.narrow_mlp, (x, w, b, [7, 20, 5], "gelu,sigmoid"))
    grad = torch.randn(6, 5)
    args = (grad, x.detach(), w.detach(), b.detach(), [7, 20, 5], "gelu,sigmoid")
    torch.library.opcheck(ops.narrow_mlp_backward, args)


def test_eager_calls_take_the_autograd_function(monkeypatch):
    """Eager calls run the autograd.Function twin of the custom op (less host time per call), with
    the same numbers; second derivatives as eager's."""
    seq = make_seq([7, 20, 5], ["gelu", "sigmoid"], [True, False])
    fused = FusedSequentialMLP.from_module(seq)
    real_op, calls = ops.narrow_mlp, []
    monkeypatch.setattr(ops, "narrow_mlp", lambda *a: calls.append(1) or real_op(*a))
    x = torch.randn(6, 7, device=DEVICE, requires_grad=True)
    y = fused(x)
    assert calls == [] and type(y.grad_fn).__name__ == "NarrowMLPFunctionBackward"
    w, b = FF.pack_narrow_mlp([m.weight for m in fused.linears], [m.bias for m in fused.linears])
    grad = torch.randn_like(y)
    outs = []
    for fn in (real_op, ops.NarrowMLPFunction.apply):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves, [7, 20, 5], "gelu,sigmoid")
        out.backward(grad)
        outs.append([out.detach()] + [t.grad for t in leaves])
    for a, b_ in zip(*outs, strict=True):
        assert torch.equal(a, b_)
    # second derivatives (tests/test_higher_order.py covers them in depth): eager's
    (gx,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    (gx_e,) = torch.autograd.grad(seq(x).sum(), x, create_graph=True)
    (ggx_e,) = torch.autograd.grad(gx_e.square().sum(), x)
    torch.testing.assert_close(ggx, ggx_e, rtol=1e-4, atol=1e-5)


def test_pack_is_one_autograd_node_with_the_padded_gradients():
    """Eager packing is one autograd node; each parameter gets its slice of the packed grads."""
    shapes = [(20, 7), (5, 20), (3, 5)]
    weights = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in shapes]
    biases = [
        torch.randn(20, device=DEVICE, requires_grad=True),
        None,
        torch.randn(3, device=DEVICE, requires_grad=True),
    ]
    w, b = FF.pack_narrow_mlp(weights, biases)
    assert type(w.grad_fn).__name__ == "PackNarrowFunctionBackward" and w.grad_fn is b.grad_fn
    assert w.shape == (3, 32, 32) and b.shape == (3, 32)
    for i, (wt, bt) in enumerate(zip(weights, biases, strict=True)):
        o, k = wt.shape
        assert torch.equal(w[i, :o, :k], wt) and not w[i, o:].any() and not w[i, :, k:].any()
        assert torch.equal(b[i, :o], bt) if bt is not None else not b[i].any()
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    torch.autograd.backward((w, b), (gw, gb))
    for i, (wt, bt) in enumerate(zip(weights, biases, strict=True)):
        o, k = wt.shape
        assert torch.equal(wt.grad, gw[i, :o, :k])
        if bt is not None:
            assert torch.equal(bt.grad, gb[i, :o])


def test_compile_fullgraph():
    torch._dynamo.reset()
    fused = FusedSequentialMLP.from_module(make_seq([12, 24, 5], ["relu", "silu"], [True, False]))
    x = torch.randn(7, 12, device=DEVICE, requires_grad=True)
    y = torch.compile(fused, fullgraph=True)(x)
    y.sum().backward()
    g, gw = x.grad.clone(), fused.get_submodule("0").weight.grad.clone()
    x.grad = None
    fused.zero_grad()
    y_ref = fused(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, x.grad)
    torch.testing.assert_close(gw, fused.get_submodule("0").weight.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_serve_what_fits(dtype, monkeypatch):
    """The Triton kernels (not the torch fallback) run wherever kernel_fits says they do."""
    from fusedmlp.kernels import narrow_mlp as kernels

    calls = []
    for name in ("narrow_mlp_forward", "narrow_mlp_backward"):
        real = getattr(kernels, name)
        spy = lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        monkeypatch.setattr(kernels, name, spy)
    seq = make_seq([9, 40, 4], ["gelu", "identity"], True, dtype)
    x = torch.randn(6, 9, device=DEVICE, dtype=dtype, requires_grad=True)
    FusedSequentialMLP.from_module(seq)(x).sum().backward()
    want = ["narrow_mlp_forward"] + (["narrow_mlp_backward"] if dtype != torch.float32 else [])
    assert calls == want
    assert kernels.kernel_fits(256, torch.bfloat16) and kernels.kernel_fits(128, torch.float32)
    assert not kernels.kernel_fits(256, torch.float32)
    # the backward's live tiles grow with depth (~2 sqrt(L)): a deep, wide stack trains on torch
    assert kernels.kernel_fits(256, torch.bfloat16, layers=9)
    assert not kernels.kernel_fits(256, torch.bfloat16, layers=64)
    assert not kernels.kernel_fits(64, torch.float32, layers=3)  # fp32 trains on torch


def test_deep_wide_stack_backward_falls_back_to_torch(monkeypatch):
    """Where the backward kernel would not fit in shared memory, the backward runs the torch
    reference (the forward still runs the kernel) and the gradients still meet the contract."""
    from fusedmlp.kernels import narrow_mlp as kernels

    monkeypatch.setattr(kernels, "SMEM_PER_PROGRAM", kernels.backward_smem_bytes(32, torch.bfloat16, 3) - 1)
    calls = []
    real = kernels.narrow_mlp_backward
    monkeypatch.setattr(kernels, "narrow_mlp_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    seq = make_seq([9, 20, 30, 4], ["gelu", "silu", "identity"], True, torch.bfloat16)
    check_contract(seq, torch.randn(40, 9, device=DEVICE).to(torch.bfloat16))
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_as_eager(dtype):
    seq = make_seq([6, 20, 4], ["relu", "identity"], True, dtype)
    x = torch.randn(5, 6, device=DEVICE).to(dtype)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    check_contract(seq, x)


def test_autocast_bf16():
    seq = make_seq([12, 24, 5], ["gelu", "identity"])
    fused = FusedSequentialMLP.from_module(seq)
    x = torch.randn(6, 12, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_f, y_e = fused(x), seq(x)
    assert y_f.dtype == y_e.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_e.float(), rtol=2e-2, atol=2e-2)
    y_f.float().sum().backward()
    w = fused.get_submodule("0").weight
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_every_recompute_segment(dtype):
    """The backward kernel's segment length (1 .. L; L recomputes nothing) leaves every gradient
    as the default computes it, and the default meets the contract (test_contract)."""
    from fusedmlp.kernels import narrow_mlp as kernels

    widths, acts, bias, _ = STACKS["depth5"]
    fused = FusedSequentialMLP.from_module(make_seq(widths, acts, bias, dtype))
    linears = fused.linears
    w, b = FF.pack_narrow_mlp([m.weight.detach() for m in linears], [m.bias.detach() for m in linears])
    x = torch.randn(300, widths[0], device=DEVICE).to(dtype)
    dy = torch.randn(300, widths[-1], device=DEVICE).to(dtype)
    args = (dy, x, w, b, widths, fused.activations)
    ref = kernels.narrow_mlp_backward(*args, block_m=32, segment=5)
    for seg in range(1, 5):
        out = kernels.narrow_mlp_backward(*args, block_m=32, segment=seg)
        for name, o, r in zip(("dx", "dw", "db"), out, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=0, atol=0, msg=f"segment {seg}: {name}")
    with pytest.raises(ValueError, match="segment must be in"):
        kernels.narrow_mlp_backward(*args, segment=6)
