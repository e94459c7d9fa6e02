"""The durable local spool of job-side publishers, and the outbox that drains it.

Every event a job publishes is first written to an SQLite file, then sent to
JetStream in order and removed once acknowledged. NATS down at start or lost
mid-run costs nothing but delay: the job never waits for it, and nothing is
lost or doubled (the event id is the ``Nats-Msg-Id``; the projector drops
ids it has seen). A spool left by a dead process is sent by ``ledger sync``.

Transient and permanent failures are told apart. An event is checked when it
is put (size and validity: ``check_spoolable``), so one the ledger would only
quarantine never enters the spool. A row the server refuses for good anyway
(``EventRefused``: too large for the stream or the server) is set aside: it
stays in the spool with the reason, visible and counted (``ledger sync``
reports it), and never blocks the rows behind it. Everything else (NATS
away, no ack in time) is retried, in order.

Each row remembers the NATS url it was meant for: ``ledger sync`` to another
ledger refuses it (unless told otherwise), so a job's events never land
silently in a ledger it did not run against.

The outbox's send loop is supervised: a failing round (the spool's disk
full or gone read-only) is reported and the loop goes on after a pause; the
events it could not spool stay queued in memory and are tried again.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiosqlite
import msgspec

from ledger.core.events import decode_event
from ledger.errors import EventRefused, LedgerError

if TYPE_CHECKING:
    from ledger.nats.connection import Connection

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    msg_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_by_owner ON spool (owner, id);
"""
COLUMNS: Final = {
    "url": "ALTER TABLE spool ADD COLUMN url TEXT NOT NULL DEFAULT ''",
    "refused": "ALTER TABLE spool ADD COLUMN refused TEXT",
}
"""Columns a spool file written by an older version lacks: the NATS url a row was meant for ('' when
unknown), and why the server refused it for good (NULL while it may still be sent)."""
HOST: Final = socket.gethostname()


def default_spool_path() -> Path:
    """``$LEDGER_SPOOL``, else ``$XDG_STATE_HOME/run-ledger/spool.db`` (``~/.local/state/...``)."""
    if env := os.environ.get("LEDGER_SPOOL"):
        return Path(env)
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "run-ledger" / "spool.db"


def owner_of(pid: int) -> str:
    return f"{HOST}:{pid}"


