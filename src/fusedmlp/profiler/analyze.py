"""One trace -> one variant's summary: kernels per forward (decoded), launches, CPU ops that
launch nothing, CPU dispatch against GPU time and a verdict, throughput against the peaks,
and the guess-first comparison.

A "forward" is one ``fusedmlp/<variant>/forward`` record_function label (our runs put one
around each profiled call), else one ``ProfilerStep#N``, else the whole trace. On a trace
without GPU kernels (a CPU run) the CPU ops that do the work stand in for kernels: the
innermost ATen ops that compute, a custom op as one unit, Inductor's C++ kernels.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from ..activations import resolve
from ..cases.presets import Preset
from . import expect
from .decode import GEMM, Decoded, decode
from .trace import Event, Trace, clean_text

# The first forward's kernels shown one by one (timeline plot, summary.json): a trace without
# forward labels is one forward of every kernel in it, which no plot can show one by one.
MAX_TIMELINE_STEPS = 2000

_LABEL = re.compile(r"^fusedmlp/(?P<variant>[\w.-]+)/forward$")


@dataclasses.dataclass
class KernelStat:
    name: str
    calls: float  # per forward
    total_calls: int
    time_us: float  # GPU (or CPU-op) time per forward
    decoded: Decoded
    roles: list[str]  # expected roles it was matched to, in the first forward
    flops: int  # per forward, from the matched roles (0: unknown)
    bytes: int
    tflops: float | None
    gbps: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": round(self.calls, 3),
            "total_calls": self.total_calls,
            "time_us": round(self.time_us, 3),
            "decoded": self.decoded.as_dict(),
            "expected_as": self.roles,
            "flops": self.flops,
            "bytes": self.bytes,
            "tflops": _r(self.tflops),
            "gbps": _r(self.gbps),
        }


@dataclasses.dataclass
class Step:
    """One kernel of the first forward, for the timeline."""

    name: str
    start_us: float  # from the forward's first kernel
    dur_us: float
    kind: str
    role: str | None


@dataclasses.dataclass
class VariantSummary:
    variant: str
    preset: str | None  # the preset's name, from the trace's metadata
    trace: str
    on_gpu: bool
    forwards: int
    kernels_per_forward: int
    kernels: list[KernelStat]
    timeline: list[Step]
    memory_ops: list[dict[str, Any]]
    launches_per_forward: dict[str, float]
    occupancy_queries_per_forward: float
    cpu_ops_without_kernels: list[dict[str, Any]]
    cpu_us: float  # CPU time per forward (dispatch, on a GPU run)
    gpu_us: float  # kernel time per forward
    wall_us: float | None  # back-to-back forwards, host included (measured by the run, not the trace)
    host_costs: list[dict[str, Any]]  # where the CPU time of a forward goes, largest first
    verdict: str
    verdict_reason: str
    expected: list[str] | None
    expected_notes: list[str]
    intermediate_bytes: int | None
    intermediate_bytes_saved_vs_eager: int | None
    problems: list[str] = dataclasses.field(default_factory=list)  # what the trace got wrong

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernels"] = [k.as_dict() for k in self.kernels]
        d["cpu_us"], d["gpu_us"] = round(self.cpu_us, 3), round(self.gpu_us, 3)
        d["wall_us"] = None if self.wall_us is None else round(self.wall_us, 3)
        d["guess_agrees"] = None if self.expected is None else not self.expected_notes
        return d


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _finite(x: float) -> float | None:
    """None for inf (a duration of a few subnormal microseconds): a rate nobody can plot or believe."""
    return x if math.isfinite(x) else None


def preset_to_dict(p: Preset) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["activation"] = p.activation.value
    return d


def preset_from_dict(d: dict[str, Any]) -> Preset | None:
    """The preset a trace's metadata names; None when absent or unreadable (an old or foreign trace).
    ``trace.load`` has checked the fields' types and ranges."""
    try:
        fields = {f.name for f in dataclasses.fields(Preset)}
        return Preset(**{k: (resolve(v) if k == "activation" else v) for k, v in d.items() if k in fields})
    except (TypeError, ValueError, AttributeError, KeyError):
        return None


