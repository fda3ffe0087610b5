"""nettester plot: the HTML page, its figures drawn in a real headless Chromium, the role's errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nettester.report import FORWARD, RETURN, UNATTRIBUTED, LossEpisode, RunRecorder, Thresholds, judge, write_report
from nettester.report.plot import COLOURS, render_page
from nettester.report.roles import PlotOptions, run_plot
from tests.interop.peers import installed

START = 1_700_000_000.0


def stun_like_report() -> dict[str, Any]:
    """Ten minutes of 12 clients: losses in every direction, RTT samples, two NAT mapping changes."""
    recorder = RunRecorder("stun-client", {"target": "127.0.0.1:3478", "clients": 12}, START)
    for second in range(0, 600, 10):
        recorder.sample(START + second, rtt_p50_ms=2.0 + (second % 60) / 30, rtt_p99_ms=9.0 + (second % 120) / 10)
    for index in range(40):
        direction = (FORWARD, RETURN, UNATTRIBUTED)[index % 3]
        start = START + 13 * index + 3
        recorder.episode(LossEpisode(str(index % 12 + 1), f"{index:024x}", start, start + 20 if index % 7 else None,
                                     direction, 5, 5 if direction == RETURN else 0))
    recorder.mark(START + 200, "nat_mapping_change", "4", old="10.0.0.2:40000", new="10.0.0.2:40007")
    recorder.mark(START + 410, "nat_mapping_change", "9", old="10.0.0.2:40001", new="10.0.0.2:40020")
    thresholds = Thresholds()
    return recorder.document(START + 600, {"sent": 720}, {"p50": 2.5, "max": 30.0, "samples": 680}, thresholds,
                             judge(thresholds, 720, 40, 680))


def keepalive_report() -> dict[str, Any]:
    recorder = RunRecorder("keepalive-client", {"target": "127.0.0.1:49665", "clients": 50}, START + 5)
    for second in range(0, 300, 5):
        recorder.sample(START + 5 + second, open_connections=50 - (second // 60) * 3, rtt_p50_ms=1.0, rtt_p99_ms=3.0)
    for index, cause in enumerate(["peer_reset"] * 6 + ["response_missing"] * 3 + ["peer_closed"] * 2):
        when = START + 30 + 25 * index
        recorder.mark(when, "close", str(index + 1), cause=cause)
        recorder.episode(LossEpisode(str(index + 1), f"run-{index + 1}-1", when, when + 2, UNATTRIBUTED, 1, None,
                                     {"cause": cause}))
    thresholds = Thresholds()
    return recorder.document(START + 305, {"resets": 6}, None, thresholds, judge(thresholds, 100, 3, 97, 6))


def write_reports(directory: Path) -> list[str]:
    paths = []
    for name, document in (("stun.json", stun_like_report()), ("keepalive.json", keepalive_report())):
        path = str(directory / name)
        write_report(path, json.loads(json.dumps(document)))
        paths.append(path)
    return paths


def test_page_is_self_contained_and_has_every_figure() -> None:
    pytest.importorskip("matplotlib")
    page = render_page([("stun.json", stun_like_report()), ("keepalive.json", keepalive_report())])
    assert page.count("<svg") == 5
    for title in ("Loss timeline by client", "Loss episodes by direction per 10 s", "RTT p50 / p99 over time",
                  "Connections open over time", "Closes by cause per 10 s"):
        assert f"<!-- {title} -->" in page  # matplotlib draws text as paths, with the text as a comment
    for fetch in ('src="', 'href="http', "url(http", "<script", "<link", "@import", "<metadata>"):
        assert fetch not in page  # nothing loaded from anywhere: the page is all there is
    assert '<tr class="fail"><td>stun.json</td><td>stun-client</td><td>127.0.0.1:3478</td>' in page
    assert "<li>keepalive.json: 6 connections reset or dropped, above --max-resets 0</li>" in page


def test_plot_role_writes_the_page_and_names_bad_input(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("matplotlib")
    paths = write_reports(tmp_path)
    options = PlotOptions()
    output = str(tmp_path / "report.html")
    options.parseOptions(["-o", output, *paths])
    out = io.StringIO()
    assert run_plot(options, out) == 0
    assert out.getvalue() == f"wrote {output} (2 reports)\n" and os.path.getsize(output) > 10_000
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    options = PlotOptions()
    options.parseOptions(["-o", output, str(bad)])
    assert run_plot(options, io.StringIO()) == 2


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    [path, _] = write_reports(tmp_path)
    # A child process where importing matplotlib fails, as on an install without the [plots] extra.
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None; "
            "from nettester.cli import main; main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, "plot", "-o", str(tmp_path / "x.html"), path],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "nettester plot needs matplotlib: pip install 'nettester[plots]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_plot_needs_a_report() -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="give at least one JSON report"):
        PlotOptions().parseOptions([])


def colour_pixels(pixels: Any, colour: str, tolerance: int) -> int:
    """Pixels of an RGB array within ``tolerance`` (per channel) of ``#rrggbb``."""
    import numpy

    target = numpy.array([int(colour[index:index + 2], 16) for index in (1, 3, 5)])
    return int((numpy.abs(pixels.astype(int) - target) <= tolerance).all(axis=2).sum())


@pytest.mark.interop
def test_headless_chromium_draws_the_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    image_module = pytest.importorskip("PIL.Image")
    chromium = installed("chromium", "apt-get install chromium, or .ci/install.d/80-chromium.sh")
    paths = write_reports(tmp_path)
    page = tmp_path / "report.html"
    options = PlotOptions()
    options.parseOptions(["-o", str(page), *paths])
    assert run_plot(options, io.StringIO()) == 0
    screenshot = tmp_path / "shot.png"
    # Offline and quiet: no first-run, sync, component or background network traffic.
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,2600",
               f"--screenshot={screenshot}", page.as_uri()]
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    import numpy

    with image_module.open(screenshot) as shot:
        pixels = numpy.asarray(shot.convert("RGB"))
    assert pixels.shape == (2600, 1100, 3)
    # Each direction's colour is drawn (timeline and per-minute bars), not just the page's text.
    for direction in (FORWARD, RETURN, UNATTRIBUTED):
        assert colour_pixels(pixels, COLOURS[direction], 12) > 500, direction
    # The five figures reach far down the page, and no band of it is left blank (a figure not drawn).
    grey = pixels.mean(axis=2)
    dark_rows = (grey < 200).sum(axis=1)
    bottom = int(dark_rows.nonzero()[0].max())
    assert bottom > 1800
    for top in range(250, bottom - 250, 250):
        assert int(dark_rows[top:top + 250].sum()) > 1000, f"blank region at y={top}"
