"""Loading torch.profiler Chrome traces (plain JSON or gzip) into the few event lists we read.

A torch.profiler trace (torch 2.4 and newer; the Kineto format) is ``{"traceEvents": [...], ...}``
whose complete events (``"ph": "X"``) carry a category: ``cpu_op`` (ATen ops and other CPU
regions), ``user_annotation`` (record_function labels, ``ProfilerStep#N``), ``cuda_runtime`` /
``cuda_driver`` (cudaLaunchKernel, cuLaunchKernelEx, cudaOccupancy*, ...), ``kernel``,
``gpu_memcpy``, ``gpu_memset``. A launch and its kernel share ``args.correlation``. CPU and GPU
timestamps are on one clock, in microseconds.

A trace file is untrusted input: whatever it holds, ``load`` returns a Trace or raises TraceError
with a one-line message, in bounded time and memory. Every size that drives work is capped (the
constants below); a value that cannot be true (a negative duration, a time that is not a finite
number) drops its event and is listed in ``Trace.problems``, which the report shows.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import os
import re
import secrets
import zlib
from pathlib import Path
from typing import IO, Any

from .decode import MAX_NAME_CHARS

# Older Kineto builds capitalised some categories; read both.
_CATEGORY_ALIASES = {"operator": "cpu_op", "runtime": "cuda_runtime", "kernel": "kernel"}

# The key our own runs add to a trace's top level: variant, preset, dtype, peaks.
METADATA_KEY = "fusedmlp"

# Limits on what a trace can make us do. A profile of one MLP is a few MB; a whole model's of
# three steps tens of MB. Python's objects take 2-4x a real trace's JSON, up to ~20x for
# adversarial JSON (``[{},{},...]``), hence the limits on containers and values as well as bytes.
MAX_TRACE_MIB = 256  # decompressed size
MAX_JSON_CONTAINERS = 8_000_000  # objects and arrays ('{', '['): about 1.5 million events
MAX_JSON_VALUES = 40_000_000  # values in containers (','), ~1.3 GB of Python floats at most
MAX_TIME_US = 1e17  # |ts| and dur: about 3,000 years in microseconds
# Preset fields in our metadata that size the guess: tokens, widths, layers.
MAX_TOKENS = 2**31
MAX_WIDTH = 2**20
MAX_LAYERS = 1024
_PRESET_LIMITS = {
    "tokens": MAX_TOKENS,
    "hidden": MAX_WIDTH,
    "intermediate": MAX_WIDTH,
    "out_features": MAX_WIDTH,
    "layers": MAX_LAYERS,
}

# Characters that break one-line messages, SVG/XML or UTF-8 output: C0/C1 controls, lone
# surrogates (JSON's "\ud800"), and the two XML non-characters.
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_BAD_CHARS_MULTILINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


class TraceError(ValueError):
    """A file that is not a readable torch.profiler Chrome trace. The message, one line, names
    the file."""


def clean_text(text: str, limit: int | None = None, multiline: bool = False) -> str:
    """``text`` safe to print on one line, plot and put in SVG/HTML: control characters and lone
    surrogates become U+FFFD (newlines and tabs too, unless ``multiline``); cut to ``limit``."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return (_BAD_CHARS_MULTILINE if multiline else _BAD_CHARS).sub("\ufffd", text)


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    cat: str
    ts: float  # microseconds
    dur: float  # microseconds, >= 0
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
    problems: list[str] = dataclasses.field(default_factory=list)  # what was dropped, and why

    @property
    def has_gpu(self) -> bool:
        return bool(self.kernels or self.copies)

    def launch_api(self) -> dict[int, str]:
        """correlation id -> the runtime or driver call that launched it."""
        return {e.correlation: e.name for e in self.runtime if e.correlation is not None}


def _where(path: Path) -> str:
    return clean_text(str(path), 1000)


def _read_capped(f: IO[bytes], path: Path, gzipped: bool) -> bytearray:
    """All of ``f``, in 1 MiB reads, up to MAX_TRACE_MIB: a gzip bomb stops there."""
    limit = MAX_TRACE_MIB * 2**20
    data = bytearray()
    while chunk := f.read(2**20):
        data += chunk
        if len(data) > limit:
            what = "inflates beyond" if gzipped else "is larger than"
            raise TraceError(f"trace {_where(path)} {what} {MAX_TRACE_MIB} MiB, the most fusedmlp reads")
    return data


def _read(path: Path) -> bytearray:
    """The file's bytes, gunzipped when it starts with gzip's magic (whatever it is called)."""
    with path.open("rb") as f:
        if f.peek(2)[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=f) as g:
                return _read_capped(g, path, gzipped=True)
        return _read_capped(f, path, gzipped=False)


