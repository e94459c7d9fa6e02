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
import time
from pathlib import Path

import aiosqlite
import anyio
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from ledger.stream import PullReader, stream_last_seq
from projections import metrics
from projections.store import apply_batch, file_identity, open_db, read_checkpoint


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


class Projector:
    """Folds the ``LEDGER`` stream into the views database at ``db_path``."""

    def __init__(self, js: JetStreamContext, db_path: Path | str, *, batch_size: int = 5000,
                 notifier: SeqNotifier | None = None, idle_poll: float = 1.0) -> None:
        self.js = js
        self.db_path = db_path
        self.batch_size = batch_size
        self.notifier = notifier or SeqNotifier()
        self.idle_poll = idle_poll

    async def run(self, *, until_idle: bool = False,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Project until cancelled (or, with ``until_idle``, until caught up). Returns the checkpoint."""
        identity, db = await self._open()
        reader: PullReader | None = None
        try:
            checkpoint = await read_checkpoint(db)
            await self.notifier.advance(checkpoint)
            reader = PullReader(self.js, checkpoint + 1)
            await reader.start()
            task_status.started()
            while True:
                if until_idle and await self._caught_up(checkpoint, reader):
                    return checkpoint
                batch = await reader.next_batch(self.batch_size, self.idle_poll)
                if file_identity(self.db_path) not in (identity, None):
                    with anyio.CancelScope(shield=True):
                        await reader.stop()
                        reader = None
                        await db.close()
                        identity, db = await self._open()
                    checkpoint = await read_checkpoint(db)
                    await self.notifier.reset(checkpoint)
                    reader = PullReader(self.js, checkpoint + 1)
                    await reader.start()
                    continue
                if not batch:
                    await self._refresh_stream_seq(checkpoint)
                    continue
                with anyio.CancelScope(shield=True):  # a batch commits whole or not at all
                    started = time.perf_counter()
                    try:
                        outcomes = await self._apply_with_retry(db, batch)
                    except aiosqlite.Error:
                        if file_identity(self.db_path) not in (identity, None):
                            continue  # the file was swapped while writing: reopen at the loop's top
                        raise
                    checkpoint = max(checkpoint, batch[-1].seq)
                    metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
                    metrics.BATCH_SIZE.observe(len(batch))
                    for outcome, count in outcomes.items():
                        metrics.EVENTS.labels(outcome).inc(count)
                    self.notifier.stream_last_seq = max(self.notifier.stream_last_seq, batch[-1].seq + batch[-1].pending)
                    await self.notifier.advance(checkpoint)
                    self._export_lag()
        finally:
            with anyio.CancelScope(shield=True):
                if reader is not None:
                    await reader.stop()
                await db.close()

    async def _open(self) -> tuple[tuple[int, int] | None, aiosqlite.Connection]:
        """The views database and the identity of its file (taken before opening, so a swap in between
        costs one more reopen, never a missed one)."""
        identity = file_identity(self.db_path)
        db = await open_db(self.db_path)
        return identity or file_identity(self.db_path), db

    async def _apply_with_retry(self, db: aiosqlite.Connection, batch: list) -> dict[str, int]:
        delay = 0.05
        while True:
            try:
                return await apply_batch(db, batch)
            except aiosqlite.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                await anyio.sleep(delay)  # SQLITE_BUSY: back off and retry
                delay = min(delay * 2, 2.0)

    async def _refresh_stream_seq(self, checkpoint: int) -> None:
        try:
            self.notifier.stream_last_seq = await stream_last_seq(self.js)
        except Exception:  # a reconnecting server: the next poll tries again
            return
        self._export_lag()

    async def _caught_up(self, checkpoint: int, reader: PullReader) -> bool:
        if reader.buffered:
            return False
        await self._refresh_stream_seq(checkpoint)
        return checkpoint >= self.notifier.stream_last_seq

    def _export_lag(self) -> None:
        metrics.LAST_SEQ.set(self.notifier.last_seq)
        metrics.STREAM_LAST_SEQ.set(self.notifier.stream_last_seq)
        metrics.LAG.set(max(0, self.notifier.stream_last_seq - self.notifier.last_seq))
