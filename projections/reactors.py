"""Workers that derive facts from the views and append them to the stream:
the liveness monitor (``run.crashed``) and the sweep reactor (``run.killed``
for a cancelled sweep's runs, ``sweep.finished`` for a stopped sweep whose
runs are done).

They keep no state a restart could lose: each tick reads the views and
appends what they imply, under deterministic event ids, so several monitors
or reactors, or one restarted halfway, record each fact once. They pause
while NATS is unreachable or the projector cannot write the views, and go on
by themselves when both are back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiosqlite
import anyio
from anyio.abc import TaskStatus

from ledger.core import events as ev
from ledger.errors import LedgerError
from ledger.nats.control import derived_id
from ledger.nats.publisher import Publisher
from projections.projector import SeqNotifier
from projections.schema import iso
from projections.store import open_db

Clock = Callable[[], datetime]
SUPPRESS_S = 10.0
"""A derived event already sent is not sent again for this long (the views may lag behind it)."""

MAX_LAG = 1000
"""Derive nothing while the views are more than this many stream messages behind."""
MIN_GAP_S = 0.05
"""At most one pass per this many seconds, however often the views move."""

_LIVE = "('finished', 'failed', 'killed')"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


class Reactor:
    """A loop: read the views, append what they imply, wait for the views to move."""

    def __init__(self, db_path: Path | str, publisher: Publisher, *, notifier: SeqNotifier | None = None,
                 interval: float = 0.5, clock: Clock = utc_now) -> None:
        self.db_path = db_path
        self.publisher = publisher
        self.notifier = notifier
        self.interval = interval
        self.clock = clock
        self._sent: dict[str, float] = {}
        self.appended = 0

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        raise NotImplementedError

    async def tick(self) -> int:
        """One pass over the views; returns how many events it appended."""
        if not Path(self.db_path).exists():
            return 0
        db = await open_db(self.db_path, readonly=True)
        try:
            events = await self.derive(db)
        finally:
            await db.close()
        now = time.monotonic()
        self._sent = {k: t for k, t in self._sent.items() if now - t < SUPPRESS_S}
        fresh = [e for e in events if e.id not in self._sent]
        futures = [await self.publisher.submit(e) for e in fresh]
        for event, future in zip(fresh, futures):
            await self.publisher.wait(future)
            self._sent[event.id] = now
        self.appended += len(fresh)
        return len(fresh)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        seen = self.notifier.last_seq if self.notifier else 0
        while True:
            started = time.monotonic()
            if self.publisher.nc.is_connected and not self._views_behind():
                try:
                    await self.tick()
                except (LedgerError, aiosqlite.Error):
                    pass  # NATS away or the views being swapped: the next tick tries again
            await asyncio.sleep(max(0.0, MIN_GAP_S - (time.monotonic() - started)))
            if self.notifier is not None:
                await self.notifier.wait_for(seen + 1, self.interval)  # wake as soon as the views move
                seen = self.notifier.last_seq
            else:
                await asyncio.sleep(self.interval)

    def _views_behind(self) -> bool:
        """Views far behind the stream (a catch-up, a replay --to-seq) or stuck (a full disk) would imply
        stale facts: wait. (So does a NATS outage: nothing could be appended, and heartbeats are held up.)"""
        n = self.notifier
        return n is not None and (n.stream_last_seq - n.last_seq > MAX_LAG or n.problem is not None)


class Monitor(Reactor):
    """Liveness: a run alive in the views with no heartbeat for ``timeout`` gets ``run.crashed``."""

    def __init__(self, db_path: Path | str, publisher: Publisher, *, timeout: float = 300.0, **kw: object) -> None:
        super().__init__(db_path, publisher, **kw)  # type: ignore[arg-type]
        self.timeout = timedelta(seconds=timeout)

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        now = self.clock()
        cutoff = iso(now - self.timeout)
        sql = (
            "SELECT r.run_id, r.attempt, r.last_heartbeat_at, "
            "(SELECT h.at FROM history h WHERE h.kind = 'run' AND h.entity_id = r.run_id ORDER BY h.seq DESC LIMIT 1) "
            "FROM runs r WHERE r.state IN ('initializing', 'running', 'stopping') "
            "AND (r.last_heartbeat_at IS NULL OR r.last_heartbeat_at < ?)"
        )
        async with db.execute(sql, (cutoff,)) as cur:
            rows = await cur.fetchall()
        crashes: list[ev.AnyEvent] = []
        for run_id, attempt, last_hb, since in rows:
            heard = max((t for t in (_dt(last_hb), _dt(since)) if t is not None), default=None)
            if heard is None or now - heard < self.timeout:
                continue
            crashes.append(ev.RunCrashed(
                id=derived_id("crash", run_id, attempt, last_hb or "-", since or "-"),
                at=now, run_id=run_id, attempt=attempt, reason="heartbeat-timeout",
                last_heartbeat_at=_dt(last_hb)))
        return crashes


class SweepReactor(Reactor):
    """Cancel kills a sweep's non-terminal runs; a stopped sweep with none left finishes."""

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        now = self.clock()
        out: list[ev.AnyEvent] = []
        async with db.execute(
            "SELECT r.run_id, r.attempt, (SELECT h.event_id FROM history h WHERE h.kind = 'sweep' "
            "AND h.entity_id = s.sweep_id AND h.state = 'cancelled' ORDER BY h.seq DESC LIMIT 1) "
            f"FROM sweeps s JOIN runs r ON r.sweep_id = s.sweep_id WHERE s.state = 'cancelled' AND r.state NOT IN {_LIVE}"
        ) as cur:
            for run_id, attempt, cause in await cur.fetchall():
                out.append(ev.RunKilled(id=derived_id("kill", cause, run_id, attempt), at=now, run_id=run_id,
                                        attempt=attempt, reason="sweep-cancelled", cause=cause))
        async with db.execute(
            "SELECT s.sweep_id, (SELECT h.event_id FROM history h WHERE h.kind = 'sweep' "
            "AND h.entity_id = s.sweep_id AND h.state = 'stopped' ORDER BY h.seq DESC LIMIT 1) "
            "FROM sweeps s WHERE s.state = 'stopped' AND NOT EXISTS "
            f"(SELECT 1 FROM runs r WHERE r.sweep_id = s.sweep_id AND r.state NOT IN {_LIVE})"
        ) as cur:
            for sweep_id, stop_id in await cur.fetchall():
                out.append(ev.SweepFinished(id=derived_id("finish", sweep_id, stop_id), at=now, sweep_id=sweep_id,
                                            reason="stopped and all runs done"))
        return out
