"""The write side of the views: one batch of stream messages applied to SQLite
in one transaction together with the checkpoint.

A crash at any point leaves either the whole batch and its checkpoint, or
neither: nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import aiosqlite
import msgspec

from ledger.errors import InvalidEvent
from ledger.events import RunEvent, decode_event
from ledger.fold import Recorded, Views
from ledger.machine import Run, Sweep
from ledger.stream import StreamMessage, recorded_at_of
from projections.schema import (
    BATCH_WRITER,
    INSERT_ENTRIES,
    INSERT_ENTRY,
    INSERT_SEEN,
    SCHEMA,
    UPSERT_RUNS,
    UPSERT_SWEEPS,
    WRITE_BATCH,
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

V = TypeVar("V")


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
            await db.executescript(BATCH_WRITER)
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


Decoded: TypeAlias = tuple[list[Recorded], list[tuple]]
"""A batch decoded: its events, and quarantine rows (seq, subject, reason, raw, time)."""


def decode_batch(msgs: list[StreamMessage]) -> Decoded:
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

    Rows go in as one JSON parameter per table, except quarantined
    messages (raw bytes) and history holding a NUL, bound row by row.
    """
    writes = [
        Write(UPSERT_RUNS, json_param(run_row(views.runs[k]) for k in views.dirty_runs)),
        Write(UPSERT_SWEEPS, json_param(sweep_row(views.sweeps[k]) for k in views.dirty_sweeps)),
        _history(views),
        Write(INSERT_SEEN, json_param(views.new_ids)),
        Write(INSERT_QUARANTINE, bad, True),
    ]
    kept = [w for w in writes if (w.params if w.many else w.params[0] != "[]")]
    return [*kept, Write(SET_CHECKPOINT, (last_seq,))]


def one_statement(writes: list[Write], expected: int) -> Write | None:
    """The same writes as one ``WRITE_BATCH`` statement, checked against the ``expected`` checkpoint;
    None when some rows must be bound row by row."""
    if any(w.many for w in writes):
        return None
    first = {w.sql: w.params[0] for w in writes}
    return Write(WRITE_BATCH, (expected, first[SET_CHECKPOINT], first.get(UPSERT_RUNS), first.get(UPSERT_SWEEPS),
                               first.get(INSERT_ENTRIES), first.get(INSERT_SEEN)))


