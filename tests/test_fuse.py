"""fuse / unfuse / fold on real model structures: Hugging Face models built from tiny configs,
the article's GeGLU MLP, nn.Sequential and user modules with their own names; and the blocks
that must NOT be fused (their forward does something else), which the proof has to catch."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_contract
from rich.console import Console
from torch import nn

import fusedmlp
from fusedmlp import FusedGatedMLP, FusedLinearAct, FusedMLP
from fusedmlp.cases import hf_models  # imports transformers only when called
from fusedmlp.cli import main
from fusedmlp.numerics import state_dict_equal

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
FUSED = (FusedGatedMLP, FusedMLP, FusedLinearAct)

# Tiny: the Triton kernels run under the interpreter on a CPU.
HF_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "head_dim": 8,
    "image_size": 16,
}


def _clone(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def _hf(model_type, dtype=torch.float32):
    model = hf_models.build_model(hf_models.hf_config(model_type, HF_SMALL), DEVICE, dtype)
    return model, hf_models.example_inputs(model, tokens=5)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


LINEAR_ACT = ("linear_act", "FusedLinearAct")


@needs_hf
@pytest.mark.parametrize(
    "model_type,expected",
    [
        ("llama", [("gated", "FusedGatedMLP")]),
        ("gemma", [("gated", "FusedGatedMLP")]),  # GeGLU, tanh gelu
        ("phi3", [("gated", "FusedGatedMLP")]),  # merged gate_up_proj
        ("gpt2", [("plain", "FusedMLPWithDropout")]),  # Conv1D, output dropout kept
        ("vit", [("plain", "FusedMLP"), LINEAR_ACT]),  # transformers 5 has fc1/fc2; 4.x an "intermediate"
        ("bert", [LINEAR_ACT]),  # intermediate; the output module adds a residual and a LayerNorm
    ],
)
def test_hf_model_fuse_unfuse(model_type, expected):
    model, inputs = _hf(model_type)
    sd = _clone(model.state_dict())
    y_eager = _out(model, inputs)
    y_ref = _out(
        copy.deepcopy(model).double(),
        {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()},
    )
    report = fusedmlp.fuse(model)
    print(report)
    kinds = {(b.kind, b.replacement) for b in report.fused}
    assert len(report.fused) == 2 and len(kinds) == 1 and kinds.pop() in expected
    assert not report.skipped
    y_fused = _out(model, inputs)
    assert_contract("model output", y_fused, y_eager, y_ref)
    assert state_dict_equal(model.state_dict(), sd)
    fusedmlp.unfuse(model)
    assert not any(isinstance(m, FUSED) for m in model.modules())
    assert state_dict_equal(model.state_dict(), sd)
    y_back = _out(model, inputs)
    print("unfused vs eager max diff", (y_back - y_eager).abs().max().item())
    assert torch.equal(y_back, y_eager)


@needs_hf
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_save_pretrained_round_trip(model_type, tmp_path):
    model, inputs = _hf(model_type)
    fusedmlp.fuse(model)
    model.save_pretrained(tmp_path)  # safetensors
    assert (tmp_path / "model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).to(DEVICE).eval()
    assert not any(isinstance(m, FUSED) for m in loaded.modules())
    assert state_dict_equal(loaded.state_dict(), model.state_dict())
    y_loaded, y_fused = _out(loaded, inputs), _out(model, inputs)
    print("loaded vs fused max diff", (y_loaded - y_fused).abs().max().item())
    torch.testing.assert_close(y_fused, y_loaded, rtol=1e-5, atol=1e-5)
    # and a checkpoint of the unfused model loads strictly into the fused one
    model.load_state_dict(loaded.state_dict(), strict=True)


@needs_hf
def test_gpt2_in_training_mode_keeps_dropout():
    model, inputs = _hf("gpt2")
    model.train()
    sd = _clone(model.state_dict())
    with torch.random.fork_rng():
        y_eager = model(**inputs)[0]
    report = fusedmlp.fuse(model)
    assert len(report.fused) == 2 and model.training and all(m.training for m in model.modules())
    with torch.random.fork_rng():  # the same dropout masks, drawn in the same order
        y_fused = model(**inputs)[0]
    print("train-mode max diff", (y_fused - y_eager).abs().max().item())
    torch.testing.assert_close(y_fused, y_eager, rtol=1e-5, atol=1e-5)
    y_fused.sum().backward()
    assert model.h[0].mlp.in_weight.grad is not None
    assert state_dict_equal(model.state_dict(), sd)


class SimpleGeGLUMLP(nn.Module):
    """The article's MLP: the activation is a call in forward, not an attribute."""

    def __init__(self, d, h):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class UserGated(nn.Module):
    """Names nobody tuned for, with SiLU as a module."""

    def __init__(self, d, h):
        super().__init__()
        self.inp_a, self.inp_b, self.out = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.nonlin = nn.SiLU()

    def forward(self, x):
        return self.out(self.nonlin(self.inp_a(x)) * self.inp_b(x))


