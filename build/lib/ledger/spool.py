"""The durable local spool of job-side publishers, and the outbox that drains it.

Every event a job publishes is first written to an SQLite file, then sent to
JetStream in order and removed once acknowledged. NATS down at start or lost
mid-run costs nothing but delay: the job never waits for it, and nothing is
lost or doubled (the event id is the ``Nats-Msg-Id``; the projector drops
ids it has seen). A spool left by a dead process is sent by ``ledger sync``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiosqlite

from ledger.errors import LedgerError

if TYPE_CHECKING:
    from ledger.connection import Connection

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


class SpoolRow:
    __slots__ = ("id", "subject", "payload", "msg_id")

    def __init__(self, id: int, subject: str, payload: bytes, msg_id: str) -> None:
        self.id, self.subject, self.payload, self.msg_id = id, subject, payload, msg_id


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
                if "locked" not in str(exc) or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.025)

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "Spool.open() first"
        return self._db

    async def add(self, owner: str, rows: Sequence[tuple[str, bytes, str]]) -> None:
        """Append (subject, payload, msg_id) rows durably, in order, in one transaction."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany("INSERT INTO spool (owner, subject, payload, msg_id) VALUES (?, ?, ?, ?)",
                                      [(owner, *row) for row in rows])
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def pending(self, owners: Sequence[str], limit: int = 5000) -> list[SpoolRow]:
        """The oldest unsent rows of these owners, in spool order."""
        marks = ", ".join("?" * len(owners))
        async with self.db.execute(f"SELECT id, subject, payload, msg_id FROM spool WHERE owner IN ({marks}) "
                                   "ORDER BY id LIMIT ?", (*owners, limit)) as cur:
            return [SpoolRow(*r) for r in await cur.fetchall()]

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
        async with self.db.execute("SELECT DISTINCT owner FROM spool") as cur:
            return [r[0] for r in await cur.fetchall()]

    async def count(self, owners: Sequence[str] | None = None) -> int:
        args: tuple[str, ...] = ()
        if owners is None:
            sql = "SELECT count(*) FROM spool"
        else:
            sql, args = f"SELECT count(*) FROM spool WHERE owner IN ({', '.join('?' * len(owners))})", tuple(owners)
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


class Outbox:
    """Writes events to the spool at once, then sends them in order when NATS is there.

    ``put`` never blocks; its future resolves once the event is durable in the
    spool. ``drain`` waits (bounded) until every spooled row of the owners is sent.
    """

    def __init__(self, spool: Spool, owner: str, connection: "Connection", *, also: Sequence[str] = ()) -> None:
        self.spool = spool
        self.owner = owner
        self.owners = [owner, *also]
        self.connection = connection
        self._queue: deque[tuple[tuple[str, bytes, str], asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.sent = 0
        self.retry_after = 0.5

    def adopt(self, owner: str) -> None:
        """Also send rows another process (the wrapper's child) left under ``owner``."""
        if owner not in self.owners:
            self.owners.append(owner)

    def put(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(((subject, payload, msg_id), future))
        self._idle.clear()
        self._wake.set()
        return future

    def kick(self) -> None:
        """Try sending now (e.g. after a reconnect)."""
        self._wake.set()

    async def run(self) -> None:
        """Spool, then send, until cancelled.

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
            await self._spool_queued()
            sent_all = await self.send_spooled()
            delay = self.retry_after if sent_all else min(delay * 2, 5.0)
            last_round = loop.time()
            if sent_all and not self._queue:
                self._idle.set()

    async def _spool_queued(self) -> None:
        if not self._queue:
            return
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        try:
            await self.spool.add(self.owner, [row for row, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else LedgerError("spool interrupted"))
            raise
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def send_spooled(self) -> bool:
        """Send the owners' spooled rows in order; True when none is left."""
        publisher = self.connection.publisher
        if publisher is None:
            return await self.spool.count(self.owners) == 0
        while rows := await self.spool.pending(self.owners):
            try:
                futures = [await publisher.submit_raw(r.subject, r.payload, {"Nats-Msg-Id": r.msg_id}) for r in rows]
            except LedgerError:
                return False
            await asyncio.wait(futures, timeout=publisher.timeout)  # one timer per batch, not per message
            acked: list[int] = []
            failed = False
            for row, future in zip(rows, futures):
                if not future.done() or future.cancelled() or future.exception() is not None:
                    failed = True  # keep this row and the ones after it: order is kept on retry
                    break
                acked.append(row.id)
            await self.spool.remove(acked)
            self.sent += len(acked)
            if failed:
                return False
        return True

    async def drain(self, timeout: float) -> bool:
        """Wait until everything put so far is sent; False if NATS did not take it in time."""
        self._idle.clear()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

