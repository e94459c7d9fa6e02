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
from projections.store import (
    Folded,
    apply_batch,
    commit_batch,
    decode_batch,
    file_identity,
    fold_batch,
    open_db,
    read_checkpoint,
)

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


class _Commit:
    """A folded batch committing in the background (aiosqlite's thread) while the next one is read and decoded."""

    def __init__(self, task: asyncio.Task[None], batch: list[StreamMessage]) -> None:
        self.task = task
        self.batch = batch


class Projector:
    """Folds the ``LEDGER`` stream into the views database at ``db_path``.

    Batches are pipelined one deep: while batch N commits in aiosqlite's
    thread, batch N+1 is read and decoded. Its fold waits for that commit
    (it reads the rows N wrote), so every batch still folds onto exactly the
    state its predecessor committed, and each commits whole with its
    checkpoint or not at all.
    """

    def __init__(self, js: JetStreamContext, db_path: Path | str, *, batch_size: int = 5000,
                 notifier: SeqNotifier | None = None, idle_poll: float = 1.0) -> None:
        self.js = js
        self.db_path = db_path
        self.batch_size = batch_size
        self.notifier = notifier or SeqNotifier()
        self.idle_poll = idle_poll
        self.checkpoint = 0

    async def run(self, *, until_idle: bool = False,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Project until cancelled (or, with ``until_idle``, until caught up). Returns the checkpoint."""
        identity, db = await self._open()
        reader: PullReader | None = None
        pending: _Commit | None = None
        try:
            self.checkpoint = await read_checkpoint(db)
            await self.notifier.advance(self.checkpoint)
            reader = PullReader(self.js, self.checkpoint + 1)
            await reader.start()
            task_status.started()
            while True:
                if until_idle and not reader.buffered:
                    with anyio.CancelScope(shield=True):
                        await self._settle(db, pending)
                        pending = None
                    if await self._caught_up():
                        return self.checkpoint
                batch = await reader.next_batch(self.batch_size, self.idle_poll)
                if file_identity(self.db_path) not in (identity, None):
                    with anyio.CancelScope(shield=True):
                        await self._drop(pending)
                        pending = None
                        await reader.stop()
                        reader = None
                        await db.close()
                        identity, db = await self._open()
                    self.checkpoint = await read_checkpoint(db)
                    await self.notifier.reset(self.checkpoint)
                    reader = PullReader(self.js, self.checkpoint + 1)
                    await reader.start()
                    continue
                if not batch:
                    await self._refresh_stream_seq()
                    continue
                decoded = decode_batch(batch)  # while the previous batch commits
                with anyio.CancelScope(shield=True):  # a batch commits whole or not at all
                    try:
                        await self._settle(db, pending)
                        pending = None
                        folded = await _retry_busy(partial(fold_batch, db, batch, decoded))
                    except aiosqlite.Error:
                        if file_identity(self.db_path) not in (identity, None):
                            continue  # the file was swapped while writing: reopen at the loop's top
                        raise
                    if folded is not None:
                        started = time.perf_counter()
                        pending = _Commit(asyncio.create_task(self._commit(db, folded, batch, started)), batch)
        finally:
            with anyio.CancelScope(shield=True):
                await self._drop(pending)
                if reader is not None:
                    await reader.stop()
                await db.close()

    async def _commit(self, db: aiosqlite.Connection, folded: Folded, batch: list[StreamMessage],
                      started: float) -> None:
        """Commit a folded batch, then publish its progress: metrics, the checkpoint, waiters on ``min_seq``."""
        await commit_batch(db, folded)
        self._committed(folded.outcomes, batch, started)
        await self.notifier.advance(self.checkpoint)

    def _committed(self, outcomes: Counter[str], batch: list[StreamMessage], started: float) -> None:
        self.checkpoint = max(self.checkpoint, batch[-1].seq)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        for outcome, count in outcomes.items():
            metrics.EVENTS.labels(outcome).inc(count)
        self.notifier.stream_last_seq = max(self.notifier.stream_last_seq, batch[-1].seq + batch[-1].pending)

    async def _settle(self, db: aiosqlite.Connection, pending: _Commit | None) -> None:
        """Wait for the batch committing in the background. One that found the database busy is
        applied again here, with backoff; any other failure is raised."""
        if pending is None:
            return
        try:
            await pending.task
        except aiosqlite.OperationalError as exc:
            if not _busy(exc):
                raise
            started = time.perf_counter()
            outcomes = await _retry_busy(partial(apply_batch, db, pending.batch))
            self._committed(outcomes, pending.batch, started)
            await self.notifier.advance(self.checkpoint)
        self._export_lag()

    @staticmethod
    async def _drop(pending: _Commit | None) -> None:
        """Let a background commit finish (it commits whole or rolls back); its error is moot now."""
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending.task

    async def _open(self) -> tuple[tuple[int, int] | None, aiosqlite.Connection]:
        """The views database and the identity of its file (taken before opening, so a swap in between
        costs one more reopen, never a missed one)."""
        identity = file_identity(self.db_path)
        db = await open_db(self.db_path)
        return identity or file_identity(self.db_path), db

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
