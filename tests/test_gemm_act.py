"""The GEMM with the activation in its epilogue, called directly (both load paths)."""

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_contract

from fusedmlp import ops, options, reference
from fusedmlp.activations import Activation

gemm = pytest.importorskip("fusedmlp.kernels.gemm_act")
common = pytest.importorskip("fusedmlp.kernels.gemm")


# The fused GEMMs serve bf16 and fp16; fp32 goes through cuBLAS (ops._fused_gemm_ok says why).
GEMM_DTYPES = [torch.bfloat16, torch.float16]


def _eager(x, w, b, act, gated):
    pre = F.linear(x, w, b)
    return (reference.gated_act(*pre.chunk(2, -1), act) if gated else act(pre)), pre


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", [(1, 64, 40), (37, 72, 50), (70, 43, 33), (5, 128, 96)])
def test_gemm_act_contract(M, K, N, bias, gated, dtype):
    act = Activation.GELU_TANH if gated else Activation.SILU
    rows = 2 * N if gated else N
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(rows, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(rows, device=DEVICE).to(dtype) if bias else None
    h, pre = gemm.gemm_act(x, w, b, act, gated, store_preact=True)
    e_h, e_pre = _eager(x, w, b, act, gated)
    r_h, r_pre = _eager(x.double(), w.double(), b.double() if bias else None, act, gated)
    print("TMA path" if common.tma_ok(x, w) else "pointer path")
    assert_contract("h", h, e_h, r_h)
    assert_contract("pre", pre, e_pre, r_pre)


def test_both_load_paths_are_exercised():
    x16 = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    assert common.tma_ok(x16, torch.randn(8, 64, device=DEVICE, dtype=torch.float16))
    x_odd = torch.randn(4, 43, device=DEVICE, dtype=torch.float16)
    assert not common.tma_ok(x_odd, torch.randn(8, 43, device=DEVICE, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_rows_and_poisoned_output(dtype):
    """x as a row window of a wider buffer (row stride != K); every output element written."""
    M, K, N = 45, 64, 70
    big = torch.randn(M, K + 24, device=DEVICE).to(dtype)
    x = big[:, 8 : 8 + K]
    w = (torch.randn(2 * N, K, device=DEVICE) / 8).to(dtype)
    h, _ = gemm.gemm_act(x, w, None, Activation.SILU, gated=True)
    assert not torch.isnan(h).any()
    e_h, _ = _eager(x, w, None, Activation.SILU, True)
    r_h, _ = _eager(x.double(), w.double(), None, Activation.SILU, True)
    assert_contract("h", h, e_h, r_h)


def test_empty_and_bad_shapes():
    w = torch.randn(8, 16, device=DEVICE)
    h, pre = gemm.gemm_act(torch.randn(0, 16, device=DEVICE), w, None, Activation.RELU, True, True)
    assert h.shape == (0, 4) and pre.shape == (0, 8)
    with pytest.raises(ValueError, match="columns"):
        gemm.gemm_act(torch.randn(3, 15, device=DEVICE), w, None, Activation.RELU, True)
    with pytest.raises(ValueError, match="even number of rows"):
        gemm.gemm_act(torch.randn(3, 16, device=DEVICE), w[:7], None, Activation.RELU, True)


@pytest.mark.parametrize("gated", [True, False])
def test_mlp_opcheck(gated):
    # Weights scaled as nn.Linear's, so values stay O(1): on a CPU, opcheck's traced run takes the
    # torch reference (Inductor's CPU code runs no Triton) and its eager run the interpreter's
    # kernels, which agree to fp32 rounding, within opcheck's tolerance at that scale.
    D, H = 16, 24
    x = torch.randn(5, D, device=DEVICE, requires_grad=True)
    w_in = (torch.randn(2 * H if gated else H, D, device=DEVICE) / D**0.5).requires_grad_()
    b_in = torch.randn(w_in.shape[0], device=DEVICE, requires_grad=True)
    w_out = (torch.randn(D, H, device=DEVICE) / H**0.5).requires_grad_()
    for level in ("none", "activation", "gemm"):
        torch.library.opcheck(ops.mlp, (x, w_in, b_in, w_out, None, "gelu_tanh", gated, level, False))
    # inference saves nothing for a backward: checked without gradients
    args = [t.detach() for t in (x, w_in, b_in, w_out)]
    torch.library.opcheck(ops.mlp, (*args[:3], args[3], None, "gelu_tanh", gated, "activation", True))


bwd = pytest.importorskip("fusedmlp.kernels.gemm_act_bwd")


def _eager_bwd(dy, w_out, pre, act, gated):
    dh = dy @ w_out
    if gated:
        g, u = pre.chunk(2, -1)
        return torch.cat(reference.gated_act_backward(dh, g, u, act), -1), reference.gated_act(g, u, act)
    return reference.act_backward(dh, pre, act), act(pre)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("M,D,N", [(1, 64, 40), (37, 72, 50), (70, 43, 33), (80, 64, 40)])
def test_gemm_act_backward_contract(M, D, N, gated, dtype):
    act = Activation.SILU if gated else Activation.GELU
    dy = torch.randn(M, D, device=DEVICE).to(dtype)
    w_out = (torch.randn(D, N, device=DEVICE) / D**0.5).to(dtype)
    pre = torch.randn(M, (2 if gated else 1) * N, device=DEVICE).to(dtype)
    dpre, h = bwd.gemm_act_backward(dy, w_out, pre, act, gated)
    e_dpre, e_h = _eager_bwd(dy, w_out, pre, act, gated)
    print("TMA path" if M > 64 and common.tma_ok(dy, w_out) else "pointer path")
    r_dpre, r_h = _eager_bwd(dy.double(), w_out.double(), pre.double(), act, gated)
    assert_contract("d pre", dpre, e_dpre, r_dpre)
    assert_contract("h", h, e_h, r_h)
    # in place over pre, without h: the same d(gate|up)
    pre2 = pre.clone()
    out, none = bwd.gemm_act_backward(dy, w_out, pre2, act, gated, dpre=pre2, store_h=False)
    assert none is None and out.data_ptr() == pre2.data_ptr()
    torch.testing.assert_close(out, dpre)  # another specialisation: equal up to an ulp


class _FakeAutotuner:
    """Triton's autotuner as far as the Launcher sees it: run() times configs and leaves its pick
    on itself (best_config), shared by every key; a sleep widens the window a race needs."""

    def __init__(self):
        self.best_config = None
        self.runs = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.best_config = args[0]  # the pick for this call
            self.runs.append(args[0])
            time.sleep(0.01)

        return run


def test_launcher_first_calls_from_many_threads():
    """Concurrent first calls tune one at a time: each key keeps its own pick, each key is tuned
    once, and the tuned launches that follow need no lock."""
    from fusedmlp.kernels import gemm
    from fusedmlp.kernels.gemm_act import LAUNCHER

    launcher = copy.copy(LAUNCHER)  # the same kernel and configs; its own state
    launcher.tuned, launcher.untuned = {}, {}
    launcher._tuning = threading.Lock()
    launcher.autotuned = _FakeAutotuner()
    launched = []

    class _Plans:
        def try_launch(self, key, grid, args):
            launched.append((key[0], args[0]))
            return True

    launcher.planned = _Plans()
    keys = [("k", i % 4) for i in range(16)]
    picks = {k: gemm.config(64 * (1 + k[1]), 64, 32, 4, 2, False) for k in set(keys)}
    with options.override(autotune=True):
        grid = lambda _meta: (1,)
        threads = [threading.Thread(target=launcher, args=(k, grid, (picks[k],), {})) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert launcher.tuned == picks  # no key holds another's pick
    assert sorted(map(id, launcher.autotuned.runs)) == sorted(map(id, picks.values()))  # once per key
    assert all(picks[key] is cfg for key, cfg in launched)  # later calls launch their key's pick
