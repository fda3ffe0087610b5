"""``nettester plot``: one self-contained HTML page from JSON run reports.

matplotlib (the optional ``[plots]`` extra) draws each figure as SVG, inlined
in the page, so it opens anywhere without a network. Figures, when the
reports hold data for them: the loss timeline (time x client, each episode
coloured by direction, NAT mapping changes as marks), loss per minute by
direction, RTT p50/p99 over time, and for keep-alive the connections open
over time and closes by cause.
"""

from __future__ import annotations

import html
import io
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nettester.report.model import CLOSE, DIRECTIONS, FORWARD, LOSS_KEYS, MAPPING_CHANGE, RETURN, UNATTRIBUTED

EXTRA = "plots"
COLOURS = {FORWARD: "#d62728", RETURN: "#1f77b4", UNATTRIBUTED: "#7f7f7f"}
LABELS = {FORWARD: "lost on the way out", RETURN: "lost on the way back", UNATTRIBUTED: "unattributed"}
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)
MAX_TIMELINE_CLIENTS = 60  # rows of the timeline; the clients with the most episodes are shown


class PlotUnavailableError(Exception):
    """matplotlib is not installed: the message says which extra to install."""


def _figure_module() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(f"nettester plot needs matplotlib: pip install 'nettester[{EXTRA}]'") from None
    return Figure