def variant_name(trace: Trace) -> str:
    if isinstance(trace.metadata.get("variant"), str):
        return trace.metadata["variant"]
    for a in trace.annotations:
        if m := _LABEL.match(a.name):
            return m["variant"]
    name = trace.path.name
    for suffix in (".gz", ".json", ".pt.trace", ".trace"):
        name = name.removesuffix(suffix)
    return clean_text(name, 200) or "trace"


def _windows(trace: Trace) -> list[Event]:
    """The forwards: our labels, else profiler steps, else nothing (the whole trace is one)."""
    labels = [a for a in trace.annotations if _LABEL.match(a.name)]
    if labels:
        return labels
    return [a for a in trace.annotations + trace.cpu_ops if a.name.startswith("ProfilerStep#")]


def _window_of(windows: list[Event], starts: list[float], t: float) -> int | None:
    i = bisect.bisect_right(starts, t) - 1
    return i if i >= 0 and t <= windows[i].end else None


def _cpu_tree(ops: list[Event]) -> dict[int, list[int]]:
    """children by parent index (-1: roots) from nesting of [ts, end) on each thread."""
    children: dict[int, list[int]] = defaultdict(list)
    stacks: dict[str, list[int]] = defaultdict(list)
    for i, op in enumerate(ops):  # sorted by (ts, -dur): a parent precedes its children
        stack = stacks[op.tid]
        while stack and ops[stack[-1]].end < op.ts + 1e-3:
            stack.pop()
        children[stack[-1] if stack else -1].append(i)
        stack.append(i)
    return children


def _cpu_work(ops: list[Event]) -> tuple[list[Event], set[int]]:
    """(the CPU ops that do the work, indices of ops with no work inside) for CPU-only traces.
    A depth-first walk with its own stack: a trace can nest ops deeper than Python recurses."""
    children = _cpu_tree(ops)
    work: list[Event] = []
    idle: set[int] = set()
    busy: set[int] = set()  # ops that are work or hold work
    stack = [(root, False) for root in reversed(children.get(-1, []))]
    while stack:
        i, children_done = stack.pop()
        d = decode(ops[i].name)
        if not children_done:
            # One unit, whatever runs inside: a custom op, an Inductor kernel, a GEMM (addmm copies
            # its bias into the output with aten::copy_ before BLAS runs; that copy is part of it).
            gemm = d.kind == GEMM and d.op not in ("linear", "matmul")  # those two only dispatch
            if gemm or d.library.startswith(("custom op", "C++ (Inductor")):
                work.append(ops[i])
                busy.add(i)
            else:  # its children first, then it again
                stack.append((i, True))
                stack.extend((c, False) for c in reversed(children.get(i, [])))
        elif any(c in busy for c in children.get(i, [])):
            busy.add(i)
        elif d.kind in (GEMM, "aten"):
            work.append(ops[i])
            busy.add(i)
        else:
            idle.add(i)
    work.sort(key=lambda e: e.ts)
    return work, idle


def _idle_gpu_ops(trace: Trace) -> set[int]:
    """Indices of CPU ops on whose thread no launch (of a kernel, copy or fill) happens inside them."""
    launches: dict[str, list[float]] = defaultdict(list)
    for r in trace.runtime:
        if r.correlation is not None and ("Launch" in r.name or "Memcpy" in r.name or "Memset" in r.name):
            launches[r.tid].append(r.ts)
    idle = set()
    for i, op in enumerate(trace.cpu_ops):
        ts = launches.get(op.tid, [])
        j = bisect.bisect_left(ts, op.ts)
        if j == len(ts) or ts[j] > op.end:
            idle.add(i)
    return idle


def _launch_calls(trace: Trace) -> dict[int, Event]:
    """correlation id -> the call that launched it. A runtime launch that goes through the driver
    can show as both calls under one id; keep the runtime one, so it counts once and its kernel
    is not taken for a Triton (driver-launched) kernel."""
    out: dict[int, Event] = {}
    for r in trace.runtime:
        if r.correlation is None:
            continue
        prev = out.get(r.correlation)
        if prev is None or (not prev.name.startswith("cuda") and r.name.startswith("cuda")):
            out[r.correlation] = r
    return out


Item = tuple[int, Event, Decoded]  # (forward index, kernel or CPU op, decoded name)