def owner_alive(owner: str) -> bool:
    """Whether the process that owns spool rows still runs (rows of other hosts count as alive)."""
    host, _, pid = owner.rpartition(":")
    if host != HOST or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(exc: aiosqlite.Error) -> bool:
    """Another connection holds the lock (SQLite's SQLITE_BUSY or SQLITE_LOCKED), told by its code, not its message."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def check_spoolable(subject: str, payload: bytes) -> None:
    """InvalidEvent (one line) for an event the ledger would only quarantine: too large, invalid."""
    decode_event(subject, payload)


class SpoolRow:
    __slots__ = ("id", "subject", "payload", "msg_id", "url")

    def __init__(self, id: int, subject: str, payload: bytes, msg_id: str, url: str = "") -> None:
        self.id, self.subject, self.payload, self.msg_id, self.url = id, subject, payload, msg_id, url


class RefusedRow(msgspec.Struct, frozen=True):
    """A spooled event the server refused for good, kept aside."""

    id: int
    owner: str
    subject: str
    msg_id: str
    size: int
    reason: str


class Spool:
    """An SQLite file of messages not yet acknowledged by JetStream, in order."""

    def __init__(self, path: Path | str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_spool_path()
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> Spool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._retry_locked("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            await self._retry_locked(SCHEMA, script=True)
            await self._add_columns()
        except (OSError, aiosqlite.Error) as exc:
            raise LedgerError(f"cannot open the spool {self.path}: {exc}") from exc
        return self

    async def _retry_locked(self, sql: str, *, script: bool = False, attempts: int = 200) -> None:
        """Run set-up SQL, retrying while another process creates the same spool file.

        Switching a new file to WAL takes a lock SQLite's busy handler does not wait for.
        """
        for attempt in range(attempts):
            try:
                if script:
                    await self.db.executescript(sql)
                else:
                    await (await self.db.execute(sql)).close()
                return
            except aiosqlite.OperationalError as exc:
                if not _locked(exc) or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.025)

    async def _add_columns(self) -> None:
        async with self.db.execute("PRAGMA table_info(spool)") as cur:
            have = {r[1] for r in await cur.fetchall()}
        for name, sql in COLUMNS.items():
            if name not in have:
                try:
                    await self._retry_locked(sql)
                except aiosqlite.OperationalError:
                    async with self.db.execute("PRAGMA table_info(spool)") as cur:
                        if name not in {r[1] for r in await cur.fetchall()}:
                            raise
                    # another process added it first

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "Spool.open() first"
        return self._db

    async def add(self, owner: str, rows: Sequence[tuple[str, bytes, str]], *, url: str = "") -> None:
        """Append (subject, payload, msg_id) rows meant for ``url`` durably, in order, in one transaction."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany("INSERT INTO spool (owner, subject, payload, msg_id, url) VALUES (?, ?, ?, ?, ?)",
                                      [(owner, *row, url) for row in rows])
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def pending(self, owners: Sequence[str], limit: int = 5000, *, after: int = 0,
                      urls: Sequence[str] | None = None) -> list[SpoolRow]:
        """The oldest unsent rows of these owners (after row ``after``, meant for one of ``urls``: default
        any), in spool order; set-aside rows excluded."""
        marks = ", ".join("?" * len(owners))
        where, args = f"owner IN ({marks}) AND refused IS NULL AND id > ?", [*owners, after]
        if urls is not None:
            where += f" AND url IN ({', '.join('?' * len(urls))})"
            args += urls
        async with self.db.execute(f"SELECT id, subject, payload, msg_id, url FROM spool WHERE {where} "
                                   "ORDER BY id LIMIT ?", (*args, limit)) as cur:
            return [SpoolRow(*r) for r in await cur.fetchall()]

    async def set_aside(self, row_id: int, reason: str) -> None:
        """Keep a row the server refused for good, with the reason; it is never sent again."""
        await (await self.db.execute("UPDATE spool SET refused = ? WHERE id = ?", (reason[:500], row_id))).close()

    async def refused(self, owners: Sequence[str] | None = None) -> list[RefusedRow]:
        """The rows set aside (of these owners, default all), oldest first."""
        where = "refused IS NOT NULL"
        args: tuple[str, ...] = ()
        if owners is not None:
            where += f" AND owner IN ({', '.join('?' * len(owners))})"
            args = tuple(owners)
        async with self.db.execute(f"SELECT id, owner, subject, msg_id, length(payload), refused FROM spool "
                                   f"WHERE {where} ORDER BY id", args) as cur:
            return [RefusedRow(*r) for r in await cur.fetchall()]

    async def urls(self, owners: Sequence[str]) -> dict[str, int]:
        """How many sendable rows of these owners were meant for each NATS url ('' : unknown)."""
        marks = ", ".join("?" * len(owners))
        async with self.db.execute(f"SELECT url, count(*) FROM spool WHERE owner IN ({marks}) AND refused IS NULL "
                                   "GROUP BY url", tuple(owners)) as cur:
            return {r[0]: int(r[1]) for r in await cur.fetchall()}

    async def remove(self, ids: Sequence[int]) -> None:
        """Drop acknowledged rows, in one transaction (one sync, however many rows)."""
        if not ids:
            return
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def owners(self) -> list[str]:
        """The owners with rows still to send."""
        async with self.db.execute("SELECT DISTINCT owner FROM spool WHERE refused IS NULL") as cur:
            return [r[0] for r in await cur.fetchall()]

    async def count(self, owners: Sequence[str] | None = None) -> int:
        """Rows still to send (of these owners, default all); set-aside rows are not counted."""
        args: tuple[str, ...] = ()
        if owners is None:
            sql = "SELECT count(*) FROM spool WHERE refused IS NULL"
        else:
            sql, args = (f"SELECT count(*) FROM spool WHERE refused IS NULL AND owner IN "
                         f"({', '.join('?' * len(owners))})", tuple(owners))
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()


LINGER_S: Final = 0.005
"""How long a busy outbox waits to gather more events into one round."""
BUSY_S: Final = 0.05
LINGER_UNTIL: Final = 256
"""Queued events that make a round go at once, lingering or not."""


RETRY_MAX_S: Final = 5.0
"""The longest pause between two rounds that failed (NATS away, the spool unwritable)."""

Report = Callable[[str], None]


def report_to_stderr(line: str) -> None:
    print(f"ledger: {line}", file=sys.stderr, flush=True)


