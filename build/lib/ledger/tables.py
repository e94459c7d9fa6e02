"""Rich tables for the query verbs: what a person reads in a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

RUN_COLUMNS = ("run_id", "sweep_id", "state", "attempt", "step", "progress", "exit_code", "last_heartbeat_at")
STATE_STYLE = {
    "running": "green", "finished": "bold green", "failed": "red", "crashed": "bold red",
    "killed": "magenta", "preempted": "yellow", "pending": "dim", "initializing": "cyan",
    "stopping": "yellow", "idle": "blue", "paused": "yellow", "stopped": "yellow", "cancelled": "magenta",
}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "state":
        style = STATE_STYLE.get(str(value), "")
        return f"[{style}]{value}[/]" if style else str(value)
    if key == "progress" and isinstance(value, float):
        return f"{value:.0%}"
    if key.endswith("_at") and isinstance(value, str) and len(value) >= 19:
        return value[:19].replace("T", " ")  # full precision is in --json
    return str(value)


def table(title: str, columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for col in columns:
        out.add_column(col, no_wrap=col.endswith("_id") or col in ("state", "event_type"), overflow="fold")
    for row in rows:
        out.add_row(*(_cell(col, row.get(col)) for col in columns))
    return out


def print_runs(console: Console, runs: list[dict[str, Any]], cursor: str | None) -> None:
    console.print(table(f"runs ({len(runs)})", RUN_COLUMNS, runs))
    if cursor:
        console.print(f"[dim]more: --after {cursor}[/]")


def print_record(console: Console, title: str, record: dict[str, Any]) -> None:
    out = Table(title=title, title_justify="left", show_header=False)
    out.add_column("field", style="bold")
    out.add_column("value")
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        out.add_row(key, _cell(key, value))
    console.print(out)


def print_history(console: Console, title: str, entries: list[dict[str, Any]]) -> None:
    console.print(table(title, ("seq", "state", "event_type", "reason", "at", "recorded_at", "event_id"), entries))


def print_sweeps(console: Console, sweeps: list[dict[str, Any]]) -> None:
    rows = [{**s, "runs": ", ".join(f"{k}={v}" for k, v in s["runs"].items() if v) or "-",
             "queue": len(s["queue"])} for s in sweeps]
    console.print(table(f"sweeps ({len(rows)})", ("sweep_id", "state", "runs", "queue", "updated_at"), rows))
