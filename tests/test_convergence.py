"""Training with fused MLPs follows the eager loss curve (fp32 on CPU; bf16 on the GPU)."""

import pytest
import torch

from fusedmlp.bench import convergence


def _compare(curves, rtol):
    eager, fused = curves["eager"], curves["fused"]
    worst = max(abs(f - e) / abs(e) for e, f in zip(eager, fused, strict=True))
    print(
        f"loss {eager[0]:.4f} -> eager {eager[-1]:.4f}, fused {fused[-1]:.4f}; worst relative gap {worst:.2e}"
    )
    assert eager[-1] < 0.8 * eager[0], "the model did not learn: the comparison would prove nothing"
    assert worst <= rtol


def test_fp32_loss_curves_agree():
    # fp32 rounding differences between kernels grow slowly under Adam: 1e-3 of the loss over
    # 150 steps leaves room for that and none for a wrong gradient (which diverges within steps).
    _compare(convergence.run(convergence.Setup(steps=150)), rtol=1e-3)


@pytest.mark.gpu
def test_bf16_autocast_loss_curves_agree_on_gpu():
    setup = convergence.Setup(dim=256, hidden=704, layers=4, batch=8, seq=128, steps=300)
    _compare(convergence.run(setup, "cuda", autocast=torch.bfloat16), rtol=3e-2)
