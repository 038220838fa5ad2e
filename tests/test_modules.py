"""FusedGatedMLP and FusedMLP against the eager modules they replace."""

import copy

import pytest
import torch
from conftest import DEVICE, DTYPES, assert_contract
from torch import nn

from fusedmlp import FusedGatedMLP, FusedMLP, StateLayout
from fusedmlp.activations import Activation
from fusedmlp.numerics import state_dict_equal
from fusedmlp.reference import MLP, GatedMLP

# (leading dims of x, hidden, intermediate): odd sizes that are multiples of no block size
SHAPES = [((6,), 42, 123), ((2, 3), 43, 97), ((37,), 123, 431)]


def _run(module, x, grad):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


def _grads(module):
    if hasattr(module, "source_grads"):
        return module.source_grads()
    return {n: p.grad for n, p in module.named_parameters()}


def check_module_contract(eager, fused, x):
    """Output, input gradient and every parameter gradient under the numerics contract."""
    ref64 = copy.deepcopy(eager).double()
    grad = torch.randn(*x.shape[:-1], fused.out_features, device=x.device).to(x.dtype)
    y_f, dx_f = _run(fused, x, grad)
    y_e, dx_e = _run(eager, x, grad)
    y_r, dx_r = _run(ref64, x.double(), grad.double())
    assert_contract("y", y_f, y_e, y_r)
    assert_contract("dx", dx_f, dx_e, dx_r)
    g_f, g_e, g_r = _grads(fused), _grads(eager), _grads(ref64)
    assert list(g_f) == list(g_e)
    for name in g_e:
        assert_contract(f"d {name}", g_f[name], g_e[name], g_r[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(Activation))
@pytest.mark.parametrize("lead,d,h", SHAPES)
def test_gated_mlp_contract(lead, d, h, act, dtype):
    eager = GatedMLP(d, h, act, bias=act in (Activation.GELU, Activation.RELU2), device=DEVICE, dtype=dtype)
    fused = FusedGatedMLP.from_module(eager)
    check_module_contract(eager, fused, torch.randn(*lead, d, device=DEVICE).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(Activation))
@pytest.mark.parametrize("lead,d,h", SHAPES)
def test_mlp_contract(lead, d, h, act, dtype):
    eager = MLP(d, h, act, bias=act is not Activation.SILU, device=DEVICE, dtype=dtype)
    fused = FusedMLP.from_module(eager)
    check_module_contract(eager, fused, torch.randn(*lead, d, device=DEVICE).to(dtype))


@pytest.mark.parametrize("cls,eager_cls", [(FusedGatedMLP, GatedMLP), (FusedMLP, MLP)])
def test_noncontiguous_and_empty_inputs(cls, eager_cls):
    eager = eager_cls(40, 72, device=DEVICE, dtype=torch.bfloat16)
    fused = cls.from_module(eager)
    x = torch.randn(5, 7, 80, device=DEVICE).to(torch.bfloat16)[..., ::2]  # last-dim stride 2
    assert not x.is_contiguous()
    check_module_contract(eager, fused, x)
    x_t = torch.randn(40, 9, device=DEVICE).to(torch.bfloat16).t()  # transposed view
    check_module_contract(eager, fused, x_t)
    fused.zero_grad()
    for shape in [(0, 40), (2, 0, 40)]:
        x0 = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        y = fused(x0)
        assert y.shape == (*shape[:-1], 40)
        y.sum().backward()
        assert x0.grad.shape == x0.shape
        assert fused.in_weight.grad is not None and not fused.in_weight.grad.any()
        fused.zero_grad()


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: a Linear whose weight is stored [in_features, out_features]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2LikeMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_fc, self.c_proj, self.act = Conv1D(h, d), Conv1D(d, h), nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Phi3LikeMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation_fn(gate) * up)


