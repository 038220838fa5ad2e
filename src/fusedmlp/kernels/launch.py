"""Launch plans: a compiled Triton kernel launched without the JIT's per-call work.

``kernel[grid](*args, **constexprs)`` binds every argument, computes its specialization key
(dtype, 16-byte alignment of pointers, ints equal to 1 or divisible by 16), looks the compiled
kernel up and builds launch metadata on every call: ~6 us of Python on a fast host, 15-20 us on
the shared GPU hosts, more than a decode-sized kernel runs. Inductor's generated code avoids
this by calling the compiled kernel's launcher directly; so do we. The first call for a key goes
through the JIT (compiling if needed) and keeps the CompiledKernel it returns; later calls with
the same key call its launcher with the runtime arguments and the constexprs bound once.

The key must determine everything the JIT specializes on: :func:`spec` gives each runtime
argument's part of it, and callers add what their constexprs and configs depend on. The direct
call follows the launcher convention of Triton 3.x (``run(grid_x, grid_y, grid_z, stream,
function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``, constexprs
included); where a Triton lacks it, or under the interpreter, every call takes the JIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import INTERPRETING

_I32_MAX = 0x7FFFFFFF


def spec(args: Sequence[Any]) -> tuple:
    """What Triton 3.x specializes a kernel on, per runtime argument: a tensor's dtype and whether
    its address is 16-byte aligned; an int's equality to 1, divisibility by 16 and 64-bit range;
    anything else (descriptors, floats, None) by value or type."""
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() & 15 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(a if a is None or isinstance(a, (bool, float)) else type(a))
        else:
            out.append(1 if a == 1 else (2 if a & 15 == 0 else 0) + (4 if a > _I32_MAX else 0))
    return tuple(out)


def plan_key(device_tensor: torch.Tensor, constexprs: dict[str, Any], args: Sequence[Any]) -> tuple | None:
    """The plan key of a launch whose constexprs (and warps, stages) follow from ``constexprs``:
    the device, the constexprs' values and :func:`spec` of the runtime ``args``. None (launch
    through the JIT, keep no plan) for tensors Triton's interpreter runs."""
    if not device_tensor.is_cuda:
        return None
    return (device_tensor.device.index, *constexprs.values(), spec(args))


def traced_launch(
    kernel: Any,
    grid: tuple,
    args: Sequence[Any],
    constexprs: dict[str, Any],
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """A launch from a torch.library.triton_op body: through wrap_triton, so that under
    torch.compile Inductor launches the kernel from its own generated code (in eager, wrap_triton
    launches it as the JIT would). Arguments must be traceable: no addresses, no descriptors."""
    from torch.library import wrap_triton

    _ensure_allocator()
    options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    wrap_triton(kernel)[grid](*args, **constexprs, **options)


def _ensure_allocator() -> None:
    """Kernels that make TMA descriptors on the device need scratch memory per launch, which
    Triton asks of the allocator set in this thread (a ContextVar): a torch allocation, where
    nobody set one (Inductor sets its own for the code it generates)."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - Triton without runtime allocation
        return
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        import triton

        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")
        )


class _Plan:
    """One compiled kernel, its launcher and its constexpr values, bound for direct calls."""

    __slots__ = ("device", "function", "packed", "run", "stream", "tail")

    def __init__(self, compiled: Any, tail: tuple) -> None:
        from triton.runtime import driver

        self.run = compiled.run  # loads the binary on first access
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        # As the JIT does: the current device's stream (callers key plans by device).
        self.stream = driver.active.get_current_stream
        self.device = driver.active.get_current_device()
        self.tail = tail

    def __call__(self, grid: tuple[int, ...], args: Sequence[Any]) -> None:
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        self.run(
            grid[0], g1, g2, self.stream(self.device), self.function, self.packed, None, None, None,
            *args, *self.tail,
        )


def _direct_launch_supported() -> bool:
    """Whether this Triton's compiled kernels take the launcher call the plans make, and no
    launch hook (proton's instrumentation) expects to be called."""
    if INTERPRETING:
        return False
    try:
        from triton import knobs
        from triton.compiler.compiler import CompiledKernel
    except ImportError:  # Triton < 3.4: no knobs module
        return False
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    if any(getattr(h, "calls", h) for h in hooks):
        return False
    return all(hasattr(CompiledKernel, a) for a in ("run", "launch_metadata"))


class PlannedKernel:
    """A @triton.jit kernel with launch plans. Its parameters must list every runtime argument
    before the first constexpr (all of fusedmlp's kernels do)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._plans: dict[tuple, _Plan] = {}
        params = getattr(kernel, "params", None)  # None: Triton's interpreter runs the kernel
        if params is None:
            self._tail: list[tuple[str, Any]] | None = None
            return
        runtime = sum(not p.is_constexpr for p in params)
        if any(p.is_constexpr for p in params[:runtime]):
            raise ValueError(f"{kernel.fn.__name__}: constexpr parameters must come after the others")
        self._tail = [(p.name, p.default) for p in params[runtime:]]

    def try_launch(self, key: tuple, grid: tuple[int, ...], args: Sequence[Any]) -> bool:
        """Launch through the plan for ``key`` if there is one; False when there is none yet."""
        plan = self._plans.get(key)
        if plan is None:
            return False
        plan(grid, args)
        return True

    def launch(
        self,
        key: tuple | None,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: dict[str, Any],
        num_warps: int | None = None,
        num_stages: int | None = None,
    ) -> None:
        """Launch through the JIT (compiling if needed) with runtime ``args`` (positional, in
        parameter order) and ``constexprs``, and keep a plan for ``key`` (None: keep none). The
        key must name the specialization: :func:`spec` of ``args``, whatever decides the
        constexprs, warps and stages, and the device."""
        if key is not None and self.try_launch(key, grid, args):
            return
        options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if key is not None and compiled is not None and _DIRECT and self._tail is not None:
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            tail = tuple(constexprs.get(name, default) for name, default in self._tail)
            self._plans[key] = _Plan(compiled, tail)

    def clear(self) -> None:
        self._plans.clear()


_DIRECT = _direct_launch_supported()
