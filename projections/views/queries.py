"""The read side: queries over the views database, answering in the contract's shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Final

import aiosqlite
import msgspec

from ledger.core.fold import Entry
from ledger.core.machine import RUN_STATES, Run, Sweep
from ledger.core.shapes import SweepView
from projections.views.schema import RUN_COLUMNS, entry_from_row, run_from_row

MAX_LIMIT: Final = 1000


class QuarantineItem(msgspec.Struct, kw_only=True):
    seq: int
    subject: str
    reason: str
    raw: str
    recorded_at: datetime


_RUN_SELECT: Final = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


async def get_run(db: aiosqlite.Connection, run_id: str) -> Run | None:
    async with db.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)) as cur:
        row = await cur.fetchone()
    return run_from_row(row) if row else None


async def list_runs(db: aiosqlite.Connection, *, sweep: str | None = None, state: str | None = None,
                    limit: int = 100, after: str | None = None) -> tuple[list[Run], str | None]:
    """Runs in run id order, ``limit`` at a time; the cursor is the last run id returned."""
    where, args = [], []
    for clause, value in (("sweep_id = ?", sweep), ("state = ?", state), ("run_id > ?", after)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = _RUN_SELECT + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY run_id LIMIT ?"
    async with db.execute(sql, (*args, limit + 1)) as cur:
        rows = list(await cur.fetchall())
    runs = [run_from_row(r) for r in rows[:limit]]
    return runs, (runs[-1].run_id if len(rows) > limit else None)


async def history(db: aiosqlite.Connection, kind: str, entity_id: str) -> list[Entry]:
    async with db.execute(
        "SELECT state, at, recorded_at, seq, event_id, event_type, reason FROM history "
        "WHERE kind = ? AND entity_id = ? ORDER BY seq", (kind, entity_id)) as cur:
        return [entry_from_row(r) for r in await cur.fetchall()]


async def sweep_queue(db: aiosqlite.Connection, sweep_id: str) -> list[str]:
    """The sweep's preempted runs, oldest preemption first."""
    async with db.execute(
        "SELECT r.run_id FROM runs r WHERE r.sweep_id = ? AND r.state = 'preempted' "
        "ORDER BY (SELECT max(h.seq) FROM history h WHERE h.kind = 'run' AND h.entity_id = r.run_id), r.run_id",
        (sweep_id,)) as cur:
        return [r[0] for r in await cur.fetchall()]


async def _sweep_view(db: aiosqlite.Connection, row: tuple) -> SweepView:
    sweep_id, state, created_at, updated_at = row
    async with db.execute("SELECT state, count(*) FROM runs WHERE sweep_id = ? GROUP BY state", (sweep_id,)) as cur:
        counts: dict[str, int] = {state: count for state, count in await cur.fetchall()}
    return msgspec.convert({
        "sweep_id": sweep_id, "state": state, "created_at": created_at, "updated_at": updated_at,
        "runs": {s: counts.get(s, 0) for s in RUN_STATES}, "queue": await sweep_queue(db, sweep_id),
    }, SweepView, strict=False)


async def get_sweep(db: aiosqlite.Connection, sweep_id: str) -> SweepView | None:
    async with db.execute("SELECT sweep_id, state, created_at, updated_at FROM sweeps WHERE sweep_id = ?",
                          (sweep_id,)) as cur:
        row = await cur.fetchone()
    return await _sweep_view(db, tuple(row)) if row else None


async def list_sweeps(db: aiosqlite.Connection) -> list[SweepView]:
    async with db.execute("SELECT sweep_id, state, created_at, updated_at FROM sweeps ORDER BY sweep_id") as cur:
        rows = await cur.fetchall()
    return [await _sweep_view(db, tuple(r)) for r in rows]


async def quarantine(db: aiosqlite.Connection, *, limit: int = 100, after: int = 0) -> list[QuarantineItem]:
    async with db.execute(
        "SELECT seq, subject, reason, raw, recorded_at FROM quarantine WHERE seq > ? ORDER BY seq LIMIT ?",
        (after, limit)) as cur:
        rows = await cur.fetchall()
    return [
        msgspec.convert({"seq": s, "subject": subj, "reason": why, "raw": bytes(raw).decode("utf-8", "replace"),
                         "recorded_at": at}, QuarantineItem, strict=False)
        for s, subj, why, raw, at in rows
    ]


async def quarantine_count(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT count(*) FROM quarantine") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def sweep_runs_as_of(db: aiosqlite.Connection, sweep_id: str, *, seq: int | None = None,
                           recorded_at: str | None = None) -> tuple[dict[str, int], list[str]]:
    """A sweep's runs per state and its queue as they were at stream ``seq`` or time ``recorded_at``.

    From the history table: a run's state at a cut is the state of its last
    history entry at or before it (every state change is one entry). Runs
    count by the sweep they name now; as far as the views have applied.
    """
    cut_sql, cut = ("h.seq <= ?", seq) if seq is not None else ("h.recorded_at <= ?", recorded_at)
    sql = (
        "SELECT r.run_id, h.state, h.seq FROM runs r JOIN history h ON h.kind = 'run' AND h.entity_id = r.run_id "
        f"WHERE r.sweep_id = ? AND {cut_sql} AND h.seq = (SELECT max(h2.seq) FROM history h2 "
        f"WHERE h2.kind = 'run' AND h2.entity_id = r.run_id AND {cut_sql.replace('h.', 'h2.')})"
    )
    async with db.execute(sql, (sweep_id, cut, cut)) as cur:
        rows = await cur.fetchall()
    counts: dict[str, int] = dict.fromkeys(RUN_STATES, 0)
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    queue = [run_id for run_id, state, last in sorted(rows, key=lambda r: (r[2], r[0])) if state == "preempted"]
    return counts, queue


def sweep_view(sweep: Sweep, counts: dict[str, int], queue: list[str]) -> SweepView:
    """The contract's Sweep from the sweep's own state and its runs."""
    return SweepView(sweep_id=sweep.sweep_id, state=sweep.state, created_at=sweep.created_at,
                     updated_at=sweep.updated_at, runs=counts, queue=queue)
