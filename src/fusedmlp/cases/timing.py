"""Timing: do_bench medians on CUDA, torch.utils.benchmark on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_us(fn: Callable[[], object], device: torch.device | str) -> float:
    """Median time of ``fn`` in microseconds, after warm-up."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")) * 1e3
    from torch.utils.benchmark import Timer

    fn()  # warm-up (compilation, first-call allocation)
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return m.median * 1e6


def measure_peaks(device: torch.device | str) -> dict[str, float] | None:
    """The two ceilings, measured now on this GPU (datasheet numbers overstate what a shared,
    clock-throttled GPU delivers): ``tflops``, an 8192^3 bf16 matmul; ``gbps``, a 1 GiB device
    copy counting bytes read + written. None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_us = median_us(lambda: a @ b, device)
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = median_us(lambda: dst.copy_(src), device)
    a = b = src = dst = torch.empty(0)  # free 2.4 GB before the variants run
    torch.cuda.empty_cache()
    return {"tflops": 2 * n**3 / mm_us / 1e6, "gbps": 2 * 2**30 / copy_us / 1e3}