def _work_items(
    trace: Trace, forward_of: Callable[[float], int | None], gpu_forward_of: Callable[[float], int | None]
) -> tuple[list[Item], set[int]]:
    """(the kernels inside forwards, indices of CPU ops that launch none). A kernel belongs to
    the forward whose label holds its launch call (the GPU may run it later); without a launch
    call in the trace (some launchers bypass the CUDA APIs that CUPTI records), to the forward
    that its GPU start time falls in."""
    if not trace.has_gpu:
        work, idle = _cpu_work(trace.cpu_ops)
        return [(w, e, decode(e.name)) for e in work if (w := forward_of(e.ts)) is not None], idle
    launch_of = _launch_calls(trace)
    # Triton launches through the driver API (cuLaunchKernel*), ATen and cuBLAS mostly through cuda*
    driver = {c for c, r in launch_of.items() if r.name.startswith("cu") and not r.name.startswith("cuda")}
    items = []
    for k in trace.kernels:
        launch = launch_of.get(k.correlation)
        w = forward_of(launch.ts) if launch else gpu_forward_of(k.ts)
        if w is not None:
            items.append((w, k, decode(k.name, k.correlation in driver)))
    return items, _idle_gpu_ops(trace)


def _kernel_stats(
    items: list[Item], first: list[Item], roles_by_name: dict[str, list[expect.Role]], n_fwd: int
) -> list[KernelStat]:
    """Per kernel name, slowest first: calls and time per forward; throughput from its roles."""
    calls: Counter[str] = Counter()
    time: Counter[str] = Counter()
    decoded: dict[str, Decoded] = {}
    for _, e, d in items:
        calls[e.name] += 1
        time[e.name] += e.dur
        decoded[e.name] = d
    # Throughput over the first forward's occurrences only: those are the ones with roles.
    first_time: Counter[str] = Counter()
    for _, e, _ in first:
        first_time[e.name] += e.dur
    kernels = []
    for name in sorted(calls, key=lambda n: -time[n]):
        rs = roles_by_name.get(name, [])
        flops, nbytes = sum(r.flops for r in rs), sum(r.bytes for r in rs)
        t_first = first_time[name]
        kernels.append(
            KernelStat(
                name=name,
                calls=calls[name] / n_fwd,
                total_calls=calls[name],
                time_us=time[name] / n_fwd,
                decoded=decoded[name],
                roles=[r.label for r in rs],
                flops=flops,
                bytes=nbytes,
                tflops=_finite(flops / t_first / 1e6) if flops and t_first else None,
                gbps=_finite(nbytes / t_first / 1e3) if nbytes and t_first else None,
            )
        )
    return kernels


