"""Bad flags and paths on the command line (issue 15): each ends in one line naming the problem
and a non-zero exit status (2 for a bad flag or input, 1 for a failure while running), never in
a traceback; and a bad flag is refused before any work."""

from __future__ import annotations

import errno
import os
import pathlib
import re
import time

import pytest
from synthetic_traces import make_trace, write

from fusedmlp import cli
from fusedmlp.cli import main

ROOT = os.geteuid() == 0  # root writes anywhere: unwritable folders need /proc there


def exits(capsys, argv: list[str], code: int = 2) -> str:
    """Run the command line, expecting SystemExit(code) and one line on stderr; that line."""
    capsys.readouterr()  # what earlier calls (and prints) left
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == code, (e.value.code, out.err)
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.out + out.err and not out.out.strip(), out
    assert lines[0].startswith("fusedmlp") and ": error: " in lines[0]
    print(lines[0])
    assert time.perf_counter() - start < 30  # refused before any real work
    return lines[0]


@pytest.fixture
def trace_file(tmp_path):
    return write(make_trace("eager"), tmp_path / "eager.json.gz")


def _unwritable(tmp_path: pathlib.Path) -> str:
    if ROOT:
        return "/proc/fusedmlp-out"  # procfs takes no new folders, whoever asks
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    return str(folder / "out")


@pytest.mark.parametrize("command", ["report", "profile"])
@pytest.mark.parametrize(
    "kind", ["file", "dev-null", "proc", "proc-child", "under-a-file", "unwritable", "nul", "empty"]
)
def test_out_that_cannot_be_a_folder(capsys, tmp_path, trace_file, command, kind):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = {
        "file": str(a_file),
        "dev-null": "/dev/null",
        "proc": "/proc",
        "proc-child": "/proc/x/y",
        "under-a-file": str(a_file / "out"),
        "unwritable": _unwritable(tmp_path),
        "nul": str(tmp_path / "a\0b"),
        "empty": "",
    }[kind]
    argv = ["report", str(trace_file)] if command == "report" else ["profile", "--preset", "cpu-small"]
    line = exits(capsys, [*argv, "--out", out])
    assert "--out" in line and (out.replace("\0", "\ufffd") in line or kind in ("nul", "empty"))
    assert not (pathlib.Path(out).is_dir() and kind == "under-a-file")


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99", "cuda:-1", "", "cpu:x", "mps:0"])
@pytest.mark.parametrize("command", ["profile", "fuse"])
def test_bad_device(capsys, device, command):
    argv = ["profile", "--preset", "cpu-small"] if command == "profile" else ["fuse", "--hf-config", "llama"]
    line = exits(capsys, [*argv, "--device", device])
    assert "--device" in line


@pytest.mark.parametrize("flag", ["--tokens", "--hidden", "--intermediate"])
@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "1" * 5000, str(2**40)])
def test_profile_sizes_must_be_positive_integers(capsys, flag, value):
    line = exits(capsys, ["profile", "--preset", "cpu-small", flag, value])
    assert flag in line and "positive integer" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["fuse", "--hf-config", "llama", "--tokens", "0"],
        ["fuse", "--hf-config", "llama", "--tokens", "-1"],
        ["bench", "--batch", "0"],
        ["bench", "--seq", "-3"],
        ["bench", "--tokens", "16,0"],
        ["bench", "--tokens", ","],
        ["profile", "--variants", ","],
        ["profile", "--dtype", "fp8"],
        ["report"],
        ["nope"],
        [],
    ],
)
def test_usage_errors_are_one_line(capsys, argv):
    exits(capsys, argv)


def _config(tmp_path: pathlib.Path, text: str | bytes) -> str:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    data = text.encode() if isinstance(text, str) else text
    (folder / "config.json").write_bytes(data)
    return str(folder)


@pytest.mark.parametrize(
    "content",
    ['{"model_type": "llama", "hidden_size": ', "[1, 2]", b"\xff\xfe\x00", "", '{"model_type": 5}'],
    ids=["truncated", "a-list", "binary", "empty", "typed-wrong"],
)
def test_fuse_with_a_malformed_config_json(capsys, tmp_path, content):
    pytest.importorskip("transformers")
    folder = _config(tmp_path, content)
    for path in (folder, os.path.join(folder, "config.json")):
        line = exits(capsys, ["fuse", "--hf-config", path, "--device", "cpu"])
        assert "--hf-config" in line and "model" in line