class UserPlainFn(nn.Module):
    """A plain MLP whose activation is a function stored on the module."""

    def __init__(self, d, h):
        super().__init__()
        self.expand, self.project = nn.Linear(d, h), nn.Linear(h, d + 3)
        self.fn = F.relu

    def forward(self, x):
        return self.project(self.fn(self.expand(x)))


class InlineExactGelu(nn.Module):
    """Exact gelu called in forward: the guess gelu_tanh is tried first and must fail the proof."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize(
    "make,kind,act,cls,dtype",
    [
        (lambda: SimpleGeGLUMLP(24, 40), "gated", "gelu_tanh", FusedGatedMLP, torch.float32),
        (lambda: SimpleGeGLUMLP(24, 40), "gated", "gelu_tanh", FusedGatedMLP, torch.bfloat16),
        (
            lambda: nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24)),
            "plain",
            "gelu",
            FusedMLP,
            torch.float32,
        ),
        (
            lambda: nn.Sequential(nn.Linear(24, 40, bias=False), nn.ReLU()),
            "linear_act",
            "relu",
            FusedLinearAct,
            torch.float32,
        ),
        (lambda: UserGated(24, 40), "gated", "silu", FusedGatedMLP, torch.float16),
        (lambda: UserPlainFn(24, 40), "plain", "relu", FusedMLP, torch.float32),
        (lambda: InlineExactGelu(24, 40), "plain", "gelu", FusedMLP, torch.bfloat16),
    ],
)
def test_user_blocks(make, kind, act, cls, dtype):
    model = nn.Sequential(nn.LayerNorm(24), make()).to(DEVICE, dtype)
    sd = _clone(model.state_dict())
    x = torch.randn(3, 5, 24, device=DEVICE).to(dtype)
    with torch.no_grad():
        y_eager, y_ref = model(x), copy.deepcopy(model).double()(x.double())
    report = fusedmlp.fuse(model)
    print(report)
    (block,) = report.fused
    assert (block.path, block.kind, block.activation) == ("1", kind, act)
    assert type(model[1]) is cls
    assert all(p.dtype == dtype for p in model[1].parameters())
    with torch.no_grad():
        assert_contract("output", model(x), y_eager, y_ref)
    assert state_dict_equal(model.state_dict(), sd)
    fusedmlp.unfuse(model)
    assert not isinstance(model[1], FUSED) and state_dict_equal(model.state_dict(), sd)


class Scaled(SimpleGeGLUMLP):
    def __init__(self, d, h):
        super().__init__(d, h)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return 2 * self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Residual(UserGated):
    def forward(self, x):
        return x + super().forward(x)


class WithNorm(UserGated):  # a parameter outside the projections
    def __init__(self, d, h):
        super().__init__(d, h)
        self.norm = nn.LayerNorm(h)

    def forward(self, x):
        return self.out(self.norm(self.nonlin(self.inp_a(x)) * self.inp_b(x)))


class _HalfGrad(torch.autograd.Function):  # identity forward, gradient halved
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class CustomBackward(UserGated):  # the same forward, a different backward
    def forward(self, x):
        return super().forward(_HalfGrad.apply(x))


class QuickGELU(nn.Module):  # CLIP's: an activation fusedmlp does not implement
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class QuickGELUMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, h), nn.Linear(h, d), QuickGELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "make,reason",
    [
        (QuickGELUMLP, "none fusedmlp implements"),
        (CustomBackward, "random weights: dx"),
        (Scaled, "outputs differ"),
        (Residual, "outputs differ"),
        (WithNorm, "holds state outside its projections (norm.weight, norm.bias)"),
    ],
)
def test_lookalikes_are_skipped_with_the_reason(make, reason):
    model = nn.Sequential(make(16, 24)).to(DEVICE).eval()
    sd = _clone(model.state_dict())
    report = fusedmlp.fuse(model)
    print(report)
    assert not report.fused and len(report.skipped) == 1
    assert reason in report.skipped[0].reason
    assert type(model[0]) is make and state_dict_equal(model.state_dict(), sd)


def test_empty_twice_dry_run_filter_and_printing():
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LayerNorm(4))
    empty = fusedmlp.fuse(convnet)
    assert empty.fused == () and empty.skipped == ()
    bare = fusedmlp.fuse(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)))
    assert not bare.fused and "wrap it" in bare.skipped[0].reason

    model = nn.ModuleDict({"a": SimpleGeGLUMLP(16, 32), "b": UserGated(16, 32)}).train()
    dry = fusedmlp.fuse(model, dry_run=True)
    assert [b.path for b in dry.fused] == ["a", "b"] and dry.dry_run
    assert type(model["a"]) is SimpleGeGLUMLP

    only_b = fusedmlp.fuse(model, filter=lambda m, path: path == "b")
    assert [b.path for b in only_b.fused] == ["b"] and type(model["a"]) is SimpleGeGLUMLP
    assert model["b"].training  # the mode is kept

    sd = _clone(model.state_dict())
    rng = torch.random.get_rng_state()
    fusedmlp.fuse(model)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream is untouched
    again = fusedmlp.fuse(model)
    assert again.fused == () and [s.reason for s in again.skipped] == ["already fused"] * 2
    assert state_dict_equal(model.state_dict(), sd)

    console = Console(record=True, width=120)
    console.print(only_b)
    text = console.export_text()
    print(text)
    assert "FusedGatedMLP" in text and "gated" in text and "silu" in text
    assert "already fused" in str(again)

    with pytest.raises(TypeError, match=r"nn\.Module"):
        fusedmlp.fuse("model")
    with pytest.raises(TypeError, match="filter must be a callable"):
        fusedmlp.fuse(model, filter="mlp")


def test_unfuse_keeps_trained_weights():
    model = nn.Sequential(UserGated(16, 32), nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)))
    fusedmlp.fuse(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    trained = _clone(model.state_dict())
    x = torch.randn(4, 16)
    with torch.no_grad():
        y_fused = model(x)
    fusedmlp.unfuse(model)
    assert type(model[0]) is UserGated and type(model[1]) is nn.Sequential
    assert state_dict_equal(model.state_dict(), trained)
    with torch.no_grad():
        y_back = model(x)
    print("unfused vs fused max diff", (y_back - y_fused).abs().max().item())
    torch.testing.assert_close(y_back, y_fused, rtol=1e-5, atol=1e-6)


def test_fold():
    bn = nn.BatchNorm1d(12)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.Dropout(0.2),
        nn.Linear(16, 12),
        bn,
        nn.ReLU(),
        nn.Linear(12, 10),
        nn.Linear(10, 4, bias=False),
    )
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        fusedmlp.fold(model)
    model.eval()
    x = torch.randn(9, 8)
    with torch.no_grad():
        y_eager, y_ref = model(x), copy.deepcopy(model).double()(x.double())
    blind = copy.deepcopy(model)  # without example inputs: the BatchNorm1d's rank is unknown
    report = fusedmlp.fold(blind)
    assert [f.layers for f in report.folded] == [("5", "6")]
    assert [s.layers for s in report.skipped] == [("0", "1", "2", "3")]
    assert "pass example_inputs" in report.skipped[0].reason
    report = fusedmlp.fold(model, (x,))
    print(report)
    assert [f.layers for f in report.folded] == [("0", "1", "2", "3"), ("5", "6")]
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with torch.no_grad():
        assert_contract("folded output", model(x), y_eager, y_ref)


class ChannelsHead(nn.Module):
    """Linear -> BatchNorm1d on [N, C, L]: the Linear mixes L, the BatchNorm normalises C."""

    def __init__(self, c, length):
        super().__init__()
        self.stem = nn.Conv1d(3, c, 1)
        self.body = nn.Sequential(nn.Linear(length, length), nn.BatchNorm1d(c), nn.Linear(length, 5))

    def forward(self, x):
        return self.body(self.stem(x))


@pytest.mark.parametrize("c,length", [(6, 6), (3, 3)])  # C == L: the shapes alone cannot tell
def test_fold_proves_batchnorm_on_the_ranks_the_model_uses(c, length):
    model = ChannelsHead(c, length)
    model.body[1].running_mean.normal_()
    model.body[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(3, 3, length)
    sd = _clone(model.state_dict())
    with torch.no_grad():
        y = model(x)
    for example in (None, (x,), {"x": x}, x):
        report = fusedmlp.fold(model, example)
        print(report)
        assert not report.folded and len(report.skipped) == 1
        reason = report.skipped[0].reason
        assert ("example_inputs" in reason) if example is None else ("input [3, " in reason)
        assert state_dict_equal(model.state_dict(), sd) and len(model.body) == 3
    with torch.no_grad():
        assert torch.equal(model(x), y)
    # without the BatchNorm1d the run is rank-independent: folded, and the 3-D output is kept
    del model.body[1]
    with torch.no_grad():
        y, y_ref = model(x), copy.deepcopy(model).double()(x.double())
    report = fusedmlp.fold(model)
    assert len(report.folded) == 1 and len(model.body) == 1
    with torch.no_grad():
        assert_contract("folded 3-D output", model(x), y, y_ref)


@needs_hf
def test_cli_fuse(tmp_path, capsys):
    config = hf_models.hf_config("llama", {**HF_SMALL, "num_hidden_layers": 1})
    config.save_pretrained(tmp_path)
    assert main(["fuse", "--hf-config", str(tmp_path), "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "layers.0.mlp" in out and "FusedGatedMLP" in out and "before" in out and "after fuse" in out
    with pytest.raises(SystemExit, match="2"):
        main(["fuse", "--hf-config", "no-such-model"])
    assert capsys.readouterr().err.startswith("fusedmlp: error:")


def test_shared_tied_hooked_and_frozen_blocks():
    shared = UserGated(16, 32)
    model = nn.ModuleDict({"a": shared, "b": shared})  # one block registered twice
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = shared(x)
    report = fusedmlp.fuse(model)
    assert len(report.fused) == 1 and model["a"] is model["b"] and type(model["a"]) is FusedGatedMLP
    with torch.no_grad():
        y_b = model["b"](x)
    print("shared block max diff", (y_b - y).abs().max().item())
    torch.testing.assert_close(y_b, y, rtol=1e-5, atol=1e-6)
    fusedmlp.unfuse(model)
    assert model["a"] is model["b"] is shared

    tied = nn.ModuleDict({"mlp": UserGated(16, 32), "other": nn.Linear(16, 32)})
    tied["other"].weight = tied["mlp"].inp_a.weight
    hooked = UserGated(16, 32)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    half_frozen = UserGated(16, 32)
    half_frozen.inp_a.requires_grad_(False)
    frozen = UserGated(16, 32).requires_grad_(False)
    zero_out = SimpleGeGLUMLP(16, 32)  # zero-initialised output: every guess agrees on its weights
    nn.init.zeros_(zero_out.down_proj.weight)
    model = nn.ModuleDict(
        {"tied": tied, "hooked": hooked, "half_frozen": half_frozen, "frozen": frozen, "zero": zero_out}
    )
    report = fusedmlp.fuse(model)
    print(report)
    reasons = {s.path: s.reason for s in report.skipped}
    assert (
        "ties" in reasons["tied.mlp"] and "hooks" in reasons["hooked"] and "frozen" in reasons["half_frozen"]
    )
    assert [(b.path, b.activation) for b in report.fused] == [("frozen", "silu"), ("zero", "gelu_tanh")]
    assert not any(p.requires_grad for p in model["frozen"].parameters())


def test_fused_linear_act_module_and_meta_weights():
    block = nn.Sequential(nn.Linear(12, 20), nn.GELU(approximate="tanh"))
    fused = FusedLinearAct.from_module(block, name="0", activation="gelu_tanh")
    assert fused.activation.value == "gelu_tanh" and state_dict_equal(fused.state_dict(), block.state_dict())
    x = torch.randn(3, 12)
    with torch.no_grad():
        y_f, y_e, y_r = fused(x), block(x), copy.deepcopy(block).double()(x.double())
    assert_contract("FusedLinearAct output", y_f, y_e, y_r)
    with pytest.raises(ValueError, match="without dots"):
        FusedLinearAct(nn.Linear(2, 3), "relu", name="a.b")
    with pytest.raises(ValueError, match="2-D weight"):
        FusedLinearAct(nn.LayerNorm(3), "relu")

    with torch.device("meta"):
        model = nn.Sequential(UserGated(8, 16))
    report = fusedmlp.fuse(model)
    assert not report.fused and "meta device" in report.skipped[0].reason


def test_fuse_narrow_sequential_stack_as_one_kernel():
    """An nn.Sequential of 3+ narrow Linears becomes one FusedSequentialMLP, proven, reversible."""
    from fusedmlp import FusedSequentialMLP

    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(7, 33), nn.ReLU(), nn.Linear(33, 50), nn.GELU(), nn.Linear(50, 5))
    model = nn.Sequential(nn.Linear(4, 7), stack)
    x = torch.randn(9, 4)
    before, sd = model(x), model.state_dict()
    report = fusedmlp.fuse(model)
    assert [b.kind for b in report.fused] == ["narrow"] and isinstance(model[1], FusedSequentialMLP)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert state_dict_equal(model.state_dict(), sd)
    fusedmlp.unfuse(model)
    assert type(model[1]) is nn.Sequential and state_dict_equal(model.state_dict(), sd)
