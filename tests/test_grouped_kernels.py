"""The grouped (mixture-of-experts) GEMM kernels against their eager references, under the
numerics contract: each kernel vs the same-dtype reference vs the float64 reference.

The references loop over the experts on the host (kernels/grouped.py); the kernels never read
the offsets there, which ``test_no_host_sync`` checks.
"""

import itertools

import pytest
import torch
from conftest import DEVICE, assert_contract

from fusedmlp import reference
from fusedmlp.activations import Activation

grouped = pytest.importorskip("fusedmlp.kernels.grouped")

KERNELS_RUN = grouped.kernels_serve(torch.bfloat16, torch.device(DEVICE))
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN, reason="the Triton kernels do not run here (CPU without TRITON_INTERPRET=1)"
)
GPT_OSS = (1.702, 7.0)
DTYPES = [torch.bfloat16, torch.float32]


def _offsets(counts):
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64, device=DEVICE)


def _counts(routing, E):
    """Rows per expert: ``random`` (some experts empty), ``skewed`` (one expert has them all),
    ``one`` (E = 1), ``many`` (64 experts, few rows), ``aligned`` (multiples of the tile)."""
    if routing == "random":
        c = torch.randint(0, 30, (E,))
        c[torch.randperm(E)[: E // 3]] = 0
        return c.tolist()
    if routing == "skewed":
        return [0] * (E // 2) + [97] + [0] * (E - E // 2 - 1)
    if routing == "one":
        return [61]
    if routing == "many":
        c = [0] * 64
        for e in (0, 5, 6, 40, 63):
            c[e] = 3 if e != 40 else 1
        return c
    if routing == "aligned":
        return [32, 0, 16, 48]
    raise ValueError(routing)


def _d(t):
    return None if t is None else t.double()


def _gate_up_case(N, D, H, E, dtype, bias, scale=1.0):
    x = (scale * torch.randn(N, D, device=DEVICE)).to(dtype)
    w = (torch.randn(E, 2, H, D, device=DEVICE) / max(D, 1) ** 0.5).to(dtype)
    b = (scale * torch.randn(E, 2, H, device=DEVICE)).to(dtype) if bias else None
    return x, w, b


def _check_gate_up(x, w, b, offsets, activation, gpt_oss=None, store_pre=True):
    h, pre = grouped.grouped_gate_up_act(x, w, b, offsets, activation, gpt_oss=gpt_oss, store_pre=store_pre)
    e_h, e_pre = reference.grouped_gate_up_act(x, w, b, offsets, activation, gpt_oss=gpt_oss)
    r_h, r_pre = reference.grouped_gate_up_act(
        x.double(), w.double(), _d(b), offsets, activation, gpt_oss=gpt_oss
    )
    assert h.dtype == x.dtype and h.shape == r_h.shape
    assert_contract("h", h, e_h, r_h)
    if store_pre:
        assert_contract("pre", pre, e_pre, r_pre)
    else:
        assert pre is None
    return h, pre, r_pre


# numpy's exp overflows to inf inside sigmoid(-large) under the interpreter: the intended result
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [*Activation, "gpt_oss"], ids=str)
def test_gate_up_every_activation(act, dtype):
    """Every activation, and gpt-oss's clamped SwiGLU at magnitudes past its clamp."""
    gpt_oss = GPT_OSS if act == "gpt_oss" else None
    activation = Activation.SILU if gpt_oss else act
    E = 5
    counts = _counts("random", E)
    # gate|up ~ N(0, 3^2) (relu6 meets its clip), gpt-oss's ~ N(0, 8^2) (past limit = 7)
    x, w, b = _gate_up_case(sum(counts), 40, 37, E, dtype, bias=True, scale=8.0 if gpt_oss else 3.0)
    _, _, r_pre = _check_gate_up(x, w, b, _offsets(counts), activation, gpt_oss)
    if gpt_oss and sum(counts):
        gate, up = r_pre.chunk(2, -1)
        assert (gate > GPT_OSS[1]).any() and (up.abs() > GPT_OSS[1]).any(), "the clamp is not exercised"


@pytest.mark.parametrize(
    "bias,store_pre,dtype",
    [(False, False, torch.bfloat16), (False, True, torch.float16), (True, False, torch.bfloat16)],
)
def test_gate_up_bias_and_pre(bias, store_pre, dtype):
    x, w, b = _gate_up_case(45, 72, 50, 3, dtype, bias)
    _check_gate_up(x, w, b, _offsets([20, 0, 25]), Activation.GELU_TANH, store_pre=store_pre)


@pytest.mark.parametrize("routing", ["skewed", "one", "many", "aligned"])
def test_gate_up_routings(routing):
    E = {"one": 1, "many": 64}.get(routing, 4)
    counts = _counts(routing, E)
    x, w, b = _gate_up_case(sum(counts), 33, 20, E, torch.bfloat16, bias=True)
    _check_gate_up(x, w, b, _offsets(counts), Activation.SILU, GPT_OSS if routing == "many" else None)


@pytest.mark.parametrize("D,H", [(1, 1), (3, 70), (0, 5)])
def test_gate_up_odd_sizes(D, H):
    """One column, widths past a tile, and D = 0 (gate|up = the bias)."""
    x, w, b = _gate_up_case(19, D, H, 3, torch.float32, bias=True)
    _check_gate_up(x, w, b, _offsets([7, 12, 0]), Activation.GELU)


def test_gate_up_strided_input_and_out():
    """x a row window of a wider buffer, w a permuted view, h written into a NaN-filled strided
    view: every row of every expert is written, nothing else is."""
    N, D, H, E = 50, 24, 40, 4
    counts = [9, 0, 30, 11]
    buf = torch.randn(N, D + 10, device=DEVICE).to(torch.bfloat16)
    x = buf[:, 3 : 3 + D]
    w = (torch.randn(E, 2, D, H, device=DEVICE) / D**0.5).to(torch.bfloat16).transpose(2, 3)
    big = torch.full((N, H + 8), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out = big[:, 4 : 4 + H]
    h, _ = grouped.grouped_gate_up_act(x, w, None, _offsets(counts), Activation.SILU, out=out)
    assert h.data_ptr() == out.data_ptr()
    assert not big[:, 4 : 4 + H].isnan().any() and big[:, :4].isnan().all() and big[:, 4 + H :].isnan().all()
    e_h, _ = reference.grouped_gate_up_act(x, w, None, _offsets(counts), Activation.SILU)
    r_h, _ = reference.grouped_gate_up_act(x.double(), w.double(), None, _offsets(counts), "silu")
    assert_contract("h", h, e_h, r_h)


def _matmul_case(N, K, Nout, E, dtype, trans_b, bias, scale_dtype):
    a = torch.randn(N, K, device=DEVICE).to(dtype)
    shape = (E, Nout, K) if trans_b else (E, K, Nout)
    b = (torch.randn(shape, device=DEVICE) / max(K, 1) ** 0.5).to(dtype)
    bias_ = torch.randn(E, Nout, device=DEVICE).to(dtype) if bias else None
    scale = torch.rand(N, device=DEVICE).to(scale_dtype) if scale_dtype is not None else None
    return a, b, bias_, scale


def _check_matmul(a, b, offsets, trans_b, bias, scale, out=None):
    c = grouped.grouped_matmul(a, b, offsets, trans_b=trans_b, bias=bias, row_scale=scale, out=out)
    e_c = reference.grouped_matmul(a, b, offsets, trans_b=trans_b, bias=bias, row_scale=scale)
    r_c = reference.grouped_matmul(
        a.double(), b.double(), offsets, trans_b=trans_b, bias=_d(bias), row_scale=_d(scale)
    )
    assert c.dtype == a.dtype
    assert_contract("c", c, e_c, r_c)
    return c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("bias,scale", [(False, None), (True, None), (False, "fp32"), (True, "same")])
def test_matmul(bias, scale, trans_b, dtype):
    scale_dtype = {None: None, "fp32": torch.float32, "same": dtype}[scale]
    counts = _counts("random", 6)
    a, b, bias_, s = _matmul_case(sum(counts), 43, 35, 6, dtype, trans_b, bias, scale_dtype)
    _check_matmul(a, b, _offsets(counts), trans_b, bias_, s)


@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_strided_b(trans_b):
    """b as the transposed view of the other layout (read in place), then as a strided slice."""
    E, K, Nout = 3, 40, 33
    counts = [17, 0, 29]
    a = torch.randn(sum(counts), K, device=DEVICE).to(torch.bfloat16)
    other = (E, K, Nout) if trans_b else (E, Nout, K)
    b = (torch.randn(other, device=DEVICE) / K**0.5).to(torch.bfloat16).transpose(1, 2)
    assert not b.is_contiguous()
    _check_matmul(a, b, _offsets(counts), trans_b, None, None)
    wide = (torch.randn(E, 2 * other[1], 3 * other[2], device=DEVICE) / K**0.5).to(torch.bfloat16)
    b = wide[:, ::2, 1::3].transpose(1, 2)
    _check_matmul(a, b, _offsets(counts), trans_b, None, torch.rand(sum(counts), device=DEVICE))


@pytest.mark.parametrize("routing", ["skewed", "one", "many", "aligned"])
def test_matmul_routings(routing):
    E = {"one": 1, "many": 64}.get(routing, 4)
    counts = _counts(routing, E)
    a, b, bias, s = _matmul_case(sum(counts), 20, 50, E, torch.bfloat16, True, True, torch.float32)
    _check_matmul(a, b, _offsets(counts), True, bias, s)


@pytest.mark.parametrize("K,Nout", [(1, 1), (0, 7), (70, 3)])
def test_matmul_odd_sizes(K, Nout):
    a, b, bias, s = _matmul_case(21, K, Nout, 2, torch.float32, False, True, torch.float32)
    _check_matmul(a, b, _offsets([4, 17]), False, bias, s)


def test_matmul_out():
    a, b, _, _ = _matmul_case(30, 16, 20, 2, torch.bfloat16, True, False, None)
    big = torch.full((30, 48), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    c = _check_matmul(a, b, _offsets([12, 18]), True, None, None, out=big[:, 8:28])
    assert c.data_ptr() == big[:, 8:28].data_ptr() and not c.isnan().any() and big[:, :8].isnan().all()


@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_scatter_rows(trans_b):
    """scatter_rows: row r of the product lands at row perm[r] (the experts' rows back in token
    order); every row written once, nothing else."""
    counts = _counts("random", 5)
    N = sum(counts)
    a, b, bias, s = _matmul_case(N, 24, 37, 5, torch.bfloat16, trans_b, True, torch.float32)
    perm, off = torch.randperm(N, device=DEVICE), _offsets(counts)
    c = grouped.grouped_matmul(a, b, off, trans_b=trans_b, bias=bias, row_scale=s, scatter_rows=perm)
    e_c = reference.grouped_matmul(a, b, off, trans_b=trans_b, bias=bias, row_scale=s)
    r_c = reference.grouped_matmul(
        a.double(), b.double(), off, trans_b=trans_b, bias=_d(bias), row_scale=_d(s)
    )
    assert_contract("c", c[perm], e_c, r_c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", ["random", "skewed", "many"])
def test_weight_and_bias_grad(routing, dtype):
    E = 64 if routing == "many" else 5
    counts = _counts(routing, E)
    N = sum(counts)
    Ka = 20 if routing == "many" else 70  # 64 experts x the output tiles: interpreter time
    a = torch.randn(N, Ka, device=DEVICE).to(dtype)
    b = torch.randn(N, 37, device=DEVICE).to(dtype)
    offsets = _offsets(counts)
    dw = grouped.grouped_weight_grad(a, b, offsets, E)
    assert dw.shape == (E, Ka, 37) and dw.dtype == dtype
    e_dw = reference.grouped_weight_grad(a, b, offsets, E)
    r_dw = reference.grouped_weight_grad(a.double(), b.double(), offsets, E)
    assert_contract("dw", dw, e_dw, r_dw)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert (dw[empty] == 0).all()
    db = grouped.grouped_bias_grad(b, offsets, E)
    assert db.shape == (E, 37) and db.dtype == dtype
    e_db = reference.grouped_bias_grad(b, offsets, E)
    r_db = reference.grouped_bias_grad(b.double(), offsets, E)
    assert_contract("db", db, e_db, r_db)
    assert (db[empty] == 0).all()


def test_gate_up_weight_grad_layout():
    """d w of the gate|up projection: d(gate|up)^T x per expert, viewed as [E, 2, H, D]."""
    E, H, D = 3, 12, 20
    counts = [10, 0, 14]
    x = torch.randn(sum(counts), D, device=DEVICE, requires_grad=True)
    w = torch.randn(E, 2, H, D, device=DEVICE, requires_grad=True)
    h, _ = reference.grouped_gate_up_act(x, w, None, _offsets(counts), Activation.SILU)
    dh = torch.randn_like(h)
    h.backward(dh)
    _, pre = reference.grouped_gate_up_act(x.detach(), w.detach(), None, _offsets(counts), "silu")
    gate, up = pre.chunk(2, -1)
    d_pre = torch.cat([Activation.SILU.backward(dh * up, gate), dh * Activation.SILU(gate)], -1)
    dw = grouped.grouped_weight_grad(d_pre, x.detach(), _offsets(counts), E).view(E, 2, H, D)
    torch.testing.assert_close(dw, w.grad, rtol=1e-4, atol=1e-4)


def test_empty_inputs():
    """N = 0 (every expert empty): empty outputs, zero gradients, no launch needed."""
    E = 4
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=DEVICE)
    x, w, b = _gate_up_case(0, 16, 8, E, torch.bfloat16, bias=True)
    h, pre = grouped.grouped_gate_up_act(x, w, b, offsets, Activation.SILU, store_pre=True)
    assert h.shape == (0, 8) and pre.shape == (0, 16)
    c = grouped.grouped_matmul(x, w[:, 0], offsets, trans_b=True, row_scale=torch.ones(0, device=DEVICE))
    assert c.shape == (0, 8)
    dw = grouped.grouped_weight_grad(x, h, offsets, E)
    assert dw.shape == (E, 16, 8) and (dw == 0).all()
    db = grouped.grouped_bias_grad(h, offsets, E)
    assert db.shape == (E, 8) and (db == 0).all()


def test_float64_takes_the_reference():
    counts = [5, 0, 9]
    x, w, b = _gate_up_case(14, 8, 6, 3, torch.float64, bias=True)
    h, pre = grouped.grouped_gate_up_act(x, w, b, _offsets(counts), "silu", store_pre=True)
    r_h, r_pre = reference.grouped_gate_up_act(x, w, b, _offsets(counts), "silu")
    assert torch.equal(h, r_h) and torch.equal(pre, r_pre)
    kw = {"trans_b": True, "bias": b[:, 0]}
    c = grouped.grouped_matmul(x, w[:, 1], _offsets(counts), **kw)
    assert torch.equal(c, reference.grouped_matmul(x, w[:, 1], _offsets(counts), **kw))
    dw = grouped.grouped_weight_grad(x, h, _offsets(counts), 3)
    assert torch.equal(dw, reference.grouped_weight_grad(x, h, _offsets(counts), 3))


@needs_kernels
def test_offsets_out_of_range_stay_in_bounds():
    """Offsets past N or decreasing give wrong rows, never an access outside the tensors: the
    kernels clamp every expert's rows into [0, N]."""
    N = 20
    x, w, _ = _gate_up_case(N, 16, 8, 3, torch.float32, bias=False)
    bad = torch.tensor([0, 6, 2, N + 1000], dtype=torch.int64, device=DEVICE)
    h, _ = grouped.grouped_gate_up_act(x, w, None, bad, Activation.SILU)
    good = torch.tensor([0, 6, 6, N], dtype=torch.int64, device=DEVICE)  # what the clamps make of it
    r_h, _ = reference.grouped_gate_up_act(x, w, None, good, Activation.SILU)
    torch.testing.assert_close(h[:2], r_h[:2])
    torch.testing.assert_close(h[6:], r_h[6:])
    dw = grouped.grouped_weight_grad(x, h, bad, 3)
    assert torch.isfinite(dw).all()


def test_bad_arguments():
    x, w, b = _gate_up_case(10, 16, 8, 2, torch.float32, bias=True)
    off = _offsets([4, 6])
    call = grouped.grouped_gate_up_act
    with pytest.raises(TypeError, match="int64"):
        call(x, w, b, off.int(), "silu")
    with pytest.raises(ValueError, match="num_experts \\+ 1 = 3"):
        call(x, w, b, off[:2], "silu")
    with pytest.raises(ValueError, match="offsets are on meta"):
        call(x, w, b, off.to("meta"), "silu")
    with pytest.raises(ValueError, match="w must be \\[E, 2, H, D\\]"):
        call(x, w[:, 0], b, off, "silu")
    with pytest.raises(ValueError, match="D = 16"):
        call(x[:, :15], w, b, off, "silu")
    with pytest.raises(ValueError, match="bias must have shape"):
        call(x, w, b[:, 0], off, "silu")
    with pytest.raises(TypeError, match=r"w must be torch\.float32"):
        call(x, w.half(), b, off, "silu")
    with pytest.raises(ValueError, match="unit-stride columns"):
        call(torch.randn(16, 10, device=DEVICE).T, w, b, off, "silu")
    with pytest.raises(ValueError, match="clamped SwiGLU"):
        call(x, w, b, off, "gelu", gpt_oss=GPT_OSS)
    with pytest.raises(ValueError, match="limit > 0"):
        call(x, w, b, off, "silu", gpt_oss=(1.0, -1.0))
    with pytest.raises(ValueError, match="out must have shape"):
        call(x, w, b, off, "silu", out=torch.empty(10, 9, device=DEVICE))
    with pytest.raises(ValueError, match="unknown activation"):
        call(x, w, b, off, "swishy")
    with pytest.raises(ValueError, match="K = 8"):
        grouped.grouped_matmul(x, w[:, 0], off, trans_b=False)
    with pytest.raises(TypeError, match="row_scale must be float32"):
        grouped.grouped_matmul(x, w[:, 0], off, trans_b=True, row_scale=torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_scale must have shape"):
        grouped.grouped_matmul(x, w[:, 0], off, trans_b=True, row_scale=torch.ones(9))
    with pytest.raises(ValueError, match=r"scatter_rows must have shape \(10,\)"):
        grouped.grouped_matmul(x, w[:, 0], off, trans_b=True, scatter_rows=torch.arange(9, device=DEVICE))
    with pytest.raises(TypeError, match="scatter_rows must be int64"):
        grouped.grouped_matmul(x, w[:, 0], off, trans_b=True, scatter_rows=torch.arange(10.0, device=DEVICE))
    with pytest.raises(ValueError, match="same rows"):
        grouped.grouped_weight_grad(x, x[:9], off, 2)
    with pytest.raises(ValueError, match="num_experts \\+ 1 = 4"):
        grouped.grouped_bias_grad(x, off, 3)


@needs_kernels
def test_no_host_sync(monkeypatch):
    """The launch path never reads a tensor's value on the host (a GPU synchronisation)."""
    E = 6
    counts = _counts("random", E)
    offsets = _offsets(counts)
    x, w, b = _gate_up_case(sum(counts), 24, 20, E, torch.bfloat16, bias=True)
    scale = torch.rand(sum(counts), device=DEVICE)

    def no_sync(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, no_sync)
        h, pre = grouped.grouped_gate_up_act(x, w, b, offsets, "silu", store_pre=True, gpt_oss=GPT_OSS)
        c = grouped.grouped_matmul(h, w[:, 0], offsets, trans_b=False, row_scale=scale)
        dw = grouped.grouped_weight_grad(pre, x, offsets, E)
        db = grouped.grouped_bias_grad(pre, offsets, E)
    r_h, r_pre = reference.grouped_gate_up_act(x, w, b, offsets, Activation.SILU, gpt_oss=GPT_OSS)
    for got, want in ((h, r_h), (pre, r_pre)):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)
    assert c.shape == (sum(counts), 24) and dw.shape == (E, 40, 24) and db.shape == (E, 40)


@pytest.mark.gpu
def test_no_host_sync_cuda():
    """On a GPU, under torch's sync debug mode (errors on a synchronising call)."""
    E = 8
    counts = _counts("random", E)
    offsets = _offsets(counts)
    x, w, b = _gate_up_case(sum(counts), 64, 48, E, torch.bfloat16, bias=True)
    for _ in range(2):  # the second call takes the launch plans
        torch.cuda.set_sync_debug_mode("error")
        try:
            h, pre = grouped.grouped_gate_up_act(x, w, b, offsets, Activation.SILU, store_pre=True)
            grouped.grouped_matmul(h, w[:, 1], offsets, trans_b=False, row_scale=torch.ones_like(x[:, 0]))
            grouped.grouped_weight_grad(pre, x, offsets, E)
            grouped.grouped_bias_grad(pre, offsets, E)
        finally:
            torch.cuda.set_sync_debug_mode("default")
