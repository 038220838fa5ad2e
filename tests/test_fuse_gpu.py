"""fuse on the GPU: every block it reports as fused launches fewer kernels per forward than the
block it replaced (counted with torch.profiler), on the Hugging Face models it supports."""

import copy
import importlib.util

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fusedmlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
]

SIZES = {
    "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "head_dim": 32, "image_size": 32,
}
MODEL_TYPES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "bert", "roberta", "vit",
]


def _kernels(module, x):
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        module(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_fused_block_launches_fewer_kernels(model_type):
    from fusedmlp.cases import hf_models

    model = hf_models.build_model(hf_models.hf_config(model_type, SIZES), "cuda", torch.bfloat16)
    original = copy.deepcopy(model)
    report = fusedmlp.fuse(model)
    assert report.fused, str(report)
    for block in report.fused:
        before, after = original.get_submodule(block.path), model.get_submodule(block.path)
        width = block.shapes[0][0]
        x = torch.randn(2, 64, width, device="cuda", dtype=torch.bfloat16)
        before(x), after(x)  # compile and tune outside the counted forward
        n_before, n_after = _kernels(before, x), _kernels(after, x)
        print(model_type, block.path, block.replacement, n_before, "->", n_after)
        assert n_after < n_before, (block.path, n_before, n_after)
