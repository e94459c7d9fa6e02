"""The projector: reads the stream in order from its own checkpoint and folds
each batch into the SQLite views in one transaction with the checkpoint.

It reads with an ordered pull consumer (``PullReader``) from checkpoint + 1 (never an acked durable
consumer), so a cancellation or a SIGKILL at any moment loses nothing: the
next start reads again from what was committed.

``ledger replay`` may swap a rebuilt database in under the projector's feet
(the ``views.db`` symlink then names another file). The projector looks before
each batch and at each idle poll; when the file changed it reopens it and goes
on from that database's own checkpoint.

A full disk (or another I/O error) under the views does not end it: the
failed batch's transaction rolls back whole, the projector says so once
(``SeqNotifier.problem``, which ``/health`` reports), waits with backoff and
starts again from the committed checkpoint until the write goes through. A
NATS outage pauses it the same way: its reader waits for the server and
makes its consumer again from the last message taken in.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import aiosqlite
import anyio
from anyio.abc import TaskGroup, TaskStatus
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from ledger.errors import StreamUnavailable
from ledger.nats.stream import PullReader, StreamMessage, stream_last_seq
from projections.projector import metrics
from projections.views.lookups import BatchKeys, ViewCache, read_views
from projections.views.store import (
    CheckpointMoved,
    Decoded,
    Folded,
    STOP_WAIT_S,
    commit_batch,
    decode_batch,
    file_identity,
    fold,
    is_busy,
    open_db,
    read_checkpoint,
    sqlite_code,
)

CACHE_ENTITIES = 10_000
"""Runs (and sweeps) the projector keeps in memory between batches, at least."""
MAX_BACKOFF_S = 5.0
"""Longest wait between two attempts to write to a full disk or to reach the stream again."""
LOST_GRACE_S = 2.0
"""A reader without a consumer for this long (NATS away) is reported (``/health``, one log line)."""

T = TypeVar("T")


class SeqNotifier:
    """The last applied sequence, and a way to wait until it reaches a value."""

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.stream_last_seq = last_seq
        self.problem: str | None = None
        """Why the projector cannot apply the stream just now (a full disk, the stream out of reach); None when it can."""
        self.current_at = time.monotonic()
        """When the projector last applied a batch or found itself caught up (monotonic clock)."""
        self._changed = asyncio.Condition()

    def stalled_for(self) -> float:
        """Seconds since the projector last applied a batch or was caught up."""
        return time.monotonic() - self.current_at

    async def advance(self, seq: int) -> None:
        async with self._changed:
            self.current_at = time.monotonic()
            self.last_seq = max(self.last_seq, seq)
            self.stream_last_seq = max(self.stream_last_seq, self.last_seq)
            self._changed.notify_all()

    async def reset(self, seq: int) -> None:
        """Set the applied sequence to ``seq`` exactly: a swapped-in views database may be behind."""
        async with self._changed:
            self.last_seq = seq
            self._changed.notify_all()

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """True once ``last_seq >= seq``; False after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.last_seq >= seq)
        except TimeoutError:
            return False
        return True


class _Restart(Exception):
    """The views database changed under the projector (swapped by a replay, or another writer moved
    its checkpoint): start again from that database's own checkpoint."""


class _CannotWrite(Exception):
    """The views cannot be written just now (a full disk, an I/O error): back off, then start again
    from the committed checkpoint. ``reason`` is what ``/health`` says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Pending:
    """The batch committing in the background: its cancel scope, and how it ended."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.error: Exception | None = None
        """A failure ``_settle`` turns into a restart, a back-off or an error; None when it committed."""


def _quiet_log(line: str) -> None:
    return None


