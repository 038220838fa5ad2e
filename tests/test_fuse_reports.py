"""What fuse reports for blocks it leaves alone: a reason written for people, naming the problem
(tied projections, quantized or mixed-dtype weights, 1x1-convolution MLPs, extra arguments),
never raw exception text; and the model untouched."""

import importlib.util

import pytest
import torch
from conftest import DEVICE
from torch import nn

import fusedmlp
from fusedmlp.cases import hf_models
from fusedmlp.numerics import state_dict_equal

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


class Plain(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TiedGateUp(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.gate = nn.Linear(d, h)
        self.up = self.gate  # one module under two names
        self.down, self.act = nn.Linear(h, d), nn.SiLU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class RoundingLinear(nn.Linear):  # a quantization-style subclass with its own forward
    def forward(self, x):
        return super().forward(x.round())


def _int8():
    m = Plain()
    m.fc1.weight = nn.Parameter(m.fc1.weight.detach().to(torch.int8), requires_grad=False)
    return m


def _mixed():
    m = Plain()
    m.fc2.to(torch.float64)
    return m


def _fp16_buffer():
    m = Plain()
    m.fc1.register_buffer("scale", torch.ones(16, dtype=torch.float16))
    return m


def _subclass():
    m = Plain()
    m.fc1 = RoundingLinear(8, 16)
    return m


class ConvMlp(nn.Module):  # timm's ConvMlp / SwiftFormerMlp: 1x1 convolutions, a norm, channels-first
    def __init__(self, c=8, h=16):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, h, 1), nn.GELU(), nn.Conv2d(h, c, 1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class ConvBlock(ConvMlp):  # a depthwise convolution too: a larger block, not an MLP
    def __init__(self, c=8, h=16):
        super().__init__(c, h)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        return super().forward(self.dw(x))


@pytest.mark.parametrize(
    "make,reason",
    [
        (TiedGateUp, "gate and up are one module (tied); a merged weight would untie them"),
        (_int8, "holds non-floating-point weights (fc1.weight (torch.int8)): quantized layers are not fused"),
        (_mixed, "mixes weight dtypes (float32, float64); the fused kernels take one"),
        (_fp16_buffer, "mixes weight dtypes (float16, float32)"),
        (_subclass, "its projection fc1 is a RoundingLinear with its own forward (quantized or adapted)"),
        (ConvMlp, "an MLP of 1x1 convolutions (fc1/fc2) on channels-first maps"),
    ],
)
def test_skipped_blocks_say_why_in_words(make, reason):
    model = nn.Sequential(make()).to(DEVICE).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = fusedmlp.fuse(model)
    print(report)
    assert not report.fused and len(report.skipped) == 1
    assert reason in report.skipped[0].reason
    assert "Error" not in report.skipped[0].reason  # not an exception's text
    assert state_dict_equal(model.state_dict(), sd)


def test_larger_conv_blocks_are_not_reported_as_mlps():
    report = fusedmlp.fuse(nn.Sequential(ConvBlock()).eval())
    assert not report.fused and not report.skipped


@needs_hf
@pytest.mark.parametrize(
    "model_type,reason",
    [
        ("bloom", "its forward takes more than its input (residual)"),  # mlp(hidden_states, residual)
        ("poolformer", "an MLP of 1x1 convolutions (conv1/conv2)"),
        ("swiftformer", "an MLP of 1x1 convolutions (fc1/fc2)"),
        ("convnext", "holds state outside its projections"),  # the whole layer: dwconv, norm, scale
    ],
)
def test_hf_lookalikes_are_reported(model_type, reason):
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "image_size": 16}
    model = hf_models.build_model(hf_models.hf_config(model_type, sizes), DEVICE, torch.float32)
    report = fusedmlp.fuse(model, dry_run=True)
    print(report)
    assert report.skipped and not report.fused
    assert all(reason in s.reason for s in report.skipped)