class Page:
    """The reports of one page, on one time axis (seconds since the earliest start)."""

    def __init__(self, reports: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        self.reports = reports
        self.origin = min(report["started"] for _, report in reports)
        self.several = len(reports) > 1

    def t(self, when: float) -> float:
        return when - self.origin

    def end(self, report: Mapping[str, Any]) -> float:
        return self.t(report["ended"])

    def client(self, name: str, report: Mapping[str, Any], client: str) -> str:
        return f"{name}: {client}" if self.several else client


def _svg(figure: Any, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    # Distinct ids per figure: several SVGs share one HTML document.
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    # Only the <svg> element: no XML prolog inside HTML, no RDF metadata block.
    return _METADATA.sub("", text[text.index("<svg"):], count=1)


def _new_figure(height: float = 3.2) -> tuple[Any, Any]:
    figure = _figure_module()(figsize=(10, height), dpi=96)
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    return figure, axes


def _mapping_marks(page: Page, axes: Any) -> None:
    changes = [page.t(mark["t"]) for _, report in page.reports for mark in report["marks"]
               if mark["kind"] == MAPPING_CHANGE]
    for index, when in enumerate(changes):
        axes.axvline(when, color="#9467bd", linestyle="--", linewidth=1,
                     label="NAT mapping change" if index == 0 else None)


def _natural(text: str) -> list[Any]:
    """Sort key: client 2 before client 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def loss_timeline(page: Page) -> str | None:
    """Each loss episode on its client's row, from its start to its end (open: to the run's end)."""
    rows: Counter[str] = Counter()
    for name, report in page.reports:
        for episode in report["episodes"]:
            rows[page.client(name, report, episode["client"])] += 1
    if not rows:
        return None
    shown = sorted((client for client, _ in rows.most_common(MAX_TIMELINE_CLIENTS)), key=_natural)
    position = {client: index for index, client in enumerate(shown)}
    figure, axes = _new_figure(max(2.5, min(0.25 * len(shown) + 1.5, 12)))
    labelled: set[str] = set()
    for name, report in page.reports:
        for episode in report["episodes"]:
            row = position.get(page.client(name, report, episode["client"]))
            if row is None:
                continue
            direction = episode["direction"]
            start = page.t(episode["start"])
            end = page.t(episode["end"]) if episode["end"] is not None else page.end(report)
            label = LABELS[direction] if direction not in labelled else None
            labelled.add(direction)
            axes.plot([start, max(end, start)], [row, row], color=COLOURS[direction], linewidth=3,
                      solid_capstyle="butt")
            axes.plot([start], [row], marker="o", markersize=4, color=COLOURS[direction], label=label)
    _mapping_marks(page, axes)
    axes.set_yticks(range(len(shown)), shown, fontsize=7 if len(shown) > 20 else 9)
    axes.set_ylim(-0.7, len(shown) - 0.3)
    axes.set_xlabel("seconds since start")
    hidden = len(rows) - len(shown)
    axes.set_title("Loss timeline by client" + (f" ({hidden} more clients not shown)" if hidden else ""))
    axes.legend(loc="upper right", fontsize=8)
    return _svg(figure, "timeline")


def _bin_width(page: Page) -> int:
    """Seconds per bar: a minute, or 10 s for runs of 10 minutes or less."""
    span = max(page.end(report) for _, report in page.reports)
    return 60 if span > 600 else 10


def _stacked_bars(page: Page, counts: Mapping[str, Counter[int]], colours: Mapping[str, str] | None,
                  labels: Mapping[str, str] | None, what: str, salt: str) -> str:
    """Bars per time bin, stacked by key (a direction or a cause)."""
    width = _bin_width(page)
    last = max(max(counter, default=0) for counter in counts.values())
    figure, axes = _new_figure()
    bottom = [0] * (last + 1)
    starts = [index * width for index in range(last + 1)]
    for key, counter in counts.items():
        heights = [counter[index] for index in range(last + 1)]
        axes.bar(starts, heights, bottom=bottom, width=width * 0.8, align="edge",
                 color=colours[key] if colours else None, label=labels[key] if labels else key)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_xlim(0, max(max(page.end(report) for _, report in page.reports), (last + 1) * width))
    axes.set_xlabel("seconds since start")
    axes.set_ylabel(what)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"{what.capitalize()} per {'minute' if width == 60 else f'{width} s'}")
    axes.legend(loc="upper right", fontsize=8)
    return _svg(figure, salt)


def loss_per_minute(page: Page) -> str | None:
    """Episodes per minute (10 s for short runs) of their start, stacked by direction."""
    width = _bin_width(page)
    bins: dict[str, Counter[int]] = {direction: Counter() for direction in DIRECTIONS}
    for _, report in page.reports:
        for episode in report["episodes"]:
            bins[episode["direction"]][int(page.t(episode["start"]) // width)] += 1
    if not any(bins.values()):
        return None
    return _stacked_bars(page, bins, COLOURS, LABELS, "loss episodes by direction", "perminute")


def _series(page: Page, key: str) -> Iterable[tuple[str, list[float], list[float]]]:
    for name, report in page.reports:
        points = [(page.t(sample["t"]), sample[key]) for sample in report["series"] if sample.get(key) is not None]
        if points:
            yield name, [t for t, _ in points], [value for _, value in points]


def rtt_over_time(page: Page) -> str | None:
    """RTT p50 and p99 of each sampling interval."""
    p50 = list(_series(page, "rtt_p50_ms"))
    if not p50:
        return None
    figure, axes = _new_figure()
    for (name, times, values), colour in zip(p50, ("#2ca02c", "#17becf", "#bcbd22", "#8c564b"), strict=False):
        prefix = f"{name}: " if page.several else ""
        axes.plot(times, values, color=colour, label=f"{prefix}p50")
    for (name, times, values), colour in zip(_series(page, "rtt_p99_ms"), ("#ff7f0e", "#e377c2", "#d62728"),
                                             strict=False):
        prefix = f"{name}: " if page.several else ""
        axes.plot(times, values, color=colour, linestyle="--", label=f"{prefix}p99")
    _mapping_marks(page, axes)
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("RTT (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title("RTT p50 / p99 over time")
    axes.legend(loc="upper right", fontsize=8)
    return _svg(figure, "rtt")


def connections_over_time(page: Page) -> str | None:
    """Keep-alive: connections open at each sample."""
    series = list(_series(page, "open_connections"))
    if not series:
        return None
    figure, axes = _new_figure()
    for name, times, values in series:
        axes.step(times, values, where="post", label=name)
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("open connections")
    axes.set_ylim(bottom=0)
    axes.set_title("Connections open over time")
    if page.several:
        axes.legend(loc="lower right", fontsize=8)
    return _svg(figure, "connections")


def closes_by_cause(page: Page) -> str | None:
    """Keep-alive: closes per minute (10 s for short runs), stacked by cause."""
    width = _bin_width(page)
    bins: dict[str, Counter[int]] = {}
    for _, report in page.reports:
        for mark in report["marks"]:
            if mark["kind"] == CLOSE:
                cause = str(mark["detail"].get("cause", "unknown"))
                bins.setdefault(cause, Counter())[int(page.t(mark["t"]) // width)] += 1
    if not bins:
        return None
    return _stacked_bars(page, dict(sorted(bins.items())), None, None, "closes by cause", "closes")


FIGURES = (loss_timeline, loss_per_minute, rtt_over_time, connections_over_time, closes_by_cause)


def _summary_rows(page: Page) -> str:
    rows = []
    for name, report in page.reports:
        verdict = report["verdict"]
        loss = report["loss"]
        target = report["configuration"].get("target", "")
        status = "pass" if verdict["passed"] else "FAIL"
        cells = [name, report["role"], target, f"{report['duration_s']:.0f} s",
                 *(str(loss[LOSS_KEYS[direction]]) for direction in DIRECTIONS), status]
        css = "pass" if verdict["passed"] else "fail"
        rows.append(f'<tr class="{css}">' + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    return "\n".join(rows)


def _reasons(page: Page) -> str:
    """Why each failed run failed, below the table."""
    items = [f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, report in page.reports
             for reason in report["verdict"]["reasons"]]
    return f'<ul class="reasons">{"".join(items)}</ul>' if items else ""


def render_page(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The HTML page for ``(name, report document)`` pairs.

    :raises PlotUnavailableError: without matplotlib.
    """
    _figure_module()
    page = Page(reports)
    figures = [svg for svg in (figure(page) for figure in FIGURES) if svg is not None]
    body = "\n".join(f'<div class="figure">{svg}</div>' for svg in figures) or "<p>No losses, RTTs or " \
        "connection samples to draw in these reports.</p>"
    header = "".join(f"<th>{html.escape(title)}</th>" for title in (
        "report", "role", "target", "duration", "lost_forward", "lost_return", "lost_unattributed", "verdict"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nettester report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin-bottom: 0.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
ul.reasons {{ color: #b00; margin-bottom: 1.5em; }}
tr.fail td:last-child {{ color: #b00; font-weight: bold; }}
tr.pass td:last-child {{ color: #080; }}
.figure svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
<h1>nettester report</h1>
<table><tr>{header}</tr>
{_summary_rows(page)}
</table>
{_reasons(page)}
{body}
</body></html>
"""