def analyze(trace: Trace, peaks: dict[str, float] | None = None) -> VariantSummary:
    """Summarise one trace. ``peaks`` ({"tflops", "gbps"}) override the ones in its metadata."""
    meta = trace.metadata
    peaks = peaks or meta.get("peaks") or None
    variant = variant_name(trace)
    windows = _windows(trace)
    starts = [w.ts for w in windows]
    n_fwd = max(len(windows), 1)

    def inside(t: float) -> int | None:
        """The forward whose label holds CPU time t."""
        return _window_of(windows, starts, t) if windows else 0

    def since(t: float) -> int | None:
        """The forward last begun at GPU time t: each forward is synchronized before the next
        begins, so a kernel whose launch is not in the trace still belongs to the latest one."""
        i = bisect.bisect_right(starts, t) - 1
        return (i if i >= 0 else None) if windows else 0

    items, idle = _work_items(trace, inside, since)

    # Guess first: the expected kernels, laid against the first forward's kernels.
    preset = preset_from_dict(meta["preset"]) if isinstance(meta.get("preset"), dict) else None
    elem = int(meta.get("element_size", 2))
    expected = expect.expected_kernels(preset, variant, elem) if preset else None
    first = sorted((it for it in items if it[0] == (items[0][0] if items else 0)), key=lambda it: it[1].ts)
    matched = expect.match(expected, [d.is_gemm for _, _, d in first]) if expected is not None else None
    roles_by_name: dict[str, list[expect.Role]] = defaultdict(list)
    timeline = []
    problems = list(trace.problems)
    if preset is None and isinstance(meta.get("preset"), dict):
        problems.append("metadata preset is incomplete or inconsistent: no guess")
    t0 = first[0][1].ts if first else 0.0
    if len(first) > MAX_TIMELINE_STEPS:
        problems.append(f"timeline shows the first {MAX_TIMELINE_STEPS:,} of {len(first):,} kernels")
    for i, (_, e, d) in enumerate(first[:MAX_TIMELINE_STEPS]):
        role = matched.roles[i] if matched else None
        if role is not None:
            roles_by_name[e.name].append(role)
        timeline.append(Step(e.name, e.ts - t0, e.dur, d.kind, role.label if role else None))

    kernels = _kernel_stats(items, first, roles_by_name, n_fwd)
    calls_by_corr = _launch_calls(trace)
    launched_at = {c: r.ts for c, r in calls_by_corr.items()}
    copies = [
        e
        for e in trace.copies
        if (inside(launched_at[e.correlation]) if e.correlation in launched_at else since(e.ts)) is not None
    ]
    copy_us: Counter[str] = Counter()
    for e in copies:
        copy_us[e.name] += e.dur
    memory_ops = [
        {"name": n, "calls": c / n_fwd, "time_us": copy_us[n] / n_fwd}
        for n, c in Counter(e.name for e in copies).items()
    ]
    in_fwd_runtime = [r for r in trace.runtime if inside(r.ts) is not None]
    launch_calls = [r for r in in_fwd_runtime if "Launch" in r.name]
    # once per launch: a call without a correlation id, or the one call kept for its id
    launches = Counter(r.name for r in launch_calls if calls_by_corr.get(r.correlation, r) is r)
    occupancy = sum("Occupancy" in r.name for r in in_fwd_runtime)
    no_kernel = Counter(
        op.name for i, op in enumerate(trace.cpu_ops) if i in idle and inside(op.ts) is not None
    )

    cpu_us = sum(w.dur for w in windows) / n_fwd if windows else sum(o.dur for o in _roots(trace.cpu_ops))
    gpu_us = sum(k.time_us for k in kernels)
    costs = _host_costs(trace, windows, inside, n_fwd, cpu_us)
    verdict, reason = _verdict(trace.has_gpu, cpu_us, gpu_us, kernels, peaks, costs)
    wall = meta.get("wall_us")  # trace.load checked it: a positive finite number, or absent
    wall_us = float(wall) if isinstance(wall, (int, float)) else None

    inter = saved = None
    if expected is not None and preset is not None:
        inter = sum(r.intermediate_bytes for r in expected)
        eager = expect.expected_kernels(preset, "eager", elem) or []
        saved = sum(r.intermediate_bytes for r in eager) - inter
    return VariantSummary(
        variant=variant,
        preset=preset.name if preset else None,
        trace=clean_text(str(trace.path), 1000),
        on_gpu=trace.has_gpu,
        forwards=len(windows) or 1,
        kernels_per_forward=round(len(items) / n_fwd),
        kernels=kernels,
        timeline=timeline,
        memory_ops=memory_ops,
        launches_per_forward={k: v / n_fwd for k, v in launches.items()},
        occupancy_queries_per_forward=occupancy / n_fwd,
        cpu_ops_without_kernels=[{"name": n, "calls": c / n_fwd} for n, c in no_kernel.most_common()],
        cpu_us=cpu_us,
        gpu_us=gpu_us,
        wall_us=wall_us,
        host_costs=costs,
        verdict=verdict,
        verdict_reason=reason,
        expected=[r.label for r in expected] if expected is not None else None,
        expected_notes=matched.notes if matched else [],
        intermediate_bytes=inter,
        intermediate_bytes_saved_vs_eager=saved,
        problems=problems,
    )


def _roots(ops: list[Event]) -> list[Event]:
    return [ops[i] for i in _cpu_tree(ops).get(-1, [])]