@pytest.mark.parametrize(
    "setting",
    ["hidden_act=nope", "hidden_size=-1", "hidden_size=NaN", "num_attention_heads=0", "vocab_size=[1]"],
)
def test_fuse_with_a_config_that_cannot_build(capsys, setting):
    pytest.importorskip("transformers")
    line = exits(
        capsys, ["fuse", "--hf-config", "llama", "--set", setting, "--tokens", "4", "--device", "cpu"]
    )
    assert re.search("--hf-config llama: cannot (read the model config|build or run the model)", line)


def test_fuse_with_a_config_file_that_names_an_unknown_activation(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, hidden_act="nope"
    )
    config.save_pretrained(tmp_path)
    line = exits(capsys, ["fuse", "--hf-config", str(tmp_path), "--tokens", "4", "--device", "cpu"])
    assert "'nope'" in line


def test_profile_with_a_config_that_cannot_build(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, hidden_act="nope"
    )
    config.save_pretrained(tmp_path / "model")
    _config(tmp_path / "bad", '{"model_type": "llama", "hidden_size": ')
    for folder in (tmp_path / "model", tmp_path / "bad" / "model"):
        line = exits(capsys, ["profile", "--hf-config", str(folder), "--out", str(tmp_path / "out")])
        assert f"--hf-config {folder}" in line


def test_fuse_with_a_folder_without_config(capsys, tmp_path):
    pytest.importorskip("transformers")
    line = exits(capsys, ["fuse", "--hf-config", str(tmp_path), "--device", "cpu"])
    assert str(tmp_path) in line


def test_unreadable_trace_is_not_called_corrupt(capsys, tmp_path, trace_file, monkeypatch):
    """A permission error was reported as "corrupt gzip?"."""
    if ROOT:  # chmod does not stop root: make the open fail as it would for anyone else
        real_open = pathlib.Path.open

        def open_(self, *args, **kwargs):
            if self == trace_file:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", open_)
    else:
        trace_file.chmod(0)
    line = exits(capsys, ["report", str(trace_file), "--out", str(tmp_path / "out")])
    assert str(trace_file) in line and "permission denied" in line and "corrupt" not in line


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "no such file"),
        ("under-a-file", "not a folder"),
        ("nul", "not a usable path"),
        ("not-gzip", "not valid JSON"),
        ("cut-gzip", "truncated or corrupt gzip"),
    ],
)
def test_trace_paths_name_their_problem(capsys, tmp_path, trace_file, kind, words):
    path = {
        "missing": str(tmp_path / "nope.json"),
        "under-a-file": str(trace_file / "x.json"),
        "nul": str(tmp_path / "a\0b.json"),
        "not-gzip": str(tmp_path / "x.json"),
        "cut-gzip": str(tmp_path / "x.json.gz"),
    }[kind]
    if kind == "not-gzip":
        pathlib.Path(path).write_text("{")
    if kind == "cut-gzip":
        pathlib.Path(path).write_bytes(trace_file.read_bytes()[:50])
    line = exits(capsys, ["report", path, "--out", str(tmp_path / "out")])
    assert words in line


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(capsys, tmp_path, trace_file, monkeypatch):
    from fusedmlp.profiler import commands

    def boom(*args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(commands, "report_command", boom)
    argv = ["report", str(trace_file), "--out", str(tmp_path / "out")]
    line = exits(capsys, argv, code=1)
    assert line == "fusedmlp: error: RuntimeError: boom (--debug shows the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", *argv])
    monkeypatch.setenv("FUSEDMLP_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


@pytest.mark.parametrize(
    "error, code, words",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/y"),
            1,
            "/x/y: Permission denied (PermissionError)",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/x"),
            1,
            "/x: Is a directory (IsADirectoryError)",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
        (cli.CLIError("--out x: bad"), 2, "--out x: bad"),
    ],
)
def test_errors_while_running_are_named_as_what_they_are(
    capsys, tmp_path, trace_file, monkeypatch, error, code, words
):
    from fusedmlp.profiler import commands

    def fail(*args):
        raise error

    monkeypatch.setattr(commands, "report_command", fail)
    line = exits(capsys, ["report", str(trace_file), "--out", str(tmp_path / "out")], code=code)
    assert line == f"fusedmlp: error: {words}"
