"""HTML pieces of the web view, built from the contract's shapes: escaped text, badges,
bars, tables, and the run's state timeline as SVG.

Everything that goes into a page passes through ``esc`` (or is a number);
pages are whole documents from ``templates/`` filled with ``string.Template``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from html import escape
from pathlib import Path
from string import Template
from typing import Any, Final
from urllib.parse import quote, urlencode

from ledger.core.fold import Entry
from ledger.core.machine import RUN_STATES, TERMINAL, Run

TEMPLATES: Final = Path(__file__).parent / "templates"
STATE_COLOURS: Final = {
    "pending": "#9aa4b2", "initializing": "#7c9cf5", "running": "#2e7dd7", "stopping": "#b18cf0",
    "idle": "#5fb3b3", "finished": "#2f9e44", "failed": "#d9480f", "crashed": "#c2255c", "killed": "#5c5f66",
    "preempted": "#e8a317",
    # sweep states
    "paused": "#e8a317", "stopped": "#b18cf0", "cancelled": "#5c5f66",
}
_templates: dict[str, Template] = {}


def template(name: str) -> Template:
    if name not in _templates:
        _templates[name] = Template((TEMPLATES / name).read_text())
    return _templates[name]


def esc(value: object) -> str:
    return "" if value is None else escape(str(value), quote=True)


def page(title: str, body: str, seq: int) -> str:
    return template("layout.html").substitute(title=esc(title), body=body, seq=seq)


def href(path: str, **params: object) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return esc(quote(path) + (f"?{query}" if query else ""))


def run_link(run_id: str) -> str:
    return f'<a class="id" href="{href(f"/web/runs/{run_id}")}">{esc(run_id)}</a>'


def sweep_link(sweep_id: str | None) -> str:
    if not sweep_id:
        return '<span class="dim">–</span>'
    return f'<a href="{href(f"/web/sweeps/{sweep_id}")}">{esc(sweep_id)}</a>'


def badge(state: str) -> str:
    return f'<span class="badge state-{esc(state)}">{esc(state)}</span>'


def when(value: datetime | None) -> str:
    """A time as people read it (UTC, to the second), the exact value on hover."""
    if value is None:
        return '<span class="dim">–</span>'
    text = value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f'<time datetime="{esc(value.isoformat())}">{text}</time>'


def span(seconds: float | None) -> str:
    """A duration in its two largest units: ``3d 4h``, ``5m 12s``, ``0.4s``."""
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit} {rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def duration(run: Run, now: datetime) -> float | None:
    if run.started_at is None:
        return None
    end = run.ended_at if run.ended_at is not None and run.state in TERMINAL | {"crashed", "preempted"} else now
    return (end - run.started_at).total_seconds()


def heartbeat_age(run: Run, now: datetime) -> str:
    if run.last_heartbeat_at is None:
        return '<span class="dim">–</span>'
    age = (now - run.last_heartbeat_at).total_seconds()
    live = run.state not in TERMINAL and run.state not in ("crashed", "preempted")
    return f'<span class="{"" if live else "dim"}">{span(age)} ago</span>'


def progress_bar(run: Run) -> str:
    if run.progress is None:
        return f'<span class="dim">{"step " + esc(run.step) if run.step is not None else "–"}</span>'
    pct = max(0.0, min(1.0, run.progress)) * 100
    step = f" · step {run.step}" if run.step is not None else ""
    return (f'<div class="progress" title="{pct:.1f}%{step}"><div class="fill" style="width:{pct:.1f}%"></div>'
            f'<span>{pct:.0f}%</span></div>')


RUN_HEAD: Final = ("<thead><tr><th>run</th><th>sweep</th><th>state</th><th>attempt</th><th>started</th>"
                   "<th>duration</th><th>heartbeat</th><th>progress</th></tr></thead>")


def run_rows(runs: Iterable[Run], now: datetime) -> str:
    return "".join(
        f'<tr data-run="{esc(r.run_id)}" data-state="{esc(r.state)}"><td>{run_link(r.run_id)}</td>'
        f"<td>{sweep_link(r.sweep_id)}</td><td>{badge(r.state)}</td><td class=num>{r.attempt}</td>"
        f"<td>{when(r.started_at)}</td><td class=num>{span(duration(r, now))}</td><td>{heartbeat_age(r, now)}</td>"
        f"<td>{progress_bar(r)}</td></tr>"
        for r in runs)


def runs_table(runs: Sequence[Run], now: datetime, empty: str = "No runs.") -> str:
    if not runs:
        return f'<p class="empty">{esc(empty)}</p>'
    return f'<table class="runs">{RUN_HEAD}<tbody>{run_rows(runs, now)}</tbody></table>'


def history_table(entries: Sequence[Entry]) -> str:
    if not entries:
        return '<p class="empty">No history.</p>'
    rows = "".join(
        f"<tr><td class=num>{e.seq}</td><td>{badge(e.state)}</td><td>{when(e.at)}</td><td>{when(e.recorded_at)}</td>"
        f"<td><code>{esc(e.event_type)}</code></td><td>{esc(e.reason) or '<span class=dim>–</span>'}</td></tr>"
        for e in entries)
    return ('<table class="history"><thead><tr><th>seq</th><th>state</th><th>at</th><th>recorded</th>'
            f"<th>event</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>")


def stacked_bar(counts: dict[str, int]) -> str:
    """Counts by state as one horizontal bar, a segment per state, with a legend."""
    total = sum(counts.values())
    if total == 0:
        return '<p class="empty">No runs yet.</p>'
    parts, legend = [], []
    for state in RUN_STATES:
        n = counts.get(state, 0)
        if n:
            parts.append(f'<div class="seg state-{state}" style="flex-grow:{n}" title="{state}: {n}"></div>')
            legend.append(f'<li>{badge(state)} <b>{n}</b></li>')
    return f'<div class="stacked" role="img" aria-label="runs by state">{"".join(parts)}</div>' \
           f'<ul class="legend">{"".join(legend)}</ul>'


def raw_text(raw: str) -> str:
    """Quarantined bytes as readable text: control characters and replacement marks shown as escapes."""
    out = []
    for ch in raw:
        if ch == "\ufffd":
            out.append("\\ufffd")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode())
    return esc("".join(out))


# --------------------------------------------------------------------------- the state timeline

WIDTH: Final = 960
LEFT: Final = 12
RIGHT: Final = 12
BAND_Y: Final = 28
BAND_H: Final = 34
BEAT_Y: Final = 96


def _x(t: datetime, t0: datetime, t1: datetime) -> float:
    total = max((t1 - t0).total_seconds(), 1e-6)
    return LEFT + (WIDTH - LEFT - RIGHT) * max(0.0, min(1.0, (t - t0).total_seconds() / total))


def timeline_svg(history: Sequence[Entry], *, now: datetime, ended: bool, attempts: Sequence[tuple[datetime, int]] = (),
                 beats: Sequence[datetime] = ()) -> str:
    """The run's life as SVG: a band per state over time (reasons on hover), attempt marks, and a heartbeat
    lane whose long gaps are drawn in red."""
    if not history:
        return '<p class="empty">No state changes yet.</p>'
    points = [e.at for e in history] + list(beats) + [t for t, _ in attempts]
    t0 = min(points)
    t1 = max(points) if ended else max(max(points), now)
    if t1 <= t0:
        t1 = t0 + timedelta(seconds=1)
    parts: list[str] = []
    for i, entry in enumerate(history):
        end = history[i + 1].at if i + 1 < len(history) else t1
        x0, x1 = _x(entry.at, t0, t1), _x(max(end, entry.at), t0, t1)
        tip = f"{entry.state} from {entry.at.isoformat()}" + (f" to {end.isoformat()}" if i + 1 < len(history) else "")
        tip += f" ({span((end - entry.at).total_seconds())})"
        if entry.reason:
            tip += f" — {entry.reason}"
        parts.append(
            f'<g class="band" data-state="{esc(entry.state)}"><title>{esc(tip)}</title>'
            f'<rect x="{x0:.1f}" y="{BAND_Y}" width="{max(x1 - x0, 2):.1f}" height="{BAND_H}" '
            f'fill="{STATE_COLOURS.get(entry.state, "#888")}"/>'
            + (f'<text x="{x0 + 4:.1f}" y="{BAND_Y + 21}" class="label">{esc(entry.state)}</text>'
               if x1 - x0 > 8 * len(entry.state) else "")
            + "</g>")
    for t, attempt in attempts:
        x = _x(t, t0, t1)
        parts.append(f'<g class="attempt"><title>attempt {attempt} from {esc(t.isoformat())}</title>'
                     f'<line x1="{x:.1f}" x2="{x:.1f}" y1="14" y2="{BAND_Y + BAND_H + 4}"/>'
                     f'<text x="{x + 3:.1f}" y="22">#{attempt}</text></g>')
    if beats:
        ordered = sorted(beats)
        gaps = list(zip(ordered, ordered[1:], strict=False))
        typical = statistics.median([(b - a).total_seconds() for a, b in gaps]) if gaps else 0.0
        limit = max(3 * typical, 2.0)
        parts.append(f'<line class="lane" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{BEAT_Y}" y2="{BEAT_Y}"/>')
        for a, b in gaps:
            if (b - a).total_seconds() > limit:
                x0, x1 = _x(a, t0, t1), _x(b, t0, t1)
                parts.append(f'<g class="gap"><title>no heartbeat for {span((b - a).total_seconds())} '
                             f'({esc(a.isoformat())} to {esc(b.isoformat())})</title>'
                             f'<rect x="{x0:.1f}" y="{BEAT_Y - 6}" width="{max(x1 - x0, 2):.1f}" height="12"/></g>')
        step = max(1, len(ordered) // 400)  # at most ~400 ticks drawn
        ticks = "".join(f'M{_x(t, t0, t1):.1f} {BEAT_Y - 4}v8' for t in ordered[::step])
        parts.append(f'<path class="beat" d="{ticks}"><title>{len(ordered)} heartbeats</title></path>')
    height = BEAT_Y + 30
    axis = (f'<text x="{LEFT}" y="{height - 4}" class="axis">{esc(t0.strftime("%Y-%m-%d %H:%M:%S"))}</text>'
            f'<text x="{WIDTH - RIGHT}" y="{height - 4}" class="axis" text-anchor="end">'
            f'{esc(t1.strftime("%Y-%m-%d %H:%M:%S"))}{"" if ended else " (now)"}</text>'
            f'<text x="{LEFT}" y="{BEAT_Y - 12}" class="axis">heartbeats (gaps in red)</text>')
    return (f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
            f'aria-label="state timeline" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}{axis}</svg>')


def detail_list(pairs: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v or '<span class=dim>–</span>'}</dd>" for k, v in pairs)
    return f'<dl class="details">{items}</dl>'