class Outbox:
    """Writes events to the spool at once, then sends them in order when NATS is there.

    ``put`` never blocks; it raises InvalidEvent for an event the ledger would
    only quarantine, and its future resolves once the event is durable in the
    spool (or fails when the spool cannot be written; the event stays queued
    and is tried again). ``drain`` waits (bounded) until every spooled row of
    the owners is sent or set aside. ``report`` gets one line per row set
    aside and per failing round.
    """

    def __init__(self, spool: Spool, owner: str, connection: "Connection", *, also: Sequence[str] = (),
                 any_url: bool = False, report: Report = report_to_stderr) -> None:
        self.spool = spool
        self.owner = owner
        self.owners = [owner, *also]
        self.connection = connection
        self.url = connection.url
        self.send_urls: list[str] | None = None if any_url else [self.url, ""]
        """The rows it sends: those meant for its own url (or for an unknown one); None: every row."""
        self.report = report
        self._queue: deque[tuple[tuple[str, bytes, str], asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.sent = 0
        self.set_aside = 0
        """Rows the server refused for good in this process's lifetime (kept in the spool)."""
        self.failed_rounds = 0
        self.last_error: str | None = None
        self.retry_after = 0.5

    def adopt(self, owner: str) -> None:
        """Also send rows another process (the wrapper's child) left under ``owner``."""
        if owner not in self.owners:
            self.owners.append(owner)

    def put(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[None]:
        """Queue one event; InvalidEvent at once (nothing queued) if the ledger would refuse it."""
        check_spoolable(subject, payload)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(((subject, payload, msg_id), future))
        self._idle.clear()
        self._wake.set()
        return future

    def kick(self) -> None:
        """Try sending now (e.g. after a reconnect)."""
        self._wake.set()

    async def run(self) -> None:
        """Spool, then send, until cancelled; a failing round is reported and the loop goes on.

        While events keep coming (each of the last two rounds began under
        ``BUSY_S`` after the one before ended), a round first waits
        ``LINGER_S`` for more, so that a client heartbeating for many runs
        spools and sends them a few dozen at a time rather than one by one.
        Occasional events (a job's start and exit) go at once.
        """
        delay = self.retry_after
        last_round, streak = 0.0, 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            streak = streak + 1 if loop.time() - last_round < BUSY_S else 0
            if streak >= 2 and 0 < len(self._queue) < LINGER_UNTIL:
                await asyncio.sleep(LINGER_S)
            self._wake.clear()
            sent_all = await self._round()
            delay = self.retry_after if sent_all else min(delay * 2, RETRY_MAX_S)
            last_round = loop.time()
            if sent_all and not self._queue:
                self._idle.set()

    async def _round(self) -> bool:
        """Spool what is queued, then send; True when nothing is left to send.

        When the spool cannot be written, what is queued goes straight to NATS
        (after the rows already spooled, so the order holds) and stays queued
        in memory until it is taken. No exception ends the loop.
        """
        spool_failed = False
        try:
            await self._spool_queued()
        except Exception as exc:
            self._failed(exc)
            spool_failed = True
        try:
            sent_all = await self.send_spooled()
        except Exception as exc:
            self._failed(exc)
            sent_all = spool_failed  # an unreadable spool: what it holds cannot go first anyway
        if spool_failed and sent_all:
            try:
                return await self._send_queued()
            except Exception as exc:
                self._failed(exc)
                return False
        return sent_all

    @property
    def unspooled(self) -> int:
        """Events neither spooled nor sent (the spool would not take them): lost if the process ends now."""
        return len(self._queue)

    def _failed(self, exc: BaseException) -> None:
        """Report a failing round once per distinct error (the loop goes on)."""
        self.failed_rounds += 1
        line = f"{type(exc).__name__}: {exc}"
        if line != self.last_error:
            self.report(f"the spool {self.spool.path} fails ({line}); events go straight to NATS meanwhile, "
                        "retrying the spool")
        self.last_error = line

    async def _spool_queued(self) -> None:
        if not self._queue:
            return
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        try:
            await self.spool.add(self.owner, [row for row, _ in batch], url=self.url)
        except BaseException:
            self._queue.extendleft(reversed(batch))  # kept in order, tried again next round
            raise
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self.last_error = None

    async def _send_queued(self) -> bool:
        """Send queued events straight to NATS (the spool failed); True when every one was taken."""
        publisher = self.connection.publisher
        if publisher is None or not self._queue:
            return not self._queue
        batch = list(self._queue)
        futures: list[asyncio.Future[int] | EventRefused] = []
        for (subject, payload, msg_id), _ in batch:
            try:
                futures.append(await publisher.submit_raw(subject, payload, {"Nats-Msg-Id": msg_id}))
            except EventRefused as exc:
                futures.append(exc)
            except LedgerError:
                break
        waiting = [f for f in futures if isinstance(f, asyncio.Future)]
        if waiting:
            await asyncio.wait(waiting, timeout=publisher.timeout)
            _retrieved(waiting)
        for ((subject, payload, msg_id), done), future in zip(batch, futures):
            refusal = future if isinstance(future, EventRefused) else _refusal(future)
            if refusal is not None:
                self.set_aside += 1
                self.report(f"the ledger refused an event for good (id {msg_id}, {len(payload)} bytes): {refusal}; "
                            "dropped (the spool could not keep it)")
            elif not isinstance(future, asyncio.Future) or not future.done() or future.cancelled() \
                    or future.exception() is not None:
                break
            else:
                self.sent += 1
            self._queue.popleft()
            if not done.done():
                done.set_result(None)
        late = [f for f in waiting if not f.done()]
        if late:
            publisher.forget(late)
            for future in late:
                future.cancel()
        return not self._queue

    async def send_spooled(self) -> bool:
        """Send the owners' spooled rows in order; True when none is left to send.

        A row the server refuses for good is set aside and the rows behind it
        go on; a transient failure stops the round, keeping that row and the
        ones after it for the next (order is kept on retry).
        """
        publisher = self.connection.publisher
        if publisher is None:
            return not await self.spool.pending(self.owners, 1, urls=self.send_urls)
        after = 0
        while rows := await self.spool.pending(self.owners, after=after, urls=self.send_urls):
            futures: list[asyncio.Future[int] | EventRefused] = []
            unavailable = False
            for row in rows:
                try:
                    futures.append(await publisher.submit_raw(row.subject, row.payload, {"Nats-Msg-Id": row.msg_id}))
                except EventRefused as exc:
                    futures.append(exc)
                except LedgerError:
                    unavailable = True
                    break
            waiting = [f for f in futures if isinstance(f, asyncio.Future)]
            if waiting:
                await asyncio.wait(waiting, timeout=publisher.timeout)  # one timer per batch, not per message
                _retrieved(waiting)
            acked: list[int] = []
            failed = unavailable
            for row, future in zip(rows, futures):
                refusal = future if isinstance(future, EventRefused) else _refusal(future)
                if refusal is not None:
                    await self._set_aside(row, refusal)
                    continue
                if not isinstance(future, asyncio.Future) or not future.done() or future.cancelled() \
                        or future.exception() is not None:
                    failed = True  # keep this row and the ones after it: order is kept on retry
                    break
                acked.append(row.id)
            late = [f for f in futures if isinstance(f, asyncio.Future) and not f.done()]
            if late:
                publisher.forget(late)  # sent again next round (the same Nats-Msg-Id: never twice)
                for future in late:
                    future.cancel()
            await self.spool.remove(acked)
            self.sent += len(acked)
            if failed:
                return False
            after = rows[-1].id
        return True

    async def _set_aside(self, row: SpoolRow, refusal: EventRefused) -> None:
        await self.spool.set_aside(row.id, str(refusal))
        self.set_aside += 1
        kind = row.subject.rsplit(".", 1)[-1]
        self.report(f"the ledger refused an event for good (run/sweep event {kind!r}, id {row.msg_id}, "
                    f"{len(row.payload)} bytes): {refusal}; kept aside in {self.spool.path}, the events after it go on")

    async def drain(self, timeout: float) -> bool:
        """Wait until everything put so far is sent (or set aside); False if NATS did not take it in time."""
        self._idle.clear()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


def _refusal(future: asyncio.Future[int] | EventRefused) -> EventRefused | None:
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        exc = future.exception()
        if isinstance(exc, EventRefused):
            return exc
    return None


def _retrieved(futures: list[asyncio.Future[int]]) -> None:
    """Mark the failures of a sent batch as seen: a round stops at its first failure, and asyncio would
    print "Future exception was never retrieved" for each one behind it (a leader election fails many)."""
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()
