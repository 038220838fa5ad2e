import os
import zlib

import pytest
import torch

# Without a GPU, run the Triton kernels under Triton's interpreter so every test exercises them.
# This must happen before fusedmlp (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedmlp import options
from fusedmlp.numerics import check_contract

options.configure(autotune=False)  # the benchmark tunes; tests would tune every odd shape they try

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """A different, reported seed per test: fresh random inputs, reproducible from the test id."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def assert_contract(name, fused, eager, reference, atol_scale=1.0):
    """The numerics contract, printed before it is asserted."""
    check = check_contract(name, fused, eager, reference, atol_scale)
    print(check)
    assert check.ok, str(check)