class Projector:
    """Folds the ``LEDGER`` stream into the views database at ``db_path``.

    Batches are pipelined one deep: while batch N commits in aiosqlite's
    thread, batch N+1 is read, decoded and folded. The fold takes the runs
    and sweeps recent batches touched from a ``ViewCache`` (right whether or
    not N's commit has landed yet) and the rest through a second, read-only
    connection, so it needs no wait for the commit. Commits stay in stream
    order, one at a time, each whole with its checkpoint or not at all, and
    each checks that the checkpoint is where the previous one left it (else
    the cache is dropped and the projector starts again from the database).
    """

    def __init__(self, js: JetStreamContext, db_path: Path | str, *, batch_size: int = 5000,
                 notifier: SeqNotifier | None = None, idle_poll: float = 1.0,
                 log: Callable[[str], None] = _quiet_log) -> None:
        self.js = js
        self.log = log
        self.db_path = db_path
        self.batch_size = batch_size
        self.notifier = notifier or SeqNotifier()
        self.idle_poll = idle_poll
        self.checkpoint = 0
        self._identity: tuple[int, int] | None = None
        self._db: aiosqlite.Connection | None = None
        self._lookups: aiosqlite.Connection | None = None
        self._reader: PullReader | None = None
        self._tg: TaskGroup | None = None  # run()'s task group: the background commit runs there
        self._pending: _Pending | None = None  # the background commit
        self._cache = ViewCache(0)

    async def run(self, *, until_idle: bool = False,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Project until cancelled (or, with ``until_idle``, until caught up). Returns the checkpoint.

        The projecting loop and its background commit are tasks of this
        method's own task group. A failure no one expected ends the group (and
        the projector) loudly. A cancellation, even a plain ``Task.cancel()``
        that some library's ``wait_for`` swallows once (Python 3.11 can), ends
        them: it reaches this method waiting on the group, which cancels its
        scope, and anyio repeats that at every await until both have ended.
        The commit then lands or rolls back whole, bounded (``commit_batch``).
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                ready = anyio.Event()
                tg.start_soon(self._project, until_idle, ready)
                await ready.wait()
                task_status.started()
            return self.checkpoint
        except BaseExceptionGroup as group:  # one failure (the usual case) is raised as itself
            if len(group.exceptions) == 1:
                raise group.exceptions[0]  # the group stays its context
            raise
        finally:
            self._tg = self._pending = None  # the group has ended, and its commit with it
            with anyio.CancelScope(shield=True):
                await self._stop()

    async def _project(self, until_idle: bool, ready: anyio.Event) -> None:
        try:
            await self._start(reset=False)
        except _CannotWrite as exc:  # a full disk at start: serve what the views hold meanwhile
            ready.set()
            await self._reopen(reset=False, trouble=exc.reason)
        else:
            ready.set()
        while True:
            try:
                if until_idle and not self._reader.buffered:  # type: ignore[union-attr]
                    await self._settle()
                    if await self._caught_up():
                        return
                batch = await self._reader.next_batch(self.batch_size, self.idle_poll)  # type: ignore[union-attr]
                if self._swapped():
                    raise _Restart
                if not batch:
                    await self._settle()  # idle: a failed commit must not wait for the next batch
                    await self._refresh_stream_seq()
                    lost = self._reader.lost  # type: ignore[union-attr]
                    if lost is not None and time.monotonic() - lost > LOST_GRACE_S:
                        self._trouble(f"cannot read the stream: {self._reader.error or 'its consumer is gone'}")  # type: ignore[union-attr]
                    elif self.checkpoint >= self.notifier.stream_last_seq:
                        self._current()  # caught up: nothing to write, nothing stuck
                    continue
                await self._fold_and_commit(batch, decode_batch(batch))
            except _Restart:
                await self._reopen(reset=True)
            except _CannotWrite as exc:
                await self._reopen(reset=False, trouble=exc.reason)

    async def _reopen(self, *, reset: bool, trouble: str | None = None) -> None:
        """Close everything and start again from the database's checkpoint. After trouble (a full
        disk, the stream out of reach) wait first, longer each time, until a start succeeds."""
        delay = 0.5
        while True:
            with anyio.CancelScope(shield=True):
                await self._stop()
            if trouble is not None:
                self._trouble(trouble)
                await anyio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
            try:
                await self._start(reset=reset)
                return
            except _CannotWrite as exc:
                trouble = exc.reason
            except StreamUnavailable as exc:
                trouble = f"cannot read the stream: {exc}"

    def _trouble(self, reason: str) -> None:
        """Say once what keeps the projector from applying the stream; ``/health`` reports it."""
        if self.notifier.problem != reason:
            self.log(f"projector paused at seq {self.checkpoint}: {reason}; retrying")
        self.notifier.problem = reason

    def _current(self) -> None:
        """The projector applies the stream again (or has nothing to apply)."""
        self.notifier.current_at = time.monotonic()
        if self.notifier.problem is not None:
            self.notifier.problem = None
            self.log(f"projector going on from seq {self.checkpoint}")

    async def _start(self, *, reset: bool) -> None:
        """Open the views database (write and lookup connections) and read on from its checkpoint."""
        self._identity = file_identity(self.db_path)  # before opening: a swap in between costs a reopen, no miss
        try:
            self._db = await open_db(self.db_path)
            self._identity = self._identity or file_identity(self.db_path)
            self._lookups = await open_db(self.db_path, readonly=True)
            self.checkpoint = await read_checkpoint(self._db)
        except aiosqlite.Error as exc:
            _raise_if_cannot_write(exc)
            raise
        if reset:
            await self.notifier.reset(self.checkpoint)
        else:
            await self.notifier.advance(self.checkpoint)
        self._cache = ViewCache(max(CACHE_ENTITIES, 2 * self.batch_size))  # two batches: see ViewCache
        self._reader = PullReader(self.js, self.checkpoint + 1)
        await self._reader.start()
        self.notifier.current_at = time.monotonic()

    async def _stop(self) -> None:
        """End a background commit (it lands whole or rolls back: its error is moot now) and close all.

        The commit is cancelled; it waits at most ``STOP_WAIT_S`` for its write
        (a lock another connection holds), then interrupts it (``commit_batch``).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.scope.cancel()
            with anyio.move_on_after(3 * STOP_WAIT_S):  # bounded by commit_batch already; never hang a stop
                await pending.done.wait()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()
        for name in ("_lookups", "_db"):
            db = getattr(self, name)
            setattr(self, name, None)
            if db is not None:
                await db.close()

    def _swapped(self) -> bool:
        return file_identity(self.db_path) not in (self._identity, None)

    async def _fold_and_commit(self, batch: list[StreamMessage], decoded: Decoded) -> None:
        """Fold a batch onto the previous one's views and start its commit once that one's is done."""
        db, lookups, tg = self._db, self._lookups, self._tg
        assert db is not None and lookups is not None and tg is not None
        good, bad = decoded
        started = time.perf_counter()
        try:
            views = await read_views(lookups, BatchKeys.of(good), self._cache)
            folded = fold(views, good, bad, batch[-1].seq)
            self._cache.folded(views)
            await self._settle()
        except aiosqlite.Error:
            if self._swapped():
                raise _Restart from None  # the file was swapped while writing
            raise
        self._pending = pending = _Pending()
        tg.start_soon(self._commit, pending, db, folded, batch, self.checkpoint, started)

    async def _commit(self, pending: _Pending, db: aiosqlite.Connection, folded: Folded, batch: list[StreamMessage],
                      expected: int, started: float) -> None:
        """Commit a folded batch, then publish its progress: metrics, the checkpoint, waiters on ``min_seq``.

        A commit that found the database locked past SQLite's busy timeout
        (another writer) is tried again with backoff until the lock is gone
        or the projector stops: it wrote nothing, and the checkpoint it checks
        is still the one the batch was folded on. The errors ``_settle``
        knows what to do with (a moved checkpoint, SQLite's) are left to it;
        any other ends the projector's task group.
        """
        with pending.scope:
            try:
                await _retry_busy(partial(commit_batch, db, folded, expected), self._swapped)
            except (CheckpointMoved, aiosqlite.Error) as exc:
                pending.error = exc
            else:
                await self._committed(folded.outcomes, batch, started)
            finally:
                pending.done.set()

    async def _committed(self, outcomes: Counter[str], batch: list[StreamMessage], started: float) -> None:
        self.checkpoint = max(self.checkpoint, batch[-1].seq)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        for outcome, count in outcomes.items():
            metrics.EVENTS.labels(outcome).inc(count)
        self.notifier.stream_last_seq = max(self.notifier.stream_last_seq, batch[-1].seq + batch[-1].pending)
        await self.notifier.advance(self.checkpoint)
        self._current()
        self._export_lag()

    async def _settle(self) -> None:
        """Wait for the batch committing in the background: a moved checkpoint or a swapped file
        restarts the projector; any other failure is raised."""
        pending = self._pending
        if pending is None:
            return
        await pending.done.wait()
        self._pending = None
        exc = pending.error
        if exc is None:
            return
        if isinstance(exc, CheckpointMoved) or self._swapped():
            raise _Restart from exc
        _raise_if_cannot_write(exc)
        raise exc

    async def _refresh_stream_seq(self) -> None:
        try:
            self.notifier.stream_last_seq = await stream_last_seq(self.js)
        except (NatsError, TimeoutError, OSError):  # a reconnecting server: the next poll tries again
            return
        self._export_lag()

    async def _caught_up(self) -> bool:
        await self._refresh_stream_seq()
        return self.checkpoint >= self.notifier.stream_last_seq

    def _export_lag(self) -> None:
        metrics.LAST_SEQ.set(self.notifier.last_seq)
        metrics.STREAM_LAST_SEQ.set(self.notifier.stream_last_seq)
        metrics.LAG.set(max(0, self.notifier.stream_last_seq - self.notifier.last_seq))


def _raise_if_cannot_write(exc: BaseException) -> None:
    """A full disk or an I/O error under the views is _CannotWrite (the projector waits it out)."""
    code = sqlite_code(exc)
    if code == sqlite3.SQLITE_FULL:
        raise _CannotWrite("disk full: the views cannot be written") from exc
    if code == sqlite3.SQLITE_IOERR:
        raise _CannotWrite(f"disk error: the views cannot be written ({getattr(exc, 'sqlite_errorname', code)})") from exc


async def _retry_busy(attempt: Callable[[], Awaitable[T]], swapped: Callable[[], bool]) -> T:
    """``attempt()`` until it does not fail with SQLITE_BUSY (another writer holds the lock), backing off;
    a database swapped meanwhile is not tried again (the projector restarts on the new one)."""
    delay = 0.05
    while True:
        try:
            return await attempt()
        except aiosqlite.OperationalError as exc:
            if not is_busy(exc) or swapped():
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)
