"""Small builders of events and helpers to read views, for the integration tests."""

from __future__ import annotations

import itertools
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ledger.core import events as ev

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
_ids = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def eid() -> str:
    return f"e{next(_ids):08d}"


def started(run_id: str, t: float = 0, **kw: Any) -> ev.RunStarted:
    return ev.RunStarted(id=kw.pop("id", eid()), at=at(t), run_id=run_id, **kw)


def heartbeat(run_id: str, t: float = 1, **kw: Any) -> ev.RunHeartbeat:
    return ev.RunHeartbeat(id=kw.pop("id", eid()), at=at(t), run_id=run_id, **kw)


def exited(run_id: str, code: int = 0, t: float = 2, **kw: Any) -> ev.RunExited:
    return ev.RunExited(id=kw.pop("id", eid()), at=at(t), run_id=run_id, exit_code=code, **kw)


def preempting(run_id: str, t: float = 1.5, **kw: Any) -> ev.RunPreempting:
    return ev.RunPreempting(id=kw.pop("id", eid()), at=at(t), run_id=run_id, **kw)


def killed(run_id: str, t: float = 2, **kw: Any) -> ev.RunKilled:
    return ev.RunKilled(id=kw.pop("id", eid()), at=at(t), run_id=run_id, **kw)


def sweep(kind: type[ev.SweepEvent], sweep_id: str, t: float = 0, **kw: Any) -> ev.SweepEvent:
    return kind(id=kw.pop("id", eid()), at=at(t), sweep_id=sweep_id, **kw)


VIEW_QUERIES = {
    "runs": "SELECT * FROM runs ORDER BY run_id",
    "sweeps": "SELECT * FROM sweeps ORDER BY sweep_id",
    "history": "SELECT * FROM history ORDER BY kind, entity_id, seq",
    "seen": "SELECT * FROM seen ORDER BY event_id",
    "quarantine": "SELECT seq, subject, reason, raw FROM quarantine ORDER BY seq",
    "checkpoint": "SELECT * FROM checkpoint",
}


def dump_views(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every view table's rows in a stable order (recorded_at included: it is the stream's clock)."""
    with sqlite3.connect(path) as db:
        return {name: db.execute(sql).fetchall() for name, sql in VIEW_QUERIES.items()}


def run_row(path: Path, run_id: str) -> dict[str, Any] | None:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return dict(row) if row else None
