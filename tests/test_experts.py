"""Mixture-of-experts: FusedGatedExperts against a float64 reference written independently (a
loop over tokens and their experts) under the numerics contract, for the output and every
gradient (tokens, routing weights, weights, biases); routing edge cases (empty experts, one
expert taking most tokens, top-k 1..8, out-of-range indices); the gpt-oss clamped SwiGLU;
Hugging Face MoE models fused by ``fuse`` with unchanged state_dicts."""

import copy
import importlib.util

import pytest
import torch
from conftest import DEVICE, assert_contract

import fusedmlp
from fusedmlp.activations import Activation
from fusedmlp.modules.experts import ExpertsLayout, FusedGatedExperts
from fusedmlp.numerics import state_dict_equal

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
GPT_OSS = (1.702, 7.0)


def loop_reference(m: FusedGatedExperts, x, index, weights, params):
    """y[t] = sum_j weights[t, j] * expert_{index[t, j]}(x[t]), token by token (independent of
    the library's routing); ``params``: gate_up [E, 2, H, D], gate_up_bias, down [E, D, H], down_bias."""
    w_gu, b_gu, w_down, b_down = params
    ys = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if not 0 <= e < m.num_experts:
                continue
            gate = w_gu[e, 0] @ x[t] + (0 if b_gu is None else b_gu[e, 0])
            up = w_gu[e, 1] @ x[t] + (0 if b_gu is None else b_gu[e, 1])
            if m.act.gpt_oss is None:
                h = m.act.act(gate) * up
            else:
                alpha, limit = m.act.gpt_oss
                g = gate.clamp(max=limit)
                h = (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
            out = w_down[e] @ h + (0 if b_down is None else b_down[e])
            y = y + weights[t, j] * out
        ys.append(y)
    return torch.stack(ys) if ys else x.new_zeros(0, x.shape[1])


def _routing(T, E, k, skew=False, invalid=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if E > 2:
        scores[:, 0] = -1  # expert 0 empty
    if skew:
        scores[: (3 * T) // 4, 1] = 2  # expert 1 takes most tokens
    index = scores.topk(k, dim=1).indices
    if invalid:
        index[::3, 0] = E  # Hugging Face's expert-parallel sentinel: contributes nothing
    weights = torch.softmax(torch.randn(T, k, generator=g), -1)
    return index.to(DEVICE), weights.to(DEVICE)


def _run(fn, tensors, dy):
    ts = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    y = fn(*ts)
    if y.numel() == 0:  # no tokens: nothing to differentiate
        return [y]
    grads = torch.autograd.grad(y, [t for t in ts if t is not None and t.requires_grad], dy.to(y.dtype),
                                allow_unused=True)
    return [y, *(torch.zeros(1) if g is None else g for g in grads)]


@pytest.mark.parametrize(
    "E,D,H,k,T,bias,act,dtype,routing",
    [
        (4, 16, 24, 2, 13, False, "silu", torch.float32, {}),
        (5, 19, 21, 3, 17, True, "gelu_tanh", torch.float32, {"skew": True}),
        (3, 16, 8, 1, 9, False, "relu", torch.bfloat16, {}),
        (8, 24, 40, 8, 11, True, "silu", torch.float32, {"invalid": True}),
        (6, 16, 24, 2, 0, False, "silu", torch.float32, {}),  # no tokens
        (4, 16, 24, 2, 21, True, GPT_OSS, torch.float32, {"skew": True}),
        (4, 16, 24, 2, 21, True, GPT_OSS, torch.bfloat16, {}),
    ],
)
def test_experts_contract(E, D, H, k, T, bias, act, dtype, routing):
    torch.manual_seed(0)
    gpt_oss = act if isinstance(act, tuple) else None
    m = FusedGatedExperts(E, D, H, "silu" if gpt_oss else act, bias=bias, gpt_oss=gpt_oss, device=DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
    scale = torch.linspace(0.2, 9.0, max(T, 1))[:T, None]  # magnitudes that reach the clamp
    x = (torch.randn(T, D) * scale).to(DEVICE)
    index, weights = _routing(T, E, k, **routing)
    params = [m.gate_up, m.gate_up_bias, m.down, m.down_bias]
    dy = torch.randn(T, D, device=DEVICE, dtype=torch.float64)

    def fused(x_, w_, *ps):
        values = {n: p for n, p in zip(["gate_up", "gate_up_bias", "down", "down_bias"], ps, strict=True)}
        given = {n: v for n, v in values.items() if v is not None}
        return torch.func.functional_call(m, given, (x_, index, w_))

    def eager(x_, w_, *ps):
        return loop_reference(m, x_, index, w_, ps)

    tensors = [x.to(dtype), weights.to(dtype), *(p if p is None else p.detach().to(dtype) for p in params)]
    f = _run(fused, tensors, dy)
    e = _run(eager, tensors, dy)
    r = _run(eager, [None if t is None else t.double() for t in tensors], dy)
    if T == 0:  # no tokens: an empty output, and nothing to differentiate
        assert f[0].shape == (0, D)
        return
    grads = ["d x", "d weights", "d gate_up", "d gate_up_bias", "d down", "d down_bias"]
    names = ["y", *(n for n, t in zip(grads, tensors, strict=True) if t is not None)]
    for name, a, b, c in zip(names, f, e, r, strict=True):
        assert_contract(f"{name} ({dtype})", a, b, c, 4.0)  # fuse's proof tolerance: small samples


def test_state_dict_layouts_round_trip():
    """Each Hugging Face layout in and out: concatenated [E, 2H, D] (a view), transposed
    [E, D, 2H], gpt-oss's interleaved columns with biases."""
    E, D, H = 3, 8, 6
    for layout, bias in ((ExpertsLayout(), False), (ExpertsLayout(transposed=True), False),
                         (ExpertsLayout(transposed=True, interleaved=True), True)):
        m = FusedGatedExperts(E, D, H, bias=bias, layout=layout)
        sd = m.state_dict()
        gu = sd["gate_up_proj"]
        assert gu.shape == ((E, D, 2 * H) if layout.transposed else (E, 2 * H, D))
        if layout.interleaved:  # columns alternate gate, up
            gate0, up0 = gu[0, :, 0::2].t(), gu[0, :, 1::2].t()
        elif layout.transposed:
            gate0, up0 = gu[0, :, :H].t(), gu[0, :, H:].t()
        else:
            gate0, up0 = gu[0, :H], gu[0, H:]
        assert torch.equal(gate0, m.gate_up[0, 0]) and torch.equal(up0, m.gate_up[0, 1])
        m2 = FusedGatedExperts(E, D, H, bias=bias, layout=layout)
        m2.load_state_dict(sd)
        assert state_dict_equal(m2.state_dict(), sd) and torch.equal(m2.gate_up, m.gate_up)
    m = FusedGatedExperts(E, D, H)
    assert m.state_dict()["gate_up_proj"].data_ptr() == m.gate_up.data_ptr()  # a view: in-place loads land


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, x, i, w: m(x[:, :-1], i, w), ValueError, "hidden_states has shape"),
        (lambda m, x, i, w: m(x, i.float(), w), ValueError, "top_k_index"),
        (lambda m, x, i, w: m(x, i, w[:, :1]), ValueError, "top_k_weights has shape"),
        (lambda m, x, i, w: m(x.double(), i, w), TypeError, "dtype"),
        (lambda m, x, i, w: m(x, i), TypeError, "takes \\(hidden_states, top_k_index, top_k_weights\\)"),
        (lambda m, x, i, w: m(x, top_k_index=i, top_k_weights=w), None, None),
    ],
)
def test_bad_calls_are_clear_errors(call, exc, match):
    m = FusedGatedExperts(4, 8, 6, device=DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    index, weights = _routing(5, 4, 2)
    if exc is None:
        assert call(m, x, index, weights).shape == x.shape
        return
    with pytest.raises(exc, match=match):
        call(m, x, index, weights)


def _hf_small(model_type):
    from fusedmlp.cases import hf_models

    sizes = {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 24, "num_hidden_layers": 2,
             "head_dim": 8, "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
             "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1,
             "topk_group": 1, "shared_expert_intermediate_size": 40, "num_attention_heads": 4,
             "num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
             "kv_lora_rank": 16, "q_lora_rank": 16}
    config = hf_models.hf_config(model_type, sizes)
    model = hf_models.build_model(config, DEVICE, torch.float32)
    return model, hf_models.example_inputs(model, tokens=6)


@needs_hf
@pytest.mark.parametrize("model_type,act", [("mixtral", "silu"), ("qwen3_moe", "silu"), ("qwen2_moe", "silu"),
                                            ("olmoe", "silu"), ("gpt_oss", "gpt_oss_swiglu"),
                                            ("deepseek_v3", "silu")])
def test_hf_moe_models_fuse(model_type, act):
    model, inputs = _hf_small(model_type)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y_eager = model(**inputs)[0]
        y_ref = copy.deepcopy(model).double()
        for m in y_ref.modules():
            if hasattr(getattr(m, "config", None), "_experts_implementation"):
                m.config._experts_implementation = "eager"
        y_ref = y_ref(**inputs)[0]
    report = fusedmlp.fuse(model)
    print(report)
    experts = [f for f in report.fused if f.kind.startswith("experts")]
    assert len(experts) == 2 and all(f.activation == act for f in experts)
    assert not report.skipped
    assert state_dict_equal(model.state_dict(), sd)
    with torch.no_grad():
        assert_contract("model output", model(**inputs)[0], y_eager, y_ref, 4.0)
    model.train()
    model(**inputs)[0].float().square().mean().backward()
    fused = [m for m in model.modules() if isinstance(m, FusedGatedExperts)]
    assert fused and all(m.gate_up.grad is not None and m.down.grad is not None for m in fused)
    fusedmlp.unfuse(model)
    assert not any(isinstance(m, FusedGatedExperts) for m in model.modules())
    assert state_dict_equal(model.state_dict(), sd)


@needs_hf
def test_llama4_experts_are_reported_not_fused():
    model, _ = _hf_small("llama4_text")
    report = fusedmlp.fuse(model, dry_run=True)
    skipped = [s for s in report.skipped if s.kind.startswith("experts")]
    assert len(skipped) == 2 and all("pre-routed tokens" in s.reason for s in skipped)


def test_every_activation_through_the_module():
    for act in Activation:
        m = FusedGatedExperts(3, 8, 6, act.value, device=DEVICE)
        x = torch.randn(7, 8, device=DEVICE)
        index, weights = _routing(7, 3, 2)
        with torch.no_grad():
            y = m(x, index, weights)
            ref = loop_reference(m, x.double(), index, weights.double(),
                                 [m.gate_up.double(), None, m.down.double(), None])
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recompute", ["none", "activation", "gemm"])
def test_recompute_levels_give_the_same_gradients(recompute):
    torch.manual_seed(0)
    m = FusedGatedExperts(4, 16, 24, "gelu_tanh", bias=True, device=DEVICE, recompute=recompute)
    ref = FusedGatedExperts(4, 16, 24, "gelu_tanh", bias=True, device=DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16, device=DEVICE)
    index, weights = _routing(13, 4, 2, skew=True)
    grads = []
    for module in (m, ref):
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        module(xx, index, ww).square().sum().backward()
        grads.append([xx.grad, ww.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