class FastLikeMLP(nn.Module):  # gpt-fast / Mixtral naming: w1 gate, w3 up, w2 down
    def __init__(self, d, h):
        super().__init__()
        self.w1, self.w3, self.w2 = (
            nn.Linear(d, h, bias=False),
            nn.Linear(d, h, bias=False),
            nn.Linear(h, d, bias=False),
        )

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize(
    "make,cls,kw",
    [
        (lambda: GatedMLP(24, 40, "gelu_tanh", bias=True), FusedGatedMLP, {}),
        (lambda: MLP(24, 40, "relu"), FusedMLP, {}),
        (lambda: GPT2LikeMLP(24, 40), FusedMLP, {}),
        (lambda: Phi3LikeMLP(24, 40), FusedGatedMLP, {}),
        (lambda: FastLikeMLP(24, 40), FusedGatedMLP, {"activation": "silu"}),
    ],
)
def test_from_module_and_state_dict_round_trip(make, cls, kw):
    eager = make().to(DEVICE)
    sd = eager.state_dict()
    fused = cls.from_module(eager, **kw)
    assert state_dict_equal(fused.state_dict(), sd)
    # fused -> a fresh eager module: identical tensors
    eager2 = make().to(DEVICE)
    eager2.load_state_dict(fused.state_dict())
    assert state_dict_equal(eager2.state_dict(), sd)
    # eager -> a fresh fused module (strict): identical tensors and the same function
    fused2 = cls.from_module(make().to(DEVICE), **kw)
    fused2.load_state_dict(sd)
    assert state_dict_equal(fused2.state_dict(), sd)
    x = torch.randn(3, 24, device=DEVICE)
    torch.testing.assert_close(fused2(x), eager(x), rtol=1e-4, atol=1e-5)
    # the pieces are views of the parameters (no copies, no collectives when sharded): a write
    # into the state_dict, as torch.distributed.checkpoint's in-place load does, lands in the module
    if not fused.layout.transposed:  # Conv1D weights are stored [in, out]: copies
        view = fused.state_dict()
        with torch.no_grad():
            for t in view.values():
                t.fill_(0.5)
        assert all((t == 0.5).all() for t in fused.state_dict().values())


def test_state_dict_inside_a_parent_module():
    parent = nn.Sequential(nn.Linear(8, 16), GatedMLP(16, 24))
    sd = parent.state_dict()
    parent[1] = FusedGatedMLP.from_module(parent[1])
    assert state_dict_equal(parent.state_dict(), sd)
    missing, unexpected = parent.load_state_dict(sd, strict=True)
    assert not missing and not unexpected


