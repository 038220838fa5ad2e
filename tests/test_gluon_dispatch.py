"""Where the Gluon Hopper kernels serve (kernels/gluon_gemm.py), checked on the CPU: the kernels
themselves only run on an sm_90 GPU (tests/test_gluon_gpu.py); here, that the module imports
with the installed Triton, that its activation codes are the library's, and the dispatch rule."""

import sys

import pytest
import torch

from fusedmlp import options
from fusedmlp.activations import Activation
from fusedmlp.kernels import gemm_act

gluon_gemm = pytest.importorskip("fusedmlp.kernels.gluon_gemm")


def test_codes_and_schedules():
    assert [a.code for a in gluon_gemm.SUPPORTED] == list(range(7))
    assert Activation.QUICK_GELU not in gluon_gemm.SUPPORTED and Activation.RELU6 not in gluon_gemm.SUPPORTED
    assert gluon_gemm.fwd_config(True, 768).pingpong and not gluon_gemm.fwd_config(True, 4096).pingpong
    for gated in (True, False):
        for K in (768, 4096):
            cfg = gluon_gemm.fwd_config(gated, K)
            assert cfg.smem_bytes(gated) <= gluon_gemm.SMEM_LIMIT - 1024
    with pytest.raises(ValueError, match="do not implement quick_gelu"):
        gluon_gemm._act_code(Activation.QUICK_GELU)


def test_serves_only_where_asked_and_possible():
    x = torch.randn(4096, 64, dtype=torch.bfloat16)
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    assert not gluon_gemm.serves(x, w, Activation.SILU, False, False)  # option off
    with options.override(gluon=True):
        assert not gluon_gemm.serves(x, w, Activation.SILU, False, False)  # not CUDA
        assert not gemm_act._gluon_serves(x, w, Activation.SILU, False, False)


def test_a_triton_without_gluon_is_a_clear_error(monkeypatch):
    import fusedmlp.kernels

    monkeypatch.setitem(sys.modules, "fusedmlp.kernels.gluon_gemm", None)  # import fails
    monkeypatch.delattr(fusedmlp.kernels, "gluon_gemm", raising=False)
    with options.override(gluon=True), pytest.raises(RuntimeError, match="needs a Triton with Gluon"):
        gemm_act._gluon_serves(torch.zeros(1, 1), torch.zeros(1, 1), Activation.SILU, False, False)
