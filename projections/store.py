"""The write side of the views: one batch of stream messages applied to SQLite
in one transaction together with the checkpoint.

A crash at any point leaves either the whole batch and its checkpoint, or
neither: nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Final

import aiosqlite

from ledger.errors import InvalidEvent
from ledger.events import RunEvent, decode_event
from ledger.fold import Recorded, Views
from ledger.stream import StreamMessage
from projections.schema import (
    INSERT_ENTRY, SCHEMA, UPSERT_RUN, UPSERT_SWEEP, entry_row, iso, run_from_row, run_row,
    sweep_from_row, sweep_row,
)

CHUNK: Final = 900
"""Ids per ``IN (...)`` query, under SQLite's bound-parameter limit."""


async def open_db(path: Path | str, *, readonly: bool = False) -> aiosqlite.Connection:
    """Open the views database in WAL mode, creating the schema when writable."""
    if readonly:
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
    await db.execute("PRAGMA busy_timeout=5000")
    return db


async def read_checkpoint(db: aiosqlite.Connection) -> int:
    """The last stream sequence applied to the views (0 for none)."""
    async with db.execute("SELECT last_seq FROM checkpoint WHERE id = 1") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _select_in(db: aiosqlite.Connection, sql: str, keys: list[str]) -> list[tuple]:
    rows: list[tuple] = []
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i:i + CHUNK]
        async with db.execute(sql.format(", ".join("?" * len(chunk))), chunk) as cur:
            rows.extend(await cur.fetchall())
    return rows


def decode_batch(msgs: list[StreamMessage]) -> tuple[list[Recorded], list[tuple]]:
    """Split a batch into decoded events and quarantine rows (seq, subject, reason, raw, time)."""
    good: list[Recorded] = []
    bad: list[tuple] = []
    for msg in msgs:
        try:
            good.append(Recorded(msg.seq, msg.recorded_at, decode_event(msg.subject, msg.data)))
        except InvalidEvent as exc:
            bad.append((msg.seq, msg.subject, exc.reason[:500], bytes(msg.data), iso(msg.recorded_at)))
    return good, bad


async def apply_batch(db: aiosqlite.Connection, msgs: list[StreamMessage]) -> Counter[str]:
    """Fold a batch into the views and move the checkpoint, in one transaction.

    Messages at or below the checkpoint are skipped (a re-delivery after a
    reconnect). Returns how many messages had each outcome.
    """
    outcomes: Counter[str] = Counter()
    await db.execute("BEGIN IMMEDIATE")
    try:
        checkpoint = await read_checkpoint(db)
        msgs = [m for m in msgs if m.seq > checkpoint]
        if not msgs:
            await db.execute("ROLLBACK")
            return outcomes
        good, bad = decode_batch(msgs)
        outcomes["quarantined"] = len(bad)
        ids = list({rec.event.id for rec in good})
        seen = {row[0] for row in await _select_in(db, "SELECT event_id FROM seen WHERE event_id IN ({})", ids)}
        run_ids = list({rec.event.run_id for rec in good if isinstance(rec.event, RunEvent)})
        sweep_ids = list({rec.event.sweep_id for rec in good if not isinstance(rec.event, RunEvent)})  # type: ignore[union-attr]
        runs = {r.run_id: r for r in map(run_from_row, await _select_in(db, "SELECT * FROM runs WHERE run_id IN ({})", run_ids))}
        sweeps = {s.sweep_id: s for s in map(sweep_from_row, await _select_in(db, "SELECT * FROM sweeps WHERE sweep_id IN ({})", sweep_ids))}
        views = Views(runs, sweeps, seen)
        for rec in good:
            outcomes[views.apply(rec)] += 1
        await db.executemany(UPSERT_RUN, [run_row(views.runs[k]) for k in views.dirty_runs])
        await db.executemany(UPSERT_SWEEP, [sweep_row(views.sweeps[k]) for k in views.dirty_sweeps])
        await db.executemany(INSERT_ENTRY, [entry_row(kind, key, e) for kind, key, e in views.history])
        await db.executemany("INSERT OR IGNORE INTO seen (event_id, seq) VALUES (?, ?)", views.new_ids)
        await db.executemany(
            "INSERT OR REPLACE INTO quarantine (seq, subject, reason, raw, recorded_at) VALUES (?, ?, ?, ?, ?)", bad)
        await db.execute("UPDATE checkpoint SET last_seq = ? WHERE id = 1", (msgs[-1].seq,))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    return outcomes
