"""The write side of the views: one batch of stream messages applied to SQLite
in one transaction together with the checkpoint.

A crash at any point leaves either the whole batch and its checkpoint, or
neither: nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Final

import aiosqlite

from ledger.errors import InvalidEvent
from ledger.events import RunEvent, decode_event
from ledger.fold import Recorded, Views
from ledger.stream import StreamMessage, recorded_at_of
from projections.schema import (
    INSERT_ENTRY,
    SCHEMA,
    UPSERT_RUN,
    UPSERT_SWEEP,
    entry_row,
    iso,
    run_from_row,
    run_row,
    sweep_from_row,
    sweep_row,
)

CHUNK: Final = 900
"""Ids per ``IN (...)`` query, under SQLite's bound-parameter limit."""
INSERT_SEEN: Final = "INSERT OR IGNORE INTO seen (event_id, seq) VALUES (?, ?)"
INSERT_QUARANTINE: Final = (
    "INSERT OR REPLACE INTO quarantine (seq, subject, reason, raw, recorded_at) VALUES (?, ?, ?, ?, ?)")
SET_CHECKPOINT: Final = "UPDATE checkpoint SET last_seq = ? WHERE id = 1"


def file_identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names, through a symlink; None when there is none.

    ``ledger replay`` swaps in a new views database by replacing the
    ``views.db`` symlink; readers and the projector compare this before each
    batch or request and reopen when it changed.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def open_db(path: Path | str, *, readonly: bool = False) -> aiosqlite.Connection:
    """Open the views database in WAL mode, creating the schema when writable.

    A failure or a cancellation after connecting closes the connection: a
    leaked aiosqlite connection keeps a non-daemon thread alive, and the
    process then never exits.
    """
    if readonly:
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=5000")
        if not readonly:
            await _set_wal(db)
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.executescript(SCHEMA)
    except BaseException:
        await asyncio.shield(db.close())
        raise
    return db


async def _set_wal(db: aiosqlite.Connection, attempts: int = 100) -> None:
    """WAL mode; switching a new file takes a lock the busy handler does not wait for, so retry."""
    for attempt in range(attempts):
        try:
            async with db.execute("PRAGMA journal_mode=WAL") as cur:
                await cur.fetchall()
            return
        except aiosqlite.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05)  # another connection is creating the same file


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
            good.append(Recorded(msg.seq, recorded_at_of(msg), decode_event(msg.subject, msg.data)))
        except InvalidEvent as exc:
            bad.append((msg.seq, msg.subject, exc.reason[:500], bytes(msg.data), iso(recorded_at_of(msg))))
    return good, bad


def batch_writes(views: Views, bad: list[tuple], last_seq: int) -> list[tuple[str, list[tuple]]]:
    """The statements that persist a folded batch: rows changed, history, seen ids, quarantine, checkpoint."""
    return [
        (UPSERT_RUN, [run_row(views.runs[k]) for k in views.dirty_runs]),
        (UPSERT_SWEEP, [sweep_row(views.sweeps[k]) for k in views.dirty_sweeps]),
        (INSERT_ENTRY, [entry_row(kind, key, e) for kind, key, e in views.history]),
        (INSERT_SEEN, views.new_ids),
        (INSERT_QUARANTINE, bad),
        (SET_CHECKPOINT, [(last_seq,)]),
    ]


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
        for sql, rows in batch_writes(views, bad, msgs[-1].seq):
            await db.executemany(sql, rows)
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    return outcomes
