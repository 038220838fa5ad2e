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
