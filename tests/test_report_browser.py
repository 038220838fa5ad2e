"""report.html in a real headless browser (Debian's chromium; CI installs it): the page renders,
its three plots decode, nothing is fetched from the network, and the console stays silent.

The page marks ``<body data-plots-rendered="N">`` on load with the number of plot images the
browser decoded (naturalWidth > 0), which ``--dump-dom`` then shows us. Console messages come
from chromium's own log (``--enable-logging=stderr``: ``INFO:CONSOLE`` lines); a control page
with a deliberate error proves that this check can fail.
"""

import os
import re
import shutil
import subprocess

import pytest
from synthetic_traces import make_trace, write

from fusedmlp.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs chromium and sets FUSEDMLP_REQUIRE_BROWSER=1 so that these tests cannot skip there.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("FUSEDMLP_REQUIRE_BROWSER"),
    reason="chromium not installed (apt-get install -y chromium; CI installs it)",
)


def render(page, tmp_path):
    """(DOM after load, console lines) of ``page`` in headless chromium."""
    assert CHROMIUM is not None, "FUSEDMLP_REQUIRE_BROWSER is set but chromium is not installed"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root in a container
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def test_console_check_catches_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    _, console = render(bad, tmp_path)
    print(console)
    assert any("boom" in line for line in console) and any(
        "Uncaught ReferenceError" in line for line in console
    )


def test_report_renders_with_plots_and_no_console_errors(tmp_path):
    paths = [write(make_trace(v), tmp_path / f"{v}.json") for v in ("eager", "compile", "liger", "fusedmlp")]
    assert main(["report", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    dom, console = render(tmp_path / "out" / "report.html", tmp_path)
    assert console == [], console
    assert 'data-plots-rendered="3"' in dom  # all three plot images decoded by the browser
    for plot in ("plot-timeline", "plot-breakdown", "plot-roofline"):
        assert f'id="{plot}"' in dom
    assert (
        dom.count('<table class="kernels">') == 4 and "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT" in dom
    )
    # Self-contained: every resource is inline (the one http link is a plain <a> to Perfetto)
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', dom))
    assert not re.search(r'<link[^>]+href="http', dom)
