"""The projector: reads the stream in order from its own checkpoint and folds
each batch into the SQLite views in one transaction with the checkpoint.

It reads with an ordered pull consumer (``PullReader``) from checkpoint + 1 (never an acked durable
consumer), so a cancellation or a SIGKILL at any moment loses nothing: the
next start reads again from what was committed.

``ledger replay`` may swap a rebuilt database in under the projector's feet
(the ``views.db`` symlink then names another file). The projector looks before
each batch and at each idle poll; when the file changed it reopens it and goes
on from that database's own checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import aiosqlite
import anyio
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from ledger.stream import PullReader, StreamMessage, stream_last_seq
from projections import metrics
from projections.lookups import BatchKeys, ViewCache, read_views
from projections.store import (
    CheckpointMoved,
    Decoded,
    Folded,
    apply_batch,
    commit_batch,
    decode_batch,
    file_identity,
    fold,
    open_db,
    read_checkpoint,
)

CACHE_ENTITIES = 10_000
"""Runs (and sweeps) the projector keeps in memory between batches, at least."""

T = TypeVar("T")


class SeqNotifier:
    """The last applied sequence, and a way to wait until it reaches a value."""

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.stream_last_seq = last_seq
        self._changed = asyncio.Condition()

    async def advance(self, seq: int) -> None:
        async with self._changed:
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
                 notifier: SeqNotifier | None = None, idle_poll: float = 1.0) -> None:
        self.js = js
        self.db_path = db_path
        self.batch_size = batch_size
        self.notifier = notifier or SeqNotifier()
        self.idle_poll = idle_poll
        self.checkpoint = 0
        self._identity: tuple[int, int] | None = None
        self._db: aiosqlite.Connection | None = None
        self._lookups: aiosqlite.Connection | None = None
        self._reader: PullReader | None = None
        self._pending: asyncio.Task[None] | None = None  # the background commit
        self._cache = ViewCache(0)

    async def run(self, *, until_idle: bool = False,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Project until cancelled (or, with ``until_idle``, until caught up). Returns the checkpoint."""
        try:
            await self._start(reset=False)
            task_status.started()
            while True:
                try:
                    if until_idle and not self._reader.buffered:  # type: ignore[union-attr]
                        with anyio.CancelScope(shield=True):
                            await self._settle()
                        if await self._caught_up():
                            return self.checkpoint
                    batch = await self._reader.next_batch(self.batch_size, self.idle_poll)  # type: ignore[union-attr]
                    if self._swapped():
                        raise _Restart
                    if not batch:
                        with anyio.CancelScope(shield=True):
                            await self._settle()  # idle: a failed commit must not wait for the next batch
                        await self._refresh_stream_seq()
                        continue
                    decoded = decode_batch(batch)
                    with anyio.CancelScope(shield=True):  # a batch commits whole or not at all
                        await self._fold_and_commit(batch, decoded)
                except _Restart:
                    with anyio.CancelScope(shield=True):
                        await self._stop()
                        await self._start(reset=True)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()

    async def _start(self, *, reset: bool) -> None:
        """Open the views database (write and lookup connections) and read on from its checkpoint."""
        self._identity = file_identity(self.db_path)  # before opening: a swap in between costs a reopen, no miss
        self._db = await open_db(self.db_path)
        self._identity = self._identity or file_identity(self.db_path)
        self._lookups = await open_db(self.db_path, readonly=True)
        self.checkpoint = await read_checkpoint(self._db)
        if reset:
            await self.notifier.reset(self.checkpoint)
        else:
            await self.notifier.advance(self.checkpoint)
        self._cache = ViewCache(max(CACHE_ENTITIES, 2 * self.batch_size))  # two batches: see ViewCache
        self._reader = PullReader(self.js, self.checkpoint + 1)
        await self._reader.start()

    async def _stop(self) -> None:
        """Let a background commit finish (whole, or rolled back: its error is moot now) and close all."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending
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
        db, lookups = self._db, self._lookups
        assert db is not None and lookups is not None
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
        self._pending = asyncio.create_task(self._commit(db, folded, batch, decoded, self.checkpoint, started))

    async def _commit(self, db: aiosqlite.Connection, folded: Folded, batch: list[StreamMessage], decoded: Decoded,
                      expected: int, started: float) -> None:
        """Commit a folded batch, then publish its progress: metrics, the checkpoint, waiters on ``min_seq``.

        A commit that found the database locked past SQLite's busy timeout
        (another writer) is applied again, alone and with backoff, until the
        lock is gone: it folds to the same state, so the batch folded after
        it stays right (and that one's commit checks the checkpoint anyway).
        """
        try:
            await commit_batch(db, folded, expected)
            outcomes = folded.outcomes
        except aiosqlite.OperationalError as exc:
            if not _busy(exc) or self._swapped():
                raise
            outcomes = await _retry_busy(partial(apply_batch, db, batch, decoded))
        await self._committed(outcomes, batch, started)

    async def _committed(self, outcomes: Counter[str], batch: list[StreamMessage], started: float) -> None:
        self.checkpoint = max(self.checkpoint, batch[-1].seq)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        for outcome, count in outcomes.items():
            metrics.EVENTS.labels(outcome).inc(count)
        self.notifier.stream_last_seq = max(self.notifier.stream_last_seq, batch[-1].seq + batch[-1].pending)
        await self.notifier.advance(self.checkpoint)
        self._export_lag()

    async def _settle(self) -> None:
        """Wait for the batch committing in the background: a moved checkpoint or a swapped file
        restarts the projector; any other failure is raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await pending
        except CheckpointMoved:
            raise _Restart from None
        except aiosqlite.Error:
            if self._swapped():
                raise _Restart from None
            raise

    async def _refresh_stream_seq(self) -> None:
        try:
            self.notifier.stream_last_seq = await stream_last_seq(self.js)
        except Exception:  # a reconnecting server: the next poll tries again
            return
        self._export_lag()

    async def _caught_up(self) -> bool:
        await self._refresh_stream_seq()
        return self.checkpoint >= self.notifier.stream_last_seq

    def _export_lag(self) -> None:
        metrics.LAST_SEQ.set(self.notifier.last_seq)
        metrics.STREAM_LAST_SEQ.set(self.notifier.stream_last_seq)
        metrics.LAG.set(max(0, self.notifier.stream_last_seq - self.notifier.last_seq))


def _busy(exc: aiosqlite.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


async def _retry_busy(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` until it does not fail with SQLITE_BUSY (another writer), backing off."""
    delay = 0.05
    while True:
        try:
            return await attempt()
        except aiosqlite.OperationalError as exc:
            if not _busy(exc):
                raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