class CheckpointMoved(Exception):
    """The views' checkpoint is not where this writer left it: another writer moved it."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"checkpoint is {found}, expected {expected}: another projector writes these views")
        self.found = found


def _history(views: Views) -> Write:
    """The history rows as one JSON parameter, or bound row by row when a reason holds a NUL
    (SQLite's JSON functions end text there; a bound parameter keeps it)."""
    rows = [entry_row(kind, key, e) for kind, key, e in views.history]
    if any(e.reason is not None and "\x00" in e.reason for _, _, e in views.history):
        return Write(INSERT_ENTRY, rows, True)
    return Write(INSERT_ENTRIES, json_param(rows))


class Folded(NamedTuple):
    """A folded batch: its views (the state after it), what its commit writes, what each event did."""

    views: Views
    writes: list[Write]
    outcomes: Counter[str]


def fold(views: Views, good: list[Recorded], bad: list[tuple], last_seq: int) -> Folded:
    """Fold decoded events onto ``views`` (which holds every row and seen id they touch)."""
    outcomes: Counter[str] = Counter()
    outcomes["quarantined"] = len(bad)
    for rec in good:
        outcomes[views.apply(rec)] += 1
    return Folded(views, batch_writes(views, bad, last_seq), outcomes)


class _Lru(OrderedDict[str, V]):
    """Runs or sweeps by id, least recently used first; a plain dict to ``Views``."""

    def touch(self, keys: Iterable[str]) -> set[str]:
        """Mark ``keys`` used now; return those not held."""
        missing = set()
        for key in keys:
            if key in self:
                self.move_to_end(key)
            else:
                missing.add(key)
        return missing

    def trim(self, size: int) -> None:
        while len(self) > size:
            self.popitem(last=False)


class ViewCache:
    """The runs and sweeps recent batches touched, as folded, kept between batches by their only writer.

    What it holds is the latest state even while the batch that made it is
    still committing; what it does not hold was last changed by a committed
    batch, so any connection reads it right. The last batch's event ids are
    kept as well (its commit may not have landed): older ids are read from
    the ``seen`` table. The least recently used entries go beyond ``size``,
    which is at least two batches' worth, so nothing a committing batch
    touched is dropped. A cache is only right while its owner is the
    views' only writer: drop it when the checkpoint moves under it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: _Lru[Run] = _Lru()
        self.sweeps: _Lru[Sweep] = _Lru()
        self.last_seen: set[str] = set()

    def missing(self, keys: BatchKeys) -> BatchKeys:
        """The part of ``keys`` to read from the database."""
        return BatchKeys(keys.event_ids - self.last_seen, self.runs.touch(keys.run_ids),
                         self.sweeps.touch(keys.sweep_ids))

    def views(self, keys: BatchKeys, rows: dict[str, Iterable[Any]]) -> Views:
        """The batch's views: the rows read for what was ``missing``, over what the cache holds."""
        found = views_from_rows(rows)
        self.runs.update(found.runs)
        self.sweeps.update(found.sweeps)
        return Views(self.runs, self.sweeps, found.seen | (keys.event_ids & self.last_seen))  # type: ignore[arg-type]

    def folded(self, views: Views) -> None:
        """Keep the event ids of the batch just folded; trim to size."""
        self.last_seen = views.seen
        self.runs.trim(self.size)
        self.sweeps.trim(self.size)


async def read_views(db: aiosqlite.Connection, keys: BatchKeys, cache: ViewCache | None = None) -> Views:
    """The views a batch folds onto: what ``cache`` holds, the rest read from ``db``."""
    cache = cache or ViewCache(0)
    rows = {sql: await db.execute_fetchall(sql, params) for sql, params in cache.missing(keys).lookups()}
    return cache.views(keys, rows)


async def _rollback(db: aiosqlite.Connection) -> None:
    """Roll back, unless SQLite already did (it does by itself on some errors, e.g. a full disk)."""
    if db.in_transaction:
        await db.execute("ROLLBACK")


async def _write(db: aiosqlite.Connection, writes: list[Write]) -> None:
    for write in writes:
        if write.many:
            await db.executemany(write.sql, write.params)
        else:
            await db.execute(write.sql, write.params)
    await db.execute("COMMIT")


async def commit_batch(db: aiosqlite.Connection, folded: Folded, expected: int) -> None:
    """Write a folded batch with its checkpoint in one transaction, if the checkpoint is still ``expected``.

    Raises CheckpointMoved (writing nothing) when another writer moved it.
    Any failure rolls the whole batch back: nothing of it stays. Usually one
    statement (``WRITE_BATCH``); a transaction of several when rows must be
    bound one by one.
    """
    single = one_statement(folded.writes, expected)
    if single is not None:
        try:
            await db.execute(single.sql, single.params)
        except aiosqlite.IntegrityError as exc:
            if "checkpoint moved" in str(exc):
                raise CheckpointMoved(expected, await read_checkpoint(db)) from None
            raise
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        found = await read_checkpoint(db)
        if found != expected:
            raise CheckpointMoved(expected, found)
        await _write(db, folded.writes)
    except BaseException:
        await _rollback(db)
        raise


async def apply_batch(db: aiosqlite.Connection, msgs: list[StreamMessage],
                      decoded: Decoded | None = None) -> Counter[str]:
    """Fold a batch into the views and move the checkpoint, in one transaction, reading all it needs from ``db``.

    Messages at or below the checkpoint are skipped (a re-delivery after a
    reconnect). Returns how many messages had each outcome. ``decoded`` is
    ``decode_batch(msgs)`` when the caller decoded them already.
    """
    if not msgs:
        return Counter()
    good, bad = decoded or decode_batch(msgs)
    await db.execute("BEGIN IMMEDIATE")
    try:
        checkpoint = await read_checkpoint(db)
        if checkpoint >= msgs[0].seq:  # part of the batch was applied already
            msgs = [m for m in msgs if m.seq > checkpoint]
            if not msgs:
                await db.execute("ROLLBACK")
                return Counter()
            good = [rec for rec in good if rec.seq > checkpoint]
            bad = [row for row in bad if row[0] > checkpoint]
        folded = fold(await read_views(db, BatchKeys.of(good)), good, bad, msgs[-1].seq)
        await _write(db, folded.writes)
    except BaseException:
        await _rollback(db)
        raise
    return folded.outcomes
