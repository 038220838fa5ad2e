"""Property-based tests (hypothesis): the functional ops and the modules against a float64
reference under the numerics contract, over shapes, dtypes, strides, biases, activations,
recompute levels and input magnitudes that hypothesis draws, outputs and every gradient.

Deterministic (derandomize) and bounded (max_examples) so that CI under Triton's interpreter
stays within its time; FUSEDMLP_HYPOTHESIS_EXAMPLES=N runs N examples per test from random
seeds, for a longer exploration.
"""

import itertools
import os

import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fusedmlp import FusedGatedMLP, FusedMLP, functional, reference
from fusedmlp.activations import Activation
from fusedmlp.numerics import check_contract

SMALL_SAMPLE = 256  # elements
SMALL_ROWS = 16  # rows of the input
SMALL_SAMPLE_EPS = 16.0
EXAMPLES = os.environ.get("FUSEDMLP_HYPOTHESIS_EXAMPLES")  # set: a longer run, random seeds
SETTINGS = settings(
    max_examples=int(EXAMPLES or 60),
    deadline=None,
    derandomize=EXAMPLES is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ACTS = [a for a in Activation]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@st.composite
def inputs(draw, width: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """[*lead, width] with 0 to 2 leading dimensions (sizes 0..9), random values at one of
    several magnitudes (where activations differ), contiguous or not."""
    lead = draw(st.lists(st.integers(0, 9), min_size=0, max_size=2))
    scale = draw(st.sampled_from([0.05, 1.0, 8.0, 40.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "strided":  # every other column of a wider tensor
        x = torch.randn(*lead, 2 * width, generator=g, dtype=torch.float64)[..., ::2]
    elif layout == "transposed" and lead:  # the last two dimensions swapped in memory
        x = torch.randn(*lead[:-1], width, lead[-1], generator=g, dtype=torch.float64).transpose(-1, -2)
    else:
        x = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    return (x * scale).to(DEVICE, dtype).requires_grad_(grad)


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int, bias: bool) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols**0.5).to(DEVICE, dtype)
    b = (torch.randn(rows, generator=g, dtype=torch.float64) * 0.5).to(DEVICE, dtype) if bias else None
    return w.requires_grad_(), (b.requires_grad_() if b is not None else None)


def _run(fn, tensors, grad_seed):
    """fn's output and the gradients of every tensor in ``tensors`` (None where absent)."""
    y = fn(*tensors)
    g = torch.Generator().manual_seed(grad_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    present = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(y, present, dy, allow_unused=True) if y.numel() else [None] * len(present)
    zero = torch.zeros_like
    return [y.detach(), *(zero(t) if gr is None else gr for t, gr in zip(present, grads, strict=True))]


def _contract(name, fused_fn, eager_fn, tensors, grad_seed):
    """The contract on the output and every gradient: fused vs same-dtype eager vs float64."""
    rows = tensors[0].numel() // max(tensors[0].shape[-1], 1) if tensors[0].dim() else 1
    fresh = lambda ts: [None if t is None else t.detach().clone().requires_grad_() for t in ts]
    fused = _run(fused_fn, fresh(tensors), grad_seed)
    eager = _run(eager_fn, fresh(tensors), grad_seed)
    ref = _run(eager_fn, [None if t is None else t.detach().double().requires_grad_() for t in tensors],
               grad_seed)
    for i, (f, e, r) in enumerate(zip(fused, eager, ref, strict=True)):
        if f.dtype == torch.float64:  # eager is the reference: the contract is for lower precisions
            scale = r.abs().max().item() if r.numel() else 0.0
            torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12 * (1 + scale), equal_nan=True)
            continue
        check = check_contract(f"{name} [{i}]", f, e, r)
        if check.ok or (f.numel() >= SMALL_SAMPLE and rows >= SMALL_ROWS):
            assert check.ok, str(check)
            continue
        # A max over a handful of values is a noisy statistic: few elements, or few rows (every
        # weight gradient is then an outer product of a few vectors, its max the product of
        # their worst roundings). Where eager's BLAS happens to round a cancelling sum exactly
        # (one row: a dot product where fused runs a GEMM; H = 1: every element of dx inherits
        # that one sum's error), 2x eager's error is below one ulp while fused is a few ulps of
        # the summed terms off; where every element is tiny (a saturated sigmoid's gradient,
        # which torch's float64 (1 - y) y rounds to 0 and the kernel computes), the tensor's own
        # scale is 0 (and torch's float64 tanh-form gelu of a saturated input rounds to 0 where
        # the kernel's x * sigmoid(2u) form keeps ~1e-25). Small samples get SMALL_SAMPLE_EPS
        # epsilons of the call's largest magnitude (inputs, output and gradients), and values
        # below the dtype's normal range over epsilon count as 0: still 1e-6 relative in
        # float32, where a real defect (a bf16 intermediate, a wrong formula) misses by far.
        scales = [*ref, *(t for t in tensors if t is not None)]  # outputs, gradients and inputs
        mags = [t.detach().double().abs().nan_to_num(0, 0, 0).max().item() for t in scales if t.numel()]
        info = torch.finfo(f.dtype)
        atol = SMALL_SAMPLE_EPS * 2 * info.eps * max(mags, default=0.0) + info.tiny / info.eps
        assert check.nonfinite_match and check.fused.max_abs <= 2 * check.eager.max_abs + atol, str(check)


# Where the derivative jumps (relu, relu6 at 0; relu6 at 6). In 16-bit dtypes a pre-activation
# within rounding distance of a kink takes either side of it depending on the GEMM's summation
# order: eager and fused each pick one (so does the float64 reference, from the unrounded value)
# and a gradient element differs by |dh * x|. The derivative is ill-conditioned there, not the
# kernel wrong: such draws are discarded for the gradient contract (fp32 keeps them all).
KINKS = {Activation.RELU: (0.0,), Activation.RELU6: (0.0, 6.0)}


def near_kink(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: Activation, rows: int) -> bool:
    """Whether any of the first ``rows`` pre-activations of x @ w^T + b lies within 16-bit
    rounding and summation error of a kink of ``act`` (x, w in a 16-bit dtype)."""
    if act not in KINKS or x.dtype not in (torch.float16, torch.bfloat16) or x.numel() == 0:
        return False
    x64, w64 = x.detach().double().reshape(-1, x.shape[-1]), w.detach().double()[:rows]
    z = x64 @ w64.t() + (0 if b is None else b.detach().double()[:rows])
    spread = x64.abs() @ w64.abs().t()  # what the summation order can move
    eps = torch.finfo(x.dtype).eps
    return any(bool(((z - k).abs() < 4 * eps * (spread + abs(k))).any()) for k in KINKS[act])


@SETTINGS
@given(data=st.data(), gated=st.booleans(), act=st.sampled_from(ACTS), dtype=st.sampled_from(DTYPES),
       d=st.integers(1, 40), h=st.integers(1, 48), d_out=st.integers(1, 24), bias=st.booleans(),
       recompute=st.sampled_from(["none", "activation", "gemm"]), seed=st.integers(0, 2**20))
def test_mlp_property(data, gated, act, dtype, d, h, d_out, bias, recompute, seed):
    x = data.draw(inputs(d, dtype))
    w_in, b_in = _weight(2 * h if gated else h, d, dtype, seed, bias)
    w_out, b_out = _weight(d_out, h, dtype, seed + 1, bias)
    assume(not near_kink(x, w_in, b_in, act, h))  # gate rows (or all rows): those the act sees
    op = functional.gated_mlp if gated else functional.mlp
    eager = reference.gated_mlp if gated else reference.mlp
    _contract(
        f"{'gated' if gated else 'plain'} {act.value} {dtype} x{tuple(x.shape)} H={h}",
        lambda *t: op(*t, activation=act, recompute=recompute),
        lambda *t: eager(*t, act),
        [x, w_in, b_in, w_out, b_out],
        seed,
    )


@SETTINGS
@given(data=st.data(), act=st.sampled_from(ACTS), dtype=st.sampled_from(DTYPES), d=st.integers(1, 40),
       n=st.integers(1, 48), bias=st.booleans(), seed=st.integers(0, 2**20))
def test_linear_act_property(data, act, dtype, d, n, bias, seed):
    x = data.draw(inputs(d, dtype))
    w, b = _weight(n, d, dtype, seed, bias)
    assume(not near_kink(x, w, b, act, n))
    _contract(
        f"linear_act {act.value} {dtype} x{tuple(x.shape)}",
        lambda *t: functional.linear_act(*t, activation=act),
        lambda x, w, b: act(torch.nn.functional.linear(x, w, b)),
        [x, w, b],
        seed,
    )


@SETTINGS
@given(data=st.data(), act=st.sampled_from(ACTS), dtype=st.sampled_from(DTYPES), n=st.integers(1, 70),
       merged=st.booleans(), seed=st.integers(0, 2**20))
def test_gated_act_property(data, act, dtype, n, merged, seed):
    gate = data.draw(inputs(2 * n if merged else n, dtype))
    if merged:
        fused_fn = lambda gu: functional.gated_act(gu, None, act)
        eager_fn = lambda gu: reference.gated_act(*reference.split_gate_up(gu), act)
        tensors = [gate]
    else:
        up = (torch.randn_like(gate.double()) * 3).to(dtype).requires_grad_()
        fused_fn = lambda g, u: functional.gated_act(g, u, act)
        eager_fn = lambda g, u: reference.gated_act(g, u, act)
        tensors = [gate, up]
    _contract(f"gated_act {act.value} {dtype} x{tuple(gate.shape)}", fused_fn, eager_fn, tensors, seed)


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       widths=st.lists(st.integers(1, 40), min_size=2, max_size=5),
       acts=st.lists(st.sampled_from(ACTS), min_size=4, max_size=4),
       biases=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**20))
def test_narrow_mlp_property(data, dtype, widths, acts, biases, seed):
    x = data.draw(inputs(widths[0], dtype))
    pairs = enumerate(itertools.pairwise(widths))
    layers = [_weight(o, i, dtype, seed + k, biases[k]) for k, (i, o) in pairs]
    L = len(layers)
    tensors = [x, *(w for w, _ in layers), *(b for _, b in layers)]

    def split(t):
        return t[0], list(t[1 : 1 + L]), list(t[1 + L :])

    _contract(
        f"narrow {widths} {[a.value for a in acts[:L]]} {dtype}",
        lambda *t: functional.narrow_mlp(*split(t), acts[:L]),
        lambda *t: reference.narrow_mlp(*split(t), acts[:L]),
        tensors,
        seed,
    )


@SETTINGS
@given(data=st.data(), cls=st.sampled_from([FusedGatedMLP, FusedMLP]), act=st.sampled_from(ACTS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), d=st.integers(1, 40), h=st.integers(1, 48),
       bias=st.booleans(), recompute=st.sampled_from(["none", "activation", "gemm"]))
def test_module_property(data, cls, act, dtype, d, h, bias, recompute):
    """The module's forward and backward (through torch.func.functional_call, so that the
    gradients of its parameters are returned) against the eager formula over the same tensors."""
    torch.manual_seed(data.draw(st.integers(0, 2**20)))
    m = cls(d, h, act, bias=bias, recompute=recompute, device=DEVICE, dtype=dtype)
    x = data.draw(inputs(d, dtype))
    names = ["in_weight", "in_bias", "out_weight", "out_bias"]
    params = [getattr(m, n) for n in names]
    assume(not near_kink(x, m.merged_in_weight(), m.merged_in_bias(), m.activation, h))
    gated = cls is FusedGatedMLP
    eager = reference.gated_mlp if gated else reference.mlp

    def eager_fn(x, w_in, b_in, *out):  # a gated module's [2, H, D] gate|up as the [2H, D] it stands for
        if gated:
            w_in, b_in = w_in.flatten(0, 1), (None if b_in is None else b_in.flatten())
        return eager(x, w_in, b_in, *out, act)

    def fused_fn(x, *ps):
        values = {n: p for n, p in zip(names, ps, strict=True) if p is not None}
        return torch.func.functional_call(m, values, (x,))

    _contract(
        f"{cls.__name__} {act.value} {dtype} x{tuple(x.shape)}",
        fused_fn,
        eager_fn,
        [x, *(None if p is None else p.detach() for p in params)],
        0,
    )


def _agree(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= 1e-3 * (1 + b.abs()))


@pytest.mark.parametrize("act", ACTS)
def test_half_precision_backward_stays_finite_where_eager_does(act):
    """16-bit derivatives computed in float32, as torch's own backward kernels do: no overflow
    to Inf/NaN at large inputs; piecewise-linear gradients selected (inf * 0 is not NaN). Each
    element agrees with eager in float16 or with the float64 reference (where float16 eager
    itself underflows)."""
    x = torch.tensor([-7e4, -300.0, -20.0, -1.0, 0.0, 0.5, 6.0, 20.0, 300.0, 6e4], dtype=torch.float16)
    for grad in (torch.ones_like(x), torch.full_like(x, float("inf"))):
        grads = []
        for fn, dtype in ((lambda t: functional.act(t, act), torch.float16), (act, torch.float16),
                          (act, torch.float64)):
            t = x.to(DEVICE, dtype, copy=True).requires_grad_()
            fn(t).backward(grad.to(DEVICE, dtype))
            grads.append(t.grad)
        fused, eager, ref = grads
        ok = _agree(fused, eager) | _agree(fused, ref.to(torch.float16))
        assert ok.all(), f"{act.value}: fused {fused.tolist()} eager {eager.tolist()} float64 {ref.tolist()}"
        if grad.isfinite().all():
            assert fused.isfinite().all() or not eager.isfinite().all()
