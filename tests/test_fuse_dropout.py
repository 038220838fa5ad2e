"""fuse on blocks with dropouts: a dropout of h (between the activation and the output projection:
T5, timm's Mlp, VitDet, FocalNet) is fused into the kernels with the block's p; an output dropout
is kept as the block's own module; any other dropout (on the input, on one branch of a gated
block, a non-elementwise kind on h) is refused with the reason, the block left untouched."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_contract
from torch import nn

import fusedmlp
from fusedmlp import FusedGatedMLP, FusedMLP
from fusedmlp.cases import hf_models
from fusedmlp.numerics import state_dict_equal

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


class T5Dense(nn.Module):  # T5DenseActDense: wo(dropout(act(wi(x))))
    def __init__(self, d, h, p=0.1):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, h, bias=False), nn.Linear(h, d)
        self.dropout, self.act = nn.Dropout(p), nn.ReLU()

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5Gated(nn.Module):  # T5DenseGatedActDense: wo(dropout(act(wi_0(x)) * wi_1(x)))
    def __init__(self, d, h, p=0.2):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.wo, self.dropout = nn.Linear(h, d, bias=False), nn.Dropout(p)

    def forward(self, x):
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


class TimmMlp(nn.Module):  # timm's Mlp: two dropouts and an Identity norm between them
    def __init__(self, d, h, p=0.25):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, h), nn.GELU(), nn.Dropout(p)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(h, d), nn.Dropout(p)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class OneDropoutTwice(nn.Module):  # VitDet's / FocalNet's Mlp: one nn.Dropout called on h and on y
    def __init__(self, d, h, p=0.15):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d), nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


@pytest.mark.parametrize(
    "make,cls,p,output_dropout",
    [
        (T5Dense, FusedMLP, 0.1, False),
        (T5Gated, FusedGatedMLP, 0.2, False),
        (TimmMlp, FusedMLP, 0.25, True),
        (OneDropoutTwice, FusedMLP, 0.15, True),
    ],
)
def test_dropout_of_h_is_fused_with_the_blocks_p(make, cls, p, output_dropout):
    torch.manual_seed(0)
    model = nn.Sequential(make(16, 40)).to(DEVICE)
    block = model[0]
    x = torch.randn(3, 7, 16, device=DEVICE)
    with torch.no_grad():
        y_eager = model.eval()(x)
        y_ref = model.double()(x.double())
    model.float().train()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = fusedmlp.fuse(model)
    print(report)
    assert len(report.fused) == 1 and report.fused[0].hidden_dropout == p
    assert f"dropout of h p={p:g}" in str(report)
    fused = model[0]
    assert isinstance(fused, cls) and fused.hidden_dropout == p and fused.training
    assert (getattr(fused, "dropout", None) is not None) == output_dropout
    if output_dropout:  # the block's own module, shared: its p and mode follow the model
        assert any(fused.dropout is m for m in block.modules())
    assert state_dict_equal(model.state_dict(), sd)
    with torch.no_grad():
        assert_contract("eval output", model.eval()(x), y_eager, y_ref)
    # training: random (two calls differ), unbiased (the mean over many draws approaches eval's)
    model.train()
    draws = torch.stack([model(x).detach() for _ in range(200)])
    assert not torch.equal(draws[0], draws[1])
    spread = draws.std(0) / 200**0.5
    assert ((draws.mean(0) - y_eager).abs() <= 5 * spread + 1e-5).float().mean() > 0.97
    y = model(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# Each holds its activation as a module: a block whose activation is only guessed and whose
# every guess fails is not reported (attention blocks look like that too).
class InputDropout(nn.Module):  # dropout of x, before the first projection
    def __init__(self, d, h):
        super().__init__()
        self.drop, self.fc1, self.act, self.fc2 = nn.Dropout(0.1), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.drop(x))))


class GateBranchDropout(nn.Module):  # dropout of one branch of a gated block only
    def __init__(self, d, h):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.drop, self.act = nn.Dropout(0.1), nn.SiLU()

    def forward(self, x):
        return self.down(self.drop(self.act(self.gate(x))) * self.up(x))


class AlphaDropoutOnH(T5Dense):  # not elementwise-with-scaling: the kernels cannot reproduce it
    def __init__(self, d, h):
        super().__init__(d, h)
        self.dropout = nn.AlphaDropout(0.1)


class FunctionalDropout(nn.Module):  # F.dropout in forward: no module to find, randomness in training
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.dropout(self.act(self.fc1(x)), 0.1, self.training))


@pytest.mark.parametrize(
    "make,reason",
    [
        (InputDropout, "its dropout drop acts elsewhere than on h or on the output"),
        (GateBranchDropout, "its dropout drop acts elsewhere than on h or on the output"),
        (AlphaDropoutOnH, "its AlphaDropout dropout on h is not an elementwise nn.Dropout"),
        (FunctionalDropout, "output changes in training mode"),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_other_dropouts_are_refused(make, reason, training):
    model = nn.Sequential(make(16, 24)).to(DEVICE).train(training)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = fusedmlp.fuse(model)
    print(report)
    assert not report.fused and len(report.skipped) == 1
    assert reason in report.skipped[0].reason
    assert type(model[0]) is make and model.training == training
    assert state_dict_equal(model.state_dict(), sd)


@needs_hf
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_hf_t5_fuses_with_its_dropout(proj):
    sizes = {"d_model": 32, "d_ff": 48, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8}
    config = hf_models.hf_config("t5", {**sizes, "feed_forward_proj": proj, "dropout_rate": 0.3})
    model = hf_models.build_model(config, DEVICE, torch.float32)
    inputs = hf_models.example_inputs(model, tokens=5)
    with torch.no_grad():
        y_eager = model(**inputs)[0]
        y_ref = copy.deepcopy(model).double()(**inputs)[0]
    report = fusedmlp.fuse(model)
    print(report)
    assert len(report.fused) == config.num_layers + config.num_decoder_layers and not report.skipped
    assert all(f.hidden_dropout == 0.3 for f in report.fused)
    with torch.no_grad():
        assert_contract("t5 output", model(**inputs)[0], y_eager, y_ref)