def _host_costs(
    trace: Trace, windows: list[Event], inside: Callable[[float], int | None], n_fwd: int, cpu_us: float
) -> list[dict[str, Any]]:
    """Where a forward's CPU time goes: the self time (own time, less the ops nested inside) of
    each CPU op, summed by name per forward, and the time in no op at all (Python: module and
    argument handling, and launches outside any op, such as a Triton kernel's), largest first."""
    ops = trace.cpu_ops
    children = _cpu_tree(ops)
    self_us: Counter[str] = Counter()
    in_ops = 0.0
    for i, op in enumerate(ops):
        if inside(op.ts) is None or op.name.startswith("ProfilerStep#"):
            continue
        inner = sum(ops[c].dur for c in children.get(i, []))
        self_us[op.name] += max(op.dur - inner, 0.0)
    for i in children.get(-1, []):
        op = ops[i]
        if inside(op.ts) is not None and not op.name.startswith("ProfilerStep#"):
            in_ops += op.dur
    # our forward labels are annotations, not cpu_ops: what they hold outside any op is Python
    python = max(cpu_us - in_ops / n_fwd, 0.0) if windows else 0.0
    costs = [{"name": n, "us": t / n_fwd} for n, t in self_us.items()]
    if python:
        costs.append({"name": "Python outside ops (module calls, checks, Triton launches)", "us": python})
    costs.sort(key=lambda c: -c["us"])
    return [{"name": c["name"], "us": round(c["us"], 3)} for c in costs[:5]]


def _verdict(
    on_gpu: bool,
    cpu_us: float,
    gpu_us: float,
    kernels: list[KernelStat],
    peaks: dict[str, float] | None,
    host_costs: list[dict[str, Any]] | None = None,
) -> tuple[str, str]:
    if not kernels:
        return "no kernels", "the trace holds no kernels inside its forwards"
    if on_gpu and cpu_us > gpu_us:
        largest = "; ".join(f"{c['name']} {c['us']:.1f} us" for c in (host_costs or [])[:3])
        return (
            "overhead-bound",
            f"the CPU takes {cpu_us:.1f} us to dispatch a forward whose kernels run {gpu_us:.1f} us: "
            "the GPU waits for launches (fewer kernels or CUDA graphs help)"
            + (f"; largest host costs: {largest}" if largest else ""),
        )
    ridge = peaks["tflops"] * 1e3 / peaks["gbps"] if peaks else None  # FLOP per byte

    def compute(k: KernelStat) -> bool:
        if ridge is not None and k.flops and k.bytes:
            return k.flops / k.bytes >= ridge
        return k.decoded.is_gemm

    total = sum(k.time_us for k in kernels) or 1.0
    share = sum(k.time_us for k in kernels if compute(k)) / total
    basis = f"ridge {ridge:.0f} FLOP/B from the measured peaks" if ridge else "GEMMs count as compute"
    if share >= 0.5:
        return "compute-bound", f"{share:.0%} of kernel time is compute-bound work ({basis})"
    return "memory-bound", f"{1 - share:.0%} of kernel time moves memory ({basis})"


def summary_json(
    summaries: list[VariantSummary],
    preset: Preset | None,
    peaks: dict[str, float] | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The summary.json object: ``variants`` by name, plus totals and the run's context."""
    variants = {s.variant: s.as_dict() for s in summaries}
    totals = {
        "kernels_per_forward": {s.variant: s.kernels_per_forward for s in summaries},
        "gpu_us_per_forward": {s.variant: round(s.gpu_us, 3) for s in summaries},
        "cpu_us_per_forward": {s.variant: round(s.cpu_us, 3) for s in summaries},
        "wall_us_per_forward": {s.variant: s.wall_us and round(s.wall_us, 3) for s in summaries},
        "fastest": min(summaries, key=lambda s: s.gpu_us).variant if summaries else None,
    }
    return {
        **info,
        "preset": preset_to_dict(preset) if preset else None,
        "peaks": peaks,
        "variants": variants,
        "totals": totals,
        "problems": {s.variant: s.problems for s in summaries if s.problems},
    }


def unique_names(summaries: list[VariantSummary]) -> None:
    """Two traces of one variant (two runs) keep both: the second becomes 'eager#2'."""
    seen: Counter[str] = Counter()
    for s in summaries:
        seen[s.variant] += 1
        if seen[s.variant] > 1:
            s.variant = f"{s.variant}#{seen[s.variant]}"
