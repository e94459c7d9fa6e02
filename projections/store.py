"""The write side of the views: one batch of stream messages applied to SQLite
in one transaction together with the checkpoint.

A crash at any point leaves either the whole batch and its checkpoint, or
neither: nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple

import aiosqlite
import msgspec

from ledger.errors import InvalidEvent
from ledger.events import RunEvent, decode_event
from ledger.fold import Recorded, Views
from ledger.stream import StreamMessage, recorded_at_of
from projections.schema import (
    INSERT_ENTRIES,
    UPSERT_RUNS,
    INSERT_SEEN,
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
    rows = list(await db.execute_fetchall("SELECT last_seq FROM checkpoint WHERE id = 1"))
    return int(rows[0][0]) if rows else 0


_json: Final = msgspec.json.Encoder()

SELECT_SEEN: Final = "SELECT s.event_id FROM json_each(?) AS j CROSS JOIN seen AS s ON s.event_id = j.value"
SELECT_RUNS: Final = "SELECT runs.* FROM json_each(?) AS j CROSS JOIN runs ON runs.run_id = j.value"
SELECT_SWEEPS: Final = "SELECT sweeps.* FROM json_each(?) AS j CROSS JOIN sweeps ON sweeps.sweep_id = j.value"
"""Rows of a batch's keys in one statement each: the keys go in as one JSON array (no parameter limit)."""


def json_param(values: Iterable[Any]) -> tuple[str]:
    """A list (of keys, or of rows as tuples) as the one JSON text parameter of a ``json_each`` statement."""
    return (_json.encode(list(values)).decode(),)


class Write(NamedTuple):
    """One statement of a batch's writes: ``executemany`` over rows when ``many``, else one ``execute``."""

    sql: str
    params: Any
    many: bool = False


class BatchKeys(NamedTuple):
    """The event ids, runs and sweeps a batch touches: what must be read before folding it."""

    event_ids: set[str]
    run_ids: set[str]
    sweep_ids: set[str]

    @classmethod
    def of(cls, good: list[Recorded]) -> BatchKeys:
        keys = cls(set(), set(), set())
        for rec in good:
            event = rec.event
            keys.event_ids.add(event.id)
            if isinstance(event, RunEvent):
                keys.run_ids.add(event.run_id)
            else:
                keys.sweep_ids.add(event.sweep_id)  # type: ignore[union-attr]
        return keys

    def lookups(self) -> list[tuple[str, tuple[str]]]:
        """(statement, parameters) for the seen ids, runs and sweeps; none for an empty key set."""
        return [(sql, json_param(keys)) for sql, keys in
                ((SELECT_SEEN, self.event_ids), (SELECT_RUNS, self.run_ids), (SELECT_SWEEPS, self.sweep_ids))
                if keys]


def views_from_rows(rows: dict[str, Iterable[Any]]) -> Views:
    """A ``Views`` over the rows ``BatchKeys.lookups`` read (keyed by statement)."""
    return Views(
        {r.run_id: r for r in map(run_from_row, rows.get(SELECT_RUNS, ()))},
        {s.sweep_id: s for s in map(sweep_from_row, rows.get(SELECT_SWEEPS, ()))},
        {row[0] for row in rows.get(SELECT_SEEN, ())},
    )


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


def batch_writes(views: Views, bad: list[tuple], last_seq: int) -> list[Write]:
    """The statements that persist a folded batch: rows changed, history, seen ids, quarantine, checkpoint.

    Runs and sweeps (which hold floats) are bound row by row; history and
    seen ids, most of the rows, go in as one JSON parameter each.
    """
    writes = [
        Write(UPSERT_RUNS, json_param(run_row(views.runs[k]) for k in views.dirty_runs)),
        Write(UPSERT_SWEEP, [sweep_row(views.sweeps[k]) for k in views.dirty_sweeps], True),
        Write(INSERT_ENTRIES, json_param(entry_row(kind, key, e) for kind, key, e in views.history)),
        Write(INSERT_SEEN, json_param(views.new_ids)),
        Write(INSERT_QUARANTINE, bad, True),
    ]
    kept = [w for w in writes if (w.params if w.many else w.params[0] != "[]")]
    return [*kept, Write(SET_CHECKPOINT, (last_seq,))]


class Folded(NamedTuple):
    """A batch folded inside an open write transaction: what its commit writes and what it did."""

    writes: list[Write]
    outcomes: Counter[str]
    last_seq: int


async def fold_batch(db: aiosqlite.Connection, msgs: list[StreamMessage],
                     decoded: tuple[list[Recorded], list[tuple]] | None = None) -> Folded | None:
    """Open the batch's write transaction, read what it touches and fold it; ``commit_batch`` ends it.

    Messages at or below the checkpoint are skipped (a re-delivery after a
    reconnect); None, with no transaction left open, when nothing is left.
    ``decoded`` is ``decode_batch(msgs)`` when the caller decoded them already.
    Each ``await`` is a round trip to aiosqlite's thread, so there are few:
    one statement per lookup, the keys going in as one JSON array.
    """
    if not msgs:
        return None
    good, bad = decoded or decode_batch(msgs)
    await db.execute("BEGIN IMMEDIATE")
    try:
        checkpoint = await read_checkpoint(db)
        if checkpoint >= msgs[0].seq:  # part of the batch was applied already
            msgs = [m for m in msgs if m.seq > checkpoint]
            if not msgs:
                await db.execute("ROLLBACK")
                return None
            good = [rec for rec in good if rec.seq > checkpoint]
            bad = [row for row in bad if row[0] > checkpoint]
        outcomes: Counter[str] = Counter()
        outcomes["quarantined"] = len(bad)
        rows = {sql: await db.execute_fetchall(sql, params) for sql, params in BatchKeys.of(good).lookups()}
        views = views_from_rows(rows)
        for rec in good:
            outcomes[views.apply(rec)] += 1
        return Folded(batch_writes(views, bad, msgs[-1].seq), outcomes, msgs[-1].seq)
    except BaseException:
        await _rollback(db)
        raise


async def _rollback(db: aiosqlite.Connection) -> None:
    """Roll back, unless SQLite already did (it does by itself on some errors, e.g. a full disk)."""
    if db.in_transaction:
        await db.execute("ROLLBACK")



async def commit_batch(db: aiosqlite.Connection, folded: Folded) -> None:
    """Write a folded batch with its checkpoint and commit the transaction ``fold_batch`` opened.

    Any failure rolls the whole batch back: nothing of it stays.
    """
    try:
        for write in folded.writes:
            if write.many:
                await db.executemany(write.sql, write.params)
            else:
                await db.execute(write.sql, write.params)
        await db.execute("COMMIT")
    except BaseException:
        await _rollback(db)
        raise


async def apply_batch(db: aiosqlite.Connection, msgs: list[StreamMessage]) -> Counter[str]:
    """Fold a batch into the views and move the checkpoint, in one transaction.

    Returns how many messages had each outcome (nothing for messages the
    checkpoint already covers).
    """
    folded = await fold_batch(db, msgs)
    if folded is None:
        return Counter()
    await commit_batch(db, folded)
    return folded.outcomes