def _io_error(path: Path, e: OSError) -> TraceError:
    """A one-line TraceError for an OSError while reading ``path``, named for what it is."""
    where = _where(path)
    if isinstance(e, FileNotFoundError):
        return TraceError(f"{where}: no such file")
    if isinstance(e, IsADirectoryError):
        return TraceError(f"{where}: is a folder, not a trace file")
    if isinstance(e, NotADirectoryError):
        return TraceError(f"{where}: a part of the path is not a folder")
    if isinstance(e, PermissionError):
        return TraceError(f"{where}: permission denied")
    return TraceError(f"{where}: cannot read: {clean_text(e.strerror or str(e), 200)}")


def _check_size(path: Path, raw: bytearray) -> None:
    """Refuse JSON whose structure alone would need gigabytes as Python objects. Counts
    include brackets and commas inside strings, so they only ever overestimate."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS or raw.count(b",") > MAX_JSON_VALUES:
        raise TraceError(
            f"trace {_where(path)} holds more than {MAX_JSON_CONTAINERS:,} JSON objects or "
            f"{MAX_JSON_VALUES:,} values, the most fusedmlp reads"
        )


def load(path: str | Path) -> Trace:
    """Read a trace; raises TraceError naming ``path`` for anything unreadable."""
    path = Path(path)
    where = _where(path)
    try:
        raw = _read(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: first
        raise TraceError(f"{where}: truncated or corrupt gzip: {clean_text(str(e), 200)}") from None
    except OSError as e:
        raise _io_error(path, e) from None
    except ValueError as e:  # a path with a NUL character
        raise TraceError(f"{where}: not a usable path: {e}") from None
    _check_size(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TraceError(f"{where}: not text (and not gzip)") from None
    del raw
    try:
        data = json.loads(text)
    except RecursionError:
        raise TraceError(f"{where}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON (truncated?): {e}") from None
    except ValueError as e:  # e.g. an integer literal of more than 4,300 digits
        raise TraceError(f"{where}: not a readable JSON trace: {clean_text(str(e), 200)}") from None
    del text
    if isinstance(data, list):  # the Chrome trace format also allows a bare event array
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{where}: no 'traceEvents' list: not a torch.profiler Chrome trace")
    return _parse(path, data)


def _number(value: Any) -> float | None:
    """A JSON number (or a short numeric string, as some exporters write) as a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and len(value) > 64:
        return None
    try:
        x = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond 1e308
        return None
    return x if math.isfinite(x) else None


def _event(raw: dict[str, Any], cat: str, problems: collections.Counter[str]) -> Event | None:
    """One event, or None (counted in ``problems``) when a field it needs is missing or impossible."""
    name = raw.get("name", "")
    if not isinstance(name, str):
        problems["whose name is not a string, left out"] += 1
        return None
    ts, dur = _number(raw.get("ts")), _number(raw.get("dur", 0.0))
    if ts is None or dur is None or abs(ts) > MAX_TIME_US or dur > MAX_TIME_US:
        problems["without a usable time (missing, not a finite number, or out of range), left out"] += 1
        return None
    if dur < 0:
        problems["with a negative duration (it ends before it starts), left out"] += 1
        return None
    if len(name) > MAX_NAME_CHARS:
        problems[f"with a name longer than {MAX_NAME_CHARS:,} characters, cut"] += 1
    args = raw.get("args")
    corr = args.get("correlation") if isinstance(args, dict) else None
    if corr is not None and (isinstance(corr, bool) or not isinstance(corr, int) or not 0 <= corr < 2**63):
        problems["with a correlation id that is not a non-negative integer, ignored"] += 1
        corr = None
    tid = raw.get("tid", "")
    tid = "" if isinstance(tid, bool) or not isinstance(tid, (str, int, float)) else tid
    return Event(
        name=clean_text(name, MAX_NAME_CHARS),
        cat=cat,
        ts=ts,
        dur=dur,
        tid=clean_text(str(tid), 200),
        correlation=corr,
    )


def _parse(path: Path, data: dict[str, Any]) -> Trace:
    lists: dict[str, list[Event]] = {
        k: [] for k in ("cpu_op", "user_annotation", "runtime", "kernel", "copy")
    }
    problems: collections.Counter[str] = collections.Counter()
    for raw in data["traceEvents"]:
        if not isinstance(raw, dict) or raw.get("ph") != "X" or not isinstance(raw.get("cat", ""), str):
            continue
        cat = raw.get("cat", "")
        cat = _CATEGORY_ALIASES.get(cat.lower(), cat)
        if cat in ("cuda_runtime", "cuda_driver"):
            key = "runtime"
        elif cat in ("gpu_memcpy", "gpu_memset"):
            key = "copy"
        elif cat in lists:
            key = cat
        else:
            continue  # python_function, ac2g flows, Trace, ...: not read
        event = _event(raw, cat, problems)  # one bad event should not sink a trace
        if event is not None:
            lists[key].append(event)
    for events in lists.values():
        events.sort(key=lambda e: (e.ts, -e.dur))
    props = data.get("deviceProperties")
    meta_problems: list[str] = []
    metadata = _clean_metadata(path, data.get(METADATA_KEY), meta_problems)
    return Trace(
        path=path,
        cpu_ops=lists["cpu_op"],
        annotations=lists["user_annotation"],
        runtime=lists["runtime"],
        kernels=lists["kernel"],
        copies=lists["copy"],
        device_properties=[p for p in props if isinstance(p, dict)] if isinstance(props, list) else [],
        metadata=metadata,
        problems=[f"{n:,} event{'' if n == 1 else 's'} {what}" for what, n in sorted(problems.items())]
        + meta_problems,
    )