def test_load_state_dict_reports_missing_keys():
    fused = FusedGatedMLP(16, 24)
    sd = fused.state_dict()
    del sd["up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"up_proj\.weight|in_weight"):
        fused.load_state_dict(sd)


def test_constructor_and_repr():
    m = FusedGatedMLP(32, 64, activation="swish", bias=True, dtype=torch.float16)
    assert m.in_weight.shape == (2, 64, 32) and m.in_bias.shape == (2, 64) and m.out_weight.shape == (32, 64)
    assert m.merged_in_weight().shape == (128, 32) and m.merged_in_weight()._base is m.in_weight
    assert m.in_weight.dtype == torch.float16 and m.activation is Activation.SILU
    assert list(m.state_dict()) == [
        "gate_proj.weight",
        "gate_proj.bias",
        "up_proj.weight",
        "up_proj.bias",
        "down_proj.weight",
        "down_proj.bias",
    ]
    assert "activation=silu" in repr(m)
    assert list(FusedMLP(8, 16).state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    custom = FusedGatedMLP(8, 16, layout=StateLayout(("wi_0", "wi_1"), "wo"))
    assert list(custom.state_dict()) == ["wi_0.weight", "wi_1.weight", "wo.weight"]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: m(torch.randn(3, 17)), ValueError, "hidden_size=16"),
        (lambda m: m(torch.randn(())), ValueError, "hidden_size=16"),
        (lambda m: m(torch.ones(3, 16, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda m: m(torch.randn(3, 16, dtype=torch.float64)), TypeError, "dtype torch.float64"),
        (lambda m: m(torch.randn(3, 16, device="meta")), ValueError, "is on cpu"),
        (lambda m: m("x"), TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
def test_bad_input(cls, call, exc, match):
    with pytest.raises(exc, match=match):
        call(cls(16, 32))


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        FusedGatedMLP(16, 32, activation="mish")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        FusedMLP(0, 32)
    with pytest.raises(ValueError, match="expected one of"):
        FusedGatedMLP.from_module(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="cannot tell which activation"):
        FusedGatedMLP.from_module(FastLikeMLP(8, 16))


def test_autocast_bf16():
    if (
        DEVICE == "cpu" and not torch.cpu.is_bf16_supported()
        if hasattr(torch.cpu, "is_bf16_supported")
        else False
    ):
        pytest.skip("no bf16 autocast on this CPU")
    eager = GatedMLP(32, 48, device=DEVICE)
    fused = FusedGatedMLP.from_module(eager)
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_f, y_e = fused(x), eager(x)
    assert y_f.dtype == y_e.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_e.float(), rtol=2e-2, atol=2e-2)
    y_f.float().sum().backward()
    assert fused.in_weight.grad.dtype == torch.float32


@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
def test_compile_fullgraph(cls):
    torch._dynamo.reset()
    fused = cls(16, 40, device=DEVICE)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    y_ref = fused(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, x.grad)


def test_second_backward_through_retained_graph_is_refused():
    fused = FusedGatedMLP(16, 24, device=DEVICE)
    y = fused(torch.randn(3, 16, device=DEVICE, requires_grad=True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


@pytest.mark.parametrize("cls", [FusedGatedMLP, FusedMLP])
def test_gradient_accumulation(cls):
    """Two backward passes add into .grad exactly as eager does."""
    eager = (GatedMLP if cls is FusedGatedMLP else MLP)(16, 24, device=DEVICE)
    fused = cls.from_module(eager)
    xs = [torch.randn(5, 16, device=DEVICE) for _ in range(2)]
    for m in (eager, fused):
        for x in xs:
            m(x).square().sum().backward()
    for name, g in fused.source_grads().items():
        torch.testing.assert_close(g, dict(eager.named_parameters())[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recompute", ["none", "activation", "gemm"])
@pytest.mark.parametrize("cls,eager_cls", [(FusedGatedMLP, GatedMLP), (FusedMLP, MLP)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_recompute_mode_meets_the_contract(cls, eager_cls, recompute, dtype):
    eager = eager_cls(43, 97, "gelu_tanh", bias=True, device=DEVICE, dtype=dtype)
    fused = cls.from_module(eager, recompute=recompute)
    assert fused.recompute.value == recompute
    check_module_contract(eager, fused, torch.randn(2, 5, 43, device=DEVICE).to(dtype))


@pytest.mark.parametrize("cls,eager_cls", [(FusedGatedMLP, GatedMLP), (FusedMLP, MLP)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_recompute_in_column_blocks_meets_the_contract(cls, eager_cls, dtype, monkeypatch):
    """Recompute.GEMM's backward over blocks of hidden columns (25, 25, 25, 22 of H = 97)."""
    from fusedmlp import options
    from fusedmlp.ops import fused_mlp as mlp_ops

    calls = []
    blocks = mlp_ops._backward_recompute_blocks
    monkeypatch.setattr(mlp_ops, "_backward_recompute_blocks", lambda *a: calls.append(1) or blocks(*a))
    eager = eager_cls(43, 97, "gelu_tanh", bias=True, device=DEVICE, dtype=dtype)
    fused = cls.from_module(eager, recompute="gemm")
    x = torch.randn(2, 7, 86, device=DEVICE).to(dtype)[..., ::2]  # non-contiguous
    with options.override(recompute_block_width=16):
        check_module_contract(eager, fused, x)
    assert calls, "the blocked backward did not run"


def test_unknown_recompute_mode():
    with pytest.raises(ValueError, match="unknown recompute mode 'all'"):
        FusedGatedMLP(8, 16, recompute="all")


@pytest.mark.parametrize("recompute", ["none", "activation", "gemm"])
def test_fused_backward_gemm_path_meets_the_contract(recompute):
    """The backward GEMM with the activation derivative in its epilogue (off by default)."""
    from fusedmlp import options

    eager = GatedMLP(43, 97, "silu", bias=True, device=DEVICE, dtype=torch.bfloat16)
    fused = FusedGatedMLP.from_module(eager, recompute=recompute)
    with options.override(fused_backward_gemm=True):
        check_module_contract(eager, fused, torch.randn(2, 5, 43, device=DEVICE).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [Activation.GELU, Activation.GELU_TANH, Activation.RELU, Activation.IDENTITY])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_linear_act_is_one_gemm_with_the_contract(act, dtype, conv1d):
    """A lone projection and its activation (BERT's intermediate): output and every gradient."""
    from fusedmlp import FusedLinearAct
    from fusedmlp.activations import module_for

    proj = Conv1D(97, 43) if conv1d else nn.Linear(43, 97)
    block = nn.Sequential(proj, module_for(act) or nn.Identity()).to(DEVICE, dtype)
    fused = FusedLinearAct.from_module(block, name="0", activation=act)
    x = torch.randn(2, 5, 43, device=DEVICE).to(dtype)
    grad = torch.randn(2, 5, 97, device=DEVICE).to(dtype)
    ref64 = copy.deepcopy(block).double()
    outs = {}
    runs = (("fused", fused, x, grad), ("eager", block, x, grad), ("ref", ref64, x.double(), grad.double()))
    for name, m, xx, g in runs:
        m.zero_grad(set_to_none=True)
        y, dx = _run(m, xx, g)
        p = m[0] if isinstance(m, nn.Sequential) else getattr(m, "0")
        outs[name] = (y, dx, p.weight.grad.clone(), p.bias.grad.clone())
    for i, what in enumerate(("y", "dx", "d weight", "d bias")):
        assert_contract(what, outs["fused"][i], outs["eager"][i], outs["ref"][i])
