"""Timing: what a user waits (wall: back-to-back calls, host included), what the GPU spends
(CUDA-graph replay), the host's share (time to issue one call), and the measured peaks."""

from __future__ import annotations

import statistics
import time
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_us(
    fn: Callable[[], object], device: torch.device | str, seconds: float = 0.25, host: bool = True
) -> dict[str, float]:
    """``wall``: microseconds per call over back-to-back calls with one synchronize at the end, as
    a loop of forwards or training steps runs without CUDA graphs (the host's launch work and the
    GPU's kernels overlap; the larger decides); median of 5 repeats. ``host`` (when asked for):
    microseconds the host takes to issue one call, timed over up to 16 calls before any
    synchronize (few enough that the launch queue never fills and blocks the host); median of
    up to 9 repeats, fewer for slow calls."""
    device = torch.device(device)
    fn()  # warm-up: compilation, autotuning, first allocations
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    n = max(8, min(2000, int(seconds / 5 / max(time.perf_counter() - t, 1e-6))))
    walls = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        walls.append((time.perf_counter() - t) / n * 1e6)
    if not host:
        return {"wall": statistics.median(walls)}
    calls = max(1, min(16, n))
    hosts = []
    for _ in range(9 if n >= 16 else 3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        hosts.append((time.perf_counter() - t) / calls * 1e6)
    _sync(device)
    return {"wall": statistics.median(walls), "host": statistics.median(hosts)}


def graph_us(fn: Callable[[], object]) -> float | None:
    """GPU time: median microseconds of ``fn`` replayed from a CUDA graph (no host work at all),
    or None where it cannot be captured."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
    except Exception:  # a variant that cannot be captured reports no graph time
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None


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