_META_TEXT = ("variant", "device", "dtype", "torch", "triton", "fusedmlp")


def _clean_metadata(path: Path, meta: Any, problems: list[str]) -> dict[str, Any]:
    """Our metadata with every field the analysis reads checked and nothing else: a foreign or
    hand-edited trace must not turn a typo into a crash, so a field of the wrong type or an
    impossible value is dropped (read as unknown, and listed in ``problems``). A preset that
    asks for more work than MAX_* is a TraceError."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        problems.append(f"metadata '{METADATA_KEY}' is not an object: ignored")
        return {}
    out: dict[str, Any] = {}
    for key in _META_TEXT:
        value = meta.get(key)
        if isinstance(value, str):
            if value.strip():
                out[key] = clean_text(value.strip(), 200)
        elif value is not None:
            problems.append(f"metadata {key} is not a string: ignored")
    if isinstance(meta.get("note"), str):
        out["note"] = clean_text(meta["note"], 20_000, multiline=True)
    size = meta.get("element_size")
    if type(size) is int and size in (1, 2, 4, 8):
        out["element_size"] = size
    elif size is not None:
        problems.append("metadata element_size is not 1, 2, 4 or 8 bytes: ignored")
    peaks = meta.get("peaks")
    values = [_number(peaks.get(k)) for k in ("tflops", "gbps")] if isinstance(peaks, dict) else []
    if len(values) == 2 and all(v is not None and 1e-6 <= v <= 1e9 for v in values):
        out["peaks"] = {"tflops": values[0], "gbps": values[1]}
    else:
        out["peaks"] = None
        if peaks is not None:
            problems.append("metadata peaks are not two positive numbers (tflops, gbps): ignored")
    wall = meta.get("wall_us")
    if wall is not None:
        w = _number(wall)
        if w is not None and 0 < w <= MAX_TIME_US:
            out["wall_us"] = w
        else:
            problems.append("metadata wall_us is not a positive number: ignored")
    out["preset"] = _clean_preset(path, meta.get("preset"), problems)
    return out


def _clean_preset(path: Path, preset: Any, problems: list[str]) -> dict[str, Any] | None:
    """The preset's fields, typed; None (with a problem) when unreadable. A size out of its range
    raises TraceError: it would size the guess (one entry per layer) and the numbers shown."""
    if preset is None:
        return None
    if not isinstance(preset, dict):
        problems.append("metadata preset is not an object: ignored")
        return None
    out: dict[str, Any] = {}
    for key, value in preset.items():
        if key in _PRESET_LIMITS:
            if value is None and key == "out_features":
                out[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"metadata preset.{key} is not a number: preset ignored")
                return None
            if not (isinstance(value, int) and 1 <= value <= _PRESET_LIMITS[key]):
                shown = clean_text(repr(value), 40)
                raise TraceError(
                    f"{_where(path)}: metadata preset.{key}={shown} is not an integer from 1 to "
                    f"{_PRESET_LIMITS[key]:,}"
                )
            out[key] = value
        elif key in ("gated", "bias"):
            if not isinstance(value, bool):
                problems.append(f"metadata preset.{key} is not true or false: preset ignored")
                return None
            out[key] = value
        elif key in ("name", "description", "activation"):
            if not isinstance(value, str):
                problems.append(f"metadata preset.{key} is not a string: preset ignored")
                return None
            out[key] = clean_text(value, 200)
    return out


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN and infinities become null (json.dumps would write the
    non-standard NaN and Infinity tokens)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_atomic(files: dict[Path, str | bytes]) -> None:
    """Write all of ``files`` or none: each into a new file next to it, then each renamed into
    place (os.replace), in the order given. A failure removes the new files and leaves any
    existing ones as they were. Text is written as UTF-8 (a lone surrogate as "?")."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            written.append((tmp, path))
            with tmp.open("xb") as f:  # "x": a new file, with the umask's permissions
                f.write(data.encode("utf-8", "replace") if isinstance(data, str) else data)
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)


def add_metadata(path: Path, metadata: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``metadata`` under the trace's top-level ``fusedmlp`` key (to ``out``, gzip when it
    ends in .gz). Perfetto and chrome://tracing ignore unknown top-level keys."""
    data = json.loads(_read(path).decode("utf-8"))
    data[METADATA_KEY] = metadata
    out = out or path
    text = strict_json(data, separators=(",", ":"))
    if out.suffix == ".gz":
        write_atomic({out: gzip.compress(text.encode(), compresslevel=9, mtime=0)})
    else:
        write_atomic({out: text})
    return out
