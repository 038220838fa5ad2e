"""The Gluon Hopper kernels (kernels/gluon_gemm.py) on the GPU (marker ``gpu``; skipped without
CUDA, and without sm_90). The forward through the library with ``KernelOptions.gluon`` on, for
every activation it implements, bf16 and fp16, odd M/N/K, bias or not, M from 1 to 16384, under
the numerics contract; that it is really launched where :func:`gluon_gemm.serves` says so and
not elsewhere; and the backward kernel (not dispatched to yet) against float64."""

import pytest
import torch
from conftest import assert_contract

from fusedmlp import functional, options, reference
from fusedmlp.activations import Activation

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are for sm_90 (Hopper)")


@pytest.fixture
def launches(monkeypatch):
    from fusedmlp.kernels import gluon_gemm

    seen = []
    real = gluon_gemm._launch
    monkeypatch.setattr(gluon_gemm, "_launch", lambda k, g, a, kw: seen.append(kw) or real(k, g, a, kw))
    return seen


def _weights(rows, cols, dtype, bias):
    w = (torch.randn(rows, cols, device=DEV) / cols**0.5).to(dtype)
    return w, ((torch.randn(rows, device=DEV) * 0.1).to(dtype) if bias else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", [a.value for a in Activation if a.code < 7])
@pytest.mark.parametrize("gated", [True, False])
def test_forward_every_activation(act, gated, dtype, launches):
    M, K, N = 3000, 1000, 2730  # none a multiple of the tile; N % 8 != 0: pointer-store epilogue
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_in, b_in = _weights((2 if gated else 1) * N, K, dtype, bias=True)
    w_out, b_out = _weights(768, N, dtype, bias=gated)
    fn = functional.gated_mlp if gated else functional.mlp
    eager = reference.gated_mlp if gated else reference.mlp
    with torch.no_grad(), options.override(gluon=True):
        y = fn(x, w_in, b_in, w_out, b_out, activation=act)
    assert launches, "the Gluon kernel did not run"
    a = Activation(act)
    with torch.no_grad():
        y_eager = eager(x, w_in, b_in, w_out, b_out, a)
        y_ref = eager(x.double(), w_in.double(), None if b_in is None else b_in.double(), w_out.double(),
                      None if b_out is None else b_out.double(), a)
    assert_contract(f"gluon {act} {dtype}", y, y_eager, y_ref)


@pytest.mark.parametrize("M", [1, 100, 511, 512, 4097, 16384])
@pytest.mark.parametrize("K,N", [(768, 3072), (4096, 1408)])
def test_forward_row_counts_and_schedules(M, K, N, launches):
    dtype = torch.bfloat16
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_in, _ = _weights(2 * N, K, dtype, bias=False)
    w_out, _ = _weights(512, N, dtype, bias=False)
    with torch.no_grad(), options.override(gluon=True):
        y = functional.gated_mlp(x, w_in, None, w_out, None, activation="silu")
    from fusedmlp.kernels import gluon_gemm

    assert bool(launches) == (M >= gluon_gemm.MIN_ROWS)  # decode sizes stay on the pointer kernel
    if launches:
        assert launches[-1]["PINGPONG"] == (K <= gluon_gemm.PINGPONG_MAX_K)
    with torch.no_grad():
        y_eager = reference.gated_mlp(x, w_in, None, w_out, None, Activation.SILU)
        y_ref = reference.gated_mlp(x.double(), w_in.double(), None, w_out.double(), None, Activation.SILU)
    assert_contract(f"gluon M={M} K={K}", y, y_eager, y_ref)


def test_training_and_other_calls_keep_the_tl_dot_kernel(launches):
    """A pre-activation store (training at recompute none/activation), dropout, quick_gelu and
    traced code do not take the Gluon kernel; Recompute.GEMM training does."""
    x = torch.randn(1024, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w_in, _ = _weights(2 * 512, 256, torch.bfloat16, bias=False)
    w_out, _ = _weights(256, 512, torch.bfloat16, bias=False)
    with options.override(gluon=True):
        functional.gated_mlp(x, w_in, None, w_out, None, recompute="activation").sum().backward()
        functional.gated_mlp(x, w_in, None, w_out, None, dropout=0.1).sum().backward()
        with torch.no_grad():
            functional.gated_mlp(x, w_in, None, w_out, None, activation="quick_gelu")
        assert not launches
        functional.gated_mlp(x, w_in, None, w_out, None, recompute="gemm").sum().backward()
        assert launches


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("store_h", [True, False])
def test_backward_kernel(gated, store_h):
    """dh = dy W_out with the activation derivative in the epilogue, in place over pre."""
    from fusedmlp.kernels import gluon_gemm

    M, D, N = 3000, 1000, 2730
    dtype = torch.bfloat16
    dy = torch.randn(M, D, device=DEV).to(dtype)
    w_out = (torch.randn(D, N, device=DEV) / N**0.5).to(dtype)
    pre = torch.randn(M, (2 if gated else 1) * N, device=DEV).to(dtype)
    a = Activation.GELU_TANH
    ref_pre = pre.double()
    dh = dy.double() @ w_out.double()
    if gated:
        g, u = ref_pre[:, :N], ref_pre[:, N:]
        ref = [torch.cat(reference.gated_act_backward(dh, g, u, a), 1), reference.gated_act(g, u, a)]
    else:
        ref = [reference.act_backward(dh, ref_pre, a), a(ref_pre)]
    dpre, h = gluon_gemm.gemm_act_bwd(dy, w_out, pre.clone(), a, gated, store_h=store_h)
    eager_dh = dy @ w_out
    if gated:
        g, u = pre[:, :N], pre[:, N:]
        eager = [torch.cat(reference.gated_act_backward(eager_dh, g, u, a), 1), reference.gated_act(g, u, a)]
    else:
        eager = [reference.act_backward(eager_dh, pre, a), a(pre)]
    assert_contract("dpre", dpre, eager[0], ref[0])
    if store_h:
        assert_contract("h", h, eager[1], ref[1])
