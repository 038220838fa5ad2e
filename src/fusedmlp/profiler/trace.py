"""Loading torch.profiler Chrome traces (plain JSON or gzip) into the few event lists we read.

A torch.profiler trace (torch 2.4 and newer; the Kineto format) is ``{"traceEvents": [...], ...}``
whose complete events (``"ph": "X"``) carry a category: ``cpu_op`` (ATen ops and other CPU
regions), ``user_annotation`` (record_function labels, ``ProfilerStep#N``), ``cuda_runtime`` /
``cuda_driver`` (cudaLaunchKernel, cuLaunchKernelEx, cudaOccupancy*, ...), ``kernel``,
``gpu_memcpy``, ``gpu_memset``. A launch and its kernel share ``args.correlation``. CPU and GPU
timestamps are on one clock, in microseconds.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import zlib
from pathlib import Path
from typing import Any

# Older Kineto builds capitalised some categories; read both.
_CATEGORY_ALIASES = {"operator": "cpu_op", "runtime": "cuda_runtime", "kernel": "kernel"}

# The key our own runs add to a trace's top level: variant, preset, dtype, peaks.
METADATA_KEY = "fusedmlp"


class TraceError(ValueError):
    """A file that is not a readable torch.profiler Chrome trace. The message names the file."""


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    cat: str
    ts: float  # microseconds
    dur: float  # microseconds
    tid: str
    correlation: int | None = None

    @property
    def end(self) -> float:
        return self.ts + self.dur


@dataclasses.dataclass
class Trace:
    """The events of one trace that the analysis reads, each list sorted by start time."""

    path: Path
    cpu_ops: list[Event]
    annotations: list[Event]
    runtime: list[Event]  # cuda_runtime and cuda_driver calls
    kernels: list[Event]
    copies: list[Event]  # gpu_memcpy and gpu_memset
    device_properties: list[dict[str, Any]]
    metadata: dict[str, Any]

    @property
    def has_gpu(self) -> bool:
        return bool(self.kernels or self.copies)

    def launch_api(self) -> dict[int, str]:
        """correlation id -> the runtime or driver call that launched it."""
        return {e.correlation: e.name for e in self.runtime if e.correlation is not None}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def load(path: str | Path) -> Trace:
    """Read a trace; raises TraceError naming ``path`` for anything unreadable."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: cannot read (truncated or corrupt gzip?): {e}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not text (and not gzip)") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: not valid JSON (truncated?): {e}") from None
    if isinstance(data, list):  # the Chrome trace format also allows a bare event array
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{path}: no 'traceEvents' list: not a torch.profiler Chrome trace")
    return _parse(path, data)


def _parse(path: Path, data: dict[str, Any]) -> Trace:
    lists: dict[str, list[Event]] = {
        k: [] for k in ("cpu_op", "user_annotation", "runtime", "kernel", "copy")
    }
    for raw in data["traceEvents"]:
        if not isinstance(raw, dict) or raw.get("ph") != "X":
            continue
        cat = str(raw.get("cat", ""))
        cat = _CATEGORY_ALIASES.get(cat.lower(), cat)
        if cat in ("cuda_runtime", "cuda_driver"):
            key = "runtime"
        elif cat in ("gpu_memcpy", "gpu_memset"):
            key = "copy"
        elif cat in lists:
            key = cat
        else:
            continue  # python_function, ac2g flows, Trace, ...: not read
        try:
            ts, dur = float(raw["ts"]), float(raw.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue  # an event without a time cannot be placed; one bad event should not sink a trace
        args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
        corr = args.get("correlation")
        lists[key].append(
            Event(
                name=str(raw.get("name", "")),
                cat=cat,
                ts=ts,
                dur=dur,
                tid=str(raw.get("tid", "")),
                correlation=corr if isinstance(corr, int) else None,
            )
        )
    for events in lists.values():
        events.sort(key=lambda e: (e.ts, -e.dur))
    props = data.get("deviceProperties")
    meta = data.get(METADATA_KEY)
    return Trace(
        path=path,
        cpu_ops=lists["cpu_op"],
        annotations=lists["user_annotation"],
        runtime=lists["runtime"],
        kernels=lists["kernel"],
        copies=lists["copy"],
        device_properties=props if isinstance(props, list) else [],
        metadata=_clean_metadata(meta),
    )


def _clean_metadata(meta: Any) -> dict[str, Any]:
    """Our metadata with the fields the analysis computes with checked: a foreign or hand-edited
    trace must not turn a typo into a crash, so a bad field is dropped (read as unknown)."""
    if not isinstance(meta, dict):
        return {}
    meta = dict(meta)
    peaks = meta.get("peaks")
    values = [peaks.get(k) for k in ("tflops", "gbps")] if isinstance(peaks, dict) else [None]
    if not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in values):
        meta["peaks"] = None
    if meta.get("element_size") not in (1, 2, 4, 8):
        meta.pop("element_size", None)
    if not isinstance(meta.get("preset"), dict):
        meta["preset"] = None
    return meta


def add_metadata(path: Path, metadata: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``metadata`` under the trace's top-level ``fusedmlp`` key (to ``out``, gzip when it
    ends in .gz). Perfetto and chrome://tracing ignore unknown top-level keys."""
    data = json.loads(_read_text(path))
    data[METADATA_KEY] = metadata
    out = out or path
    text = json.dumps(data, separators=(",", ":"))
    if out.suffix == ".gz":
        out.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    else:
        out.write_text(text)
    return out
