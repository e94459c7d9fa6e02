"""Rich tables for the query verbs: what a person reads in a terminal.

A table never squeezes its columns into a letter or two: when the terminal is
too narrow for every column at its natural width, the least needed columns
are left out (named under the table; ``--json`` has every field).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

RUN_COLUMNS = ("run_id", "sweep_id", "state", "attempt", "step", "progress", "exit_code", "last_heartbeat_at")
RUN_DROPS = ("last_heartbeat_at", "attempt", "step", "exit_code", "progress", "sweep_id")
HISTORY_COLUMNS = ("seq", "state", "event_type", "reason", "at", "recorded_at", "event_id")
HISTORY_DROPS = ("recorded_at", "event_id", "seq", "reason")
SWEEP_COLUMNS = ("sweep_id", "state", "runs", "queue", "updated_at")
SWEEP_DROPS = ("updated_at", "queue")
AUDIT_COLUMNS = ("seq", "recorded_at", "event_type", "att", "effect", "state", "why")
AUDIT_DROPS = ("recorded_at", "att", "state")
STATE_STYLE = {
    "running": "green", "finished": "bold green", "failed": "red", "crashed": "bold red",
    "killed": "magenta", "preempted": "yellow", "pending": "dim", "initializing": "cyan",
    "stopping": "yellow", "idle": "blue", "paused": "yellow", "stopped": "yellow", "cancelled": "magenta",
}
EFFECT_STYLE = {"applied": "green", "unchanged": "dim", "late": "yellow", "stale": "magenta",
                "duplicate": "cyan", "quarantined": "bold red"}
WRAPS = {"reason": 16, "runs": 16, "why": 24}
"""Columns whose text may wrap, with the narrowest they may get; every other column keeps its text on one line."""
COLUMN_COST = 3
"""Cells a column costs beside its text: a border and one space of padding on each side."""


def _text(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "progress" and isinstance(value, float):
        return f"{value:.0%}"
    if (key == "at" or key.endswith("_at")) and isinstance(value, str) and value[10:11] == "T":
        return value[:19].replace("T", " ")  # an RFC 3339 time to the second: full precision is in --json
    return str(value)


def _cell(key: str, value: Any) -> Text:
    text = _text(key, value)
    styles = {"state": STATE_STYLE, "effect": EFFECT_STYLE}.get(key)
    return Text(text, style=styles.get(text, "")) if styles else Text(text)


def _narrowest(columns: Sequence[str], rows: list[dict[str, Any]]) -> dict[str, int]:
    """Each column's width on one line (its header or longest cell), or less for one that may wrap."""
    natural = {col: max([len(col), *(len(_text(col, row.get(col))) for row in rows)]) for col in columns}
    return {col: min(width, WRAPS.get(col, width)) for col, width in natural.items()}


def fitting(columns: Sequence[str], rows: list[dict[str, Any]], width: int, drops: Sequence[str]) -> list[str]:
    """The columns that fit ``width`` at their narrowest, leaving out columns in the order of ``drops``
    until they do."""
    narrowest = _narrowest(columns, rows)
    shown = list(columns)
    for col in drops:
        if 1 + sum(narrowest[c] + COLUMN_COST for c in shown) <= width:
            break
        shown.remove(col)
    return shown


def table(title: str, columns: Sequence[str], rows: list[dict[str, Any]], *, width: int | None = None,
          drops: Sequence[str] = ()) -> tuple[Table, list[str]]:
    """A table of ``rows`` under ``title``, and the columns left out to fit ``width``."""
    shown = fitting(columns, rows, width, drops) if width else list(columns)
    narrowest = _narrowest(shown, rows)
    out = Table(title=title, title_justify="left")
    for col in shown:
        out.add_column(col, no_wrap=col not in WRAPS, overflow="fold", min_width=narrowest[col])
    for row in rows:
        out.add_row(*(_cell(col, row.get(col)) for col in shown))
    return out, [col for col in columns if col not in shown]


def _print(console: Console, title: str, columns: Sequence[str], rows: list[dict[str, Any]],
           drops: Sequence[str]) -> None:
    out, hidden = table(title, columns, rows, width=console.width, drops=drops)
    console.print(out)
    if hidden and rows:
        console.print(f"[dim]not shown at this width: {', '.join(hidden)} (--json has every field)[/]",
                      highlight=False)


def print_runs(console: Console, runs: list[dict[str, Any]], cursor: str | None) -> None:
    _print(console, f"runs ({len(runs)})", RUN_COLUMNS, runs, RUN_DROPS)
    if cursor:
        console.print(f"[dim]more: --after {cursor}[/]")


def print_record(console: Console, title: str, record: dict[str, Any]) -> None:
    out = Table(title=title, title_justify="left", show_header=False)
    out.add_column("field", style="bold", no_wrap=True)
    out.add_column("value", overflow="fold")
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        out.add_row(key, _cell(key, value))
    console.print(out)


def print_history(console: Console, title: str, entries: list[dict[str, Any]]) -> None:
    _print(console, title, HISTORY_COLUMNS, entries, HISTORY_DROPS)


def print_audit(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    """A run's timeline (``ledger audit``): one row per message, its effect and why."""
    _print(console, title, AUDIT_COLUMNS, rows, AUDIT_DROPS)


def print_sweeps(console: Console, sweeps: list[dict[str, Any]]) -> None:
    rows = [{**s, "runs": ", ".join(f"{k}={v}" for k, v in s["runs"].items() if v) or "-",
             "queue": len(s["queue"])} for s in sweeps]
    _print(console, f"sweeps ({len(rows)})", SWEEP_COLUMNS, rows, SWEEP_DROPS)
