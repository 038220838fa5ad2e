"""The lean launch path, CUDA graphs and torch.compile on the GPU (marker ``gpu``; skipped without
CUDA). Speed is measured by the benchmarks, not here: these tests check that the fast paths
compute what the slow ones do and that the kernels really are launched from them."""

import copy
import importlib.util

import pytest
import torch
from conftest import assert_contract

from fusedmlp import FusedGatedMLP, FusedMLP, FusedSequentialMLP, fuse
from fusedmlp.activations import Activation
from fusedmlp.reference import MLP, GatedMLP

pytestmark = pytest.mark.gpu
DEV = "cuda"


def test_launch_plans_reproduce_the_jit_launches():
    """Every specialisation the JIT distinguishes gets its own plan: M = 1, a multiple of 16,
    odd; a misaligned x; each call through a plan must equal the first (JIT) call bit for bit."""
    from fusedmlp.kernels import gemm_act, launch

    if not launch._DIRECT:
        pytest.skip("this Triton has no direct launcher call; every launch takes the JIT")
    w = (torch.randn(2 * 160, 96, device=DEV) / 10).to(torch.bfloat16)
    big = torch.randn(400 * 96 + 8, device=DEV).to(torch.bfloat16)
    for M in (1, 16, 17, 96, 300):
        for x in (big[: M * 96].view(M, 96), big[1 : 1 + M * 96].view(M, 96)):  # aligned, misaligned
            first, pre1 = gemm_act.gemm_act(x, w, None, Activation.SILU, True, store_preact=True)
            again, pre2 = gemm_act.gemm_act(x, w, None, Activation.SILU, True, store_preact=True)
            assert torch.equal(first, again) and torch.equal(pre1, pre2), (M, x.data_ptr() % 16)
    assert gemm_act.LAUNCHER.planned._plans, "no plan was made"


def _module_pair(cls, eager_cls, dtype=torch.bfloat16):
    eager = eager_cls(256, 704, "gelu_tanh", bias=eager_cls is MLP, device=DEV, dtype=dtype)
    return eager, cls.from_module(eager)


@pytest.mark.parametrize("cls,eager_cls", [(FusedGatedMLP, GatedMLP), (FusedMLP, MLP)])
def test_cuda_graph_capture_of_forward_and_training_step(cls, eager_cls):
    eager, fused = _module_pair(cls, eager_cls)
    static_x = torch.randn(8, 64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 64, 256, device=DEV, dtype=torch.bfloat16)

    def step():
        for p in (*fused.parameters(), static_x):
            p.grad = None
        y = fused(static_x)
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: kernels compiled, plans made, before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    with torch.no_grad():
        static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    x = static_x.detach().clone().requires_grad_()
    y_ref = eager(x)
    y_ref.backward(dy)
    ref64 = copy.deepcopy(eager).double()
    x64 = x.detach().double().requires_grad_()
    y64 = ref64(x64)
    y64.backward(dy.double())
    assert_contract("graph y", static_y, y_ref, y64)
    assert_contract("graph dx", static_x.grad, x.grad, x64.grad)
    grads = fused.source_grads()
    for name, p in eager.named_parameters():
        assert_contract(f"graph d {name}", grads[name], p.grad, dict(ref64.named_parameters())[name].grad)

    with torch.no_grad():  # inference capture: the no-autograd forward
        fused(static_x)
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2):
            out = fused(static_x)
        g2.replay()
        torch.testing.assert_close(out, eager(static_x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls,eager_cls", [(FusedGatedMLP, GatedMLP), (FusedMLP, MLP)])
def test_compile_reduce_overhead_training_step(cls, eager_cls):
    torch._dynamo.reset()
    eager, fused = _module_pair(cls, eager_cls)
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    dy = torch.randn(4, 32, 256, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up runs, then recorded, then replayed
        x = torch.randn(4, 32, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        fused.zero_grad(set_to_none=True)
        y = compiled(x)
        y.backward(dy)
        y = y.detach().clone()
    xe = x.detach().clone().requires_grad_()
    ye = eager(xe)
    ye.backward(dy)
    torch.testing.assert_close(y.float(), ye.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), xe.grad.float(), rtol=3e-2, atol=3e-2)


def test_inductor_launches_our_kernels_from_its_code():
    """Under torch.compile the triton_op bodies are traced and Inductor's generated code launches
    _gemm_act_kernel itself (no opaque custom-op call), forward and backward, fullgraph."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, fused = _module_pair(FusedGatedMLP, GatedMLP)
    x = torch.randn(300, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True)

    def fwd_bwd():
        y = compiled(x)
        y.sum().backward()
        return y

    _, codes = run_and_get_code(fwd_bwd)
    code = "\n".join(codes)
    assert "_gemm_act_kernel" in code and "_act_bwd_kernel" in code
    assert "torch.ops.fusedmlp.mlp" not in code  # the op was decomposed, not called


def test_narrow_stack_compiles_and_captures():
    torch._dynamo.reset()
    nn = torch.nn
    seq = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 16))
    seq = seq.to(DEV, torch.bfloat16)
    fused = FusedSequentialMLP.from_module(seq)
    x = torch.randn(4096, 32, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        want = seq(x)
        got = torch.compile(fused, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_compiled_fused_hf_model_has_no_graph_breaks():
    from fusedmlp.cases import hf_models

    torch._dynamo.reset()
    sizes = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2}
    config = hf_models.hf_config("llama", sizes)
    model = hf_models.build_model(config, DEV, torch.bfloat16).train()
    report = fuse(model)
    assert len(report.fused) == 2
    inputs = hf_models.example_inputs(model, tokens=64, batch=2)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    compiled(**inputs).last_hidden_state.float().square().mean().backward()
    assert model.layers[0].mlp.in_weight.grad is not None
