"""The write side of the views: one batch of stream messages applied to SQLite
in one transaction together with the checkpoint.

A crash at any point leaves either the whole batch and its checkpoint, or
neither: nothing is lost and nothing is applied twice. ``write_batch`` is
the one way a folded batch and its checkpoint reach SQLite: the projector
(``commit_batch``, in aiosqlite's thread), ``apply_batch`` and the rebuild
(``projections.audit.rebuild``, on its own connection) all write through it.

Errors are told apart by SQLite's result code (``sqlite_code``), never by
their message: SQLITE_BUSY/LOCKED is another writer (wait and try again),
SQLITE_FULL/IOERR a disk that cannot take the write (back off), anything
else a failure no retry mends.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import aiosqlite
import anyio

from ledger.core.events import decode_event
from ledger.core.fold import Recorded, Views
from ledger.errors import InvalidEvent
from ledger.nats.stream import StreamMessage, recorded_at_of
from projections.views.lookups import BatchKeys, read_views
from projections.views.schema import (
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
    json_param,
    run_row,
    sweep_row,
)

INSERT_QUARANTINE: Final = (
    "INSERT OR REPLACE INTO quarantine (seq, subject, reason, raw, recorded_at) VALUES (?, ?, ?, ?, ?)")
SET_CHECKPOINT: Final = "UPDATE checkpoint SET last_seq = ? WHERE id = 1"

V = TypeVar("V")
STOP_WAIT_S: Final = 10.0
"""Longest wait, once a commit's caller is cancelled, for its write (waiting for a lock); then it is interrupted."""


def sqlite_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of an sqlite3/aiosqlite error (SQLITE_BUSY, SQLITE_FULL, ...), None for others.

    Errors are told apart by this code, never by their message.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the lock (SQLITE_BUSY or SQLITE_LOCKED)."""
    return sqlite_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


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
            if not is_busy(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05)  # another connection is creating the same file


async def read_checkpoint(db: aiosqlite.Connection) -> int:
    """The last stream sequence applied to the views (0 for none)."""
    rows = list(await db.execute_fetchall("SELECT last_seq FROM checkpoint WHERE id = 1"))
    return int(rows[0][0]) if rows else 0


class Write(NamedTuple):
    """One statement of a batch's writes: ``executemany`` over rows when ``many``, else one ``execute``."""

    sql: str
    params: Any
    many: bool = False


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
    """A folded batch: what its commit writes, and what each of its events did."""

    writes: list[Write]
    outcomes: Counter[str]


def fold(views: Views, good: list[Recorded], bad: list[tuple], last_seq: int) -> Folded:
    """Fold decoded events onto ``views`` (which holds every row and seen id they touch)."""
    outcomes: Counter[str] = Counter()
    outcomes["quarantined"] = len(bad)
    for rec in good:
        outcomes[views.apply(rec)] += 1
    return Folded(batch_writes(views, bad, last_seq), outcomes)


def write_batch(con: sqlite3.Connection, writes: list[Write], expected: int,
                abandoned: threading.Event | None = None) -> None:
    """THE way a folded batch and its checkpoint reach SQLite: the projector's commits, ``apply_batch``
    and the rebuild all come here (the projector and ``apply_batch`` through ``commit_batch``).

    Writes everything in one transaction if the checkpoint is still
    ``expected``, else raises CheckpointMoved writing nothing (another writer
    moved it). Any failure leaves nothing of the batch. Two encodings of the
    same writes: usually ONE statement (``WRITE_BATCH`` through the
    connection's TEMP trigger view, atomic on its own); BEGIN IMMEDIATE ...
    COMMIT, statement by statement, when some rows must be bound one by one
    (quarantined bytes, a history reason holding a NUL).

    Synchronous and whole: run in the connection's own thread (``commit_batch``)
    it is one call, so a cancelled caller cannot stop it half way. Once
    ``abandoned`` is set (and the connection interrupted) it writes nothing
    more: SQLite's busy wait for a lock cannot be interrupted, so the flag is
    checked again once the lock is taken.
    """
    if abandoned is not None and abandoned.is_set():
        raise Abandoned
    single = one_statement(writes, expected)
    if single is not None:
        try:
            con.execute(single.sql, single.params)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_TRIGGER:  # the one RAISE: checkpoint moved
                raise CheckpointMoved(expected, _checkpoint_of(con)) from None
            raise
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        found = _checkpoint_of(con)
        if found != expected:
            raise CheckpointMoved(expected, found)
        for write in writes:
            if write.many:
                con.executemany(write.sql, write.params)
            else:
                con.execute(write.sql, write.params)
        if abandoned is not None and abandoned.is_set():
            raise Abandoned
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:  # SQLite rolled back by itself on some errors (a full disk, an interrupt)
            con.execute("ROLLBACK")
        raise


class Abandoned(Exception):
    """A write whose caller gave up on it (``commit_batch`` cancelled): rolled back, nothing written."""


def _checkpoint_of(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT last_seq FROM checkpoint WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def _nothing() -> None:
    return None


async def commit_batch(db: aiosqlite.Connection, folded: Folded, expected: int, *,
                       stop_wait: float = STOP_WAIT_S) -> None:
    """``write_batch`` in the connection's thread: the folded batch with its checkpoint, whole or not at all.

    A caller cancelled meanwhile does not stop the write: it waits (at most
    ``stop_wait`` seconds, e.g. for a lock another connection holds) until it
    landed or failed, then abandons it (it rolls back whole: nothing of it
    lands, even when the lock comes later) and waits for that a while more.
    """
    abandoned = threading.Event()
    try:
        # One call in aiosqlite's thread (its only way to run a function there): no GIL hop between statements.
        await db._execute(write_batch, db._conn, folded.writes, expected, abandoned)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(stop_wait) as waited:
                await db._execute(_nothing)  # queued behind the write: returns once it is over
            if waited.cancelled_caught:
                abandoned.set()
                await db.interrupt()  # a statement running stops and rolls back; one waiting for a lock sees the flag
                with anyio.move_on_after(stop_wait):
                    await db._execute(_nothing)
        raise


async def apply_batch(db: aiosqlite.Connection, msgs: list[StreamMessage],
                      decoded: Decoded | None = None) -> Counter[str]:
    """Fold a batch into the views and move the checkpoint, in one transaction, reading all it needs from ``db``.

    Messages at or below the checkpoint are skipped (a re-delivery after a
    reconnect). Returns how many messages had each outcome. ``decoded`` is
    ``decode_batch(msgs)`` when the caller decoded them already. Another
    writer moving the checkpoint meanwhile makes it read and fold again.
    """
    if not msgs:
        return Counter()
    good, bad = decoded or decode_batch(msgs)
    while True:
        checkpoint = await read_checkpoint(db)
        if checkpoint >= msgs[-1].seq:  # applied already
            return Counter()
        fresh = [m for m in msgs if m.seq > checkpoint]
        todo = [rec for rec in good if rec.seq > checkpoint]
        folded = fold(await read_views(db, BatchKeys.of(todo)), todo, [row for row in bad if row[0] > checkpoint],
                      fresh[-1].seq)
        try:
            await commit_batch(db, folded, checkpoint)
        except CheckpointMoved:
            continue
        return folded.outcomes
