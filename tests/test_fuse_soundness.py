"""The classes of blocks that used to fool fuse's proof or change a model silently (issue 14):
each class is tested on several instances, real transformers classes among them."""


import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

import fusedmlp
from fusedmlp import FusedGatedMLP, FusedLinearAct, FusedMLP, FusedSequentialMLP


def _narrow_block():
    return FusedSequentialMLP.from_module(nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24)))


def _linear_act_block():
    return FusedLinearAct(nn.Linear(24, 40), "gelu", name="dense")


@pytest.mark.parametrize(
    "make",
    [
        lambda: FusedGatedMLP(24, 40, device=DEVICE),
        lambda: FusedMLP(24, 40, device=DEVICE),
        _linear_act_block,
        _narrow_block,
    ],
)
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_in_place_residual_after_the_block(make, shape):
    """y = block(x); y += r: allowed as on eager's output (the output is no view), gradients as
    without the in-place add."""
    block = make().to(DEVICE)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    y = block(x)
    r = torch.randn_like(y)
    y += r
    y.square().sum().backward()
    g_inplace = x.grad.clone()
    x.grad = None
    (block(x) + r).square().sum().backward()
    torch.testing.assert_close(g_inplace, x.grad)


# ---- shared submodules: one nn.Linear (or a whole projection set) used by two blocks ----------


class TwoLinearMLP(nn.Module):
    def __init__(self, fc1, fc2, act=None):
        super().__init__()
        self.fc1, self.fc2, self.act = fc1, fc2, act or nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _shared_models():
    shared_in = nn.Linear(16, 32)
    a = TwoLinearMLP(shared_in, nn.Linear(32, 16))
    b = TwoLinearMLP(shared_in, nn.Linear(32, 16))
    yield "shared input projection", nn.ModuleDict({"a": a, "b": b})
    shared_out = nn.Linear(32, 16)
    yield "shared output projection", nn.ModuleDict(
        {"a": TwoLinearMLP(nn.Linear(16, 32), shared_out), "b": TwoLinearMLP(nn.Linear(16, 32), shared_out)}
    )
    lone = nn.Linear(16, 32)
    mlp = TwoLinearMLP(lone, nn.Linear(32, 16))
    yield "projection also used directly", nn.ModuleDict({"mlp": mlp, "head": lone})


@pytest.mark.parametrize("what,model", list(_shared_models()))
def test_blocks_sharing_a_submodule_are_left_alone(what, model):
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = {k: m(x) for k, m in model.items()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = fusedmlp.fuse(model)
    print(what, report)
    assert not report.fused
    assert any("also used outside" in s.reason for s in report.skipped)
    with torch.no_grad():
        for k, m in model.items():
            torch.testing.assert_close(m(x), before[k])
    assert all(v.device.type != "meta" for v in model.state_dict().values())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


# ---- saturating and clipped activations: probed where they clip ----------------------------


class ClampedMLP(TwoLinearMLP):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)).clamp(max=7.0))


def _mlp(act, cls=TwoLinearMLP):
    return cls(nn.Linear(16, 32), nn.Linear(32, 16), act)


def _hf_act(name):
    transformers = pytest.importorskip("transformers")
    return transformers.activations.ACT2FN[name]


@pytest.mark.parametrize(
    "make,fused_as",
    [
        (lambda: _mlp(nn.ReLU6()), "relu6"),
        (lambda: _mlp(_hf_act("relu6")), "relu6"),
        (lambda: _mlp(nn.Hardtanh()), None),
        (lambda: _mlp(nn.Hardtanh(-2.0, 3.0)), None),
        (lambda: _mlp(_hf_act("gelu_10")), None),
        (lambda: _mlp(nn.SiLU(), ClampedMLP), None),
        (lambda: _mlp(_hf_act("quick_gelu")), "quick_gelu"),
        (lambda: _mlp(_hf_act("gelu_pytorch_tanh")), "gelu_tanh"),
    ],
)
def test_clipped_activations_are_fused_exactly_or_refused(make, fused_as):
    model = nn.Sequential(make())
    # weights large enough that the model's own inputs reach the clip points
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    x = torch.randn(64, 16) * 4
    with torch.no_grad():
        want = model(x)
    report = fusedmlp.fuse(model)
    print(report)
    if fused_as is None:
        assert not report.fused
    else:
        assert [b.activation for b in report.fused] == [fused_as]
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_proof_decisions_are_reproducible_and_leave_the_rng_alone():
    """The same block gets the same decision every time (a deterministic proof), and the caller's
    random stream does not move."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(TwoLinearMLP(nn.Linear(16, 32), nn.Linear(32, 16), nn.GELU()))
    base = make()
    reports = []
    for _ in range(3):
        model = copy.deepcopy(base)
        state = torch.random.get_rng_state()
        reports.append(str(fusedmlp.fuse(model, dry_run=True)))
        assert torch.equal(state, torch.random.get_rng_state())
    assert reports[0] == reports[1] == reports[2]


# ---- call signatures ----------------------------------------------------------------------------


class KeywordMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(16, 32), nn.Linear(32, 16), nn.SiLU()

    def forward(self, hidden_states):
        return self.down(self.act(self.up(hidden_states)))


class CallsByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = KeywordMLP()

    def forward(self, x):
        return x + self.mlp(hidden_states=x)


class OptionalExtraMLP(KeywordMLP):
    def forward(self, hidden_states, scale=1.0):
        return scale * super().forward(hidden_states)


class PassesExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = OptionalExtraMLP()

    def forward(self, x):
        return self.mlp(x, scale=0.5)


class PassesInputOnly(PassesExtra):
    def forward(self, x):
        return self.mlp(x)


class RequiredExtraMLP(KeywordMLP):
    def forward(self, hidden_states, residual):
        return residual + super().forward(hidden_states)


class PassesResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = RequiredExtraMLP()

    def forward(self, x):
        return self.mlp(x, x)


@pytest.mark.parametrize(
    "model_cls,fused",
    [(CallsByKeyword, True), (PassesInputOnly, True), (PassesExtra, False), (PassesResidual, False)],
)
def test_fused_blocks_accept_how_their_parent_calls_them(model_cls, fused):
    model = model_cls()
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = model(x)
    report = fusedmlp.fuse(model)
    print(report)
    assert bool(report.fused) == fused
    if not fused:
        assert "input" in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
