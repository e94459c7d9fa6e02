"""Workers that derive facts from the views and append them to the stream:
the liveness monitor (``run.crashed``) and the sweep reactor (``run.killed``
for a cancelled sweep's runs, ``sweep.finished`` for a stopped sweep whose
runs are done).

They decide nothing themselves: SQL only finds candidates through indexes,
and the core's reactions (``ledger.core.react``) say what each implies. The
state lists in the SQL are generated from the core's sets. They keep no
state a restart could lose: appended facts carry deterministic ids, so
several monitors or reactors, or one restarted halfway, record each fact
once. They pause while NATS is unreachable or the projector cannot write the
views, and go on by themselves when both are back.

They sleep: the monitor wakes at the next crash deadline (the earliest
``last_seen_at`` of an alive run, plus the timeout, through the index on
``(state, last_seen_at)``) or when the views move; the sweep reactor wakes
when the views move and looks only at cancelled or stopped sweeps whose row
or runs changed since its last pass (through the index on the runs' ``seq``).
So idle cost does not grow with the number of live runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Final

import aiosqlite
import anyio
from anyio.abc import TaskStatus

from ledger.core import events as ev
from ledger.core.machine import ALIVE, NON_TERMINAL, SWEEP_REACTING, Run
from ledger.core.react import crash_on_silence, finish_when_done, kill_on_cancel
from ledger.errors import LedgerError
from ledger.nats.publisher import Publisher
from projections.projector.projector import SeqNotifier
from projections.views.schema import (
    RECORDED_RUN_COLUMNS,
    RUN_COLUMNS,
    SWEEP_COLUMNS,
    iso,
    recorded_run_from_row,
    run_from_row,
    sweep_from_row,
)
from projections.views.store import open_db

Clock = Callable[[], datetime]
SUPPRESS_S = 10.0
"""A derived event already sent is not sent again for this long (the views may lag behind it)."""

MAX_LAG = 1000
"""Derive nothing while the views are more than this many stream messages behind."""
MIN_GAP_S = 0.05
"""At most one pass per this many seconds, however often the views move."""
MAX_SLEEP_S = 60.0
"""The longest a reactor sleeps with nothing to wait for (a safety net: the views moving wakes it)."""


def sql_list(states: Iterable[str]) -> str:
    """A state set as an SQL list literal, e.g. ``('failed', 'finished')``: states are fixed identifiers."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


_RUN_SELECT: Final = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
EXPIRED: Final = (f"SELECT {', '.join(RECORDED_RUN_COLUMNS)} FROM runs "
                  f"WHERE state IN {sql_list(ALIVE)} AND last_seen_at <= ?")
"""Alive runs last seen at or before the cutoff (the index on (state, last_seen_at))."""
NEXT_SEEN: Final = "SELECT last_seen_at FROM runs WHERE state = ? AND last_seen_at > ? ORDER BY last_seen_at LIMIT 1"
"""The earliest last sign of life after the cutoff among runs in one alive state (one index probe)."""
CHANGED_SWEEPS: Final = (
    f"SELECT {', '.join(SWEEP_COLUMNS)} FROM sweeps WHERE state IN {sql_list(SWEEP_REACTING)} "
    "AND (seq > ? OR sweep_id IN (SELECT sweep_id FROM runs WHERE sweep_id IS NOT NULL AND seq > ?))")
"""Cancelled or stopped sweeps whose row or runs changed after a sequence (the partial index on runs' seq)."""
OPEN_RUNS: Final = f"{_RUN_SELECT} WHERE sweep_id = ? AND state IN {sql_list(NON_TERMINAL)}"
"""A sweep's non-terminal runs (the index on (sweep_id, state))."""
LAST_MOVE: Final = ("SELECT event_id FROM history WHERE kind = 'sweep' AND entity_id = ? AND state = ? "
                    "ORDER BY seq DESC LIMIT 1")
"""The event that last moved a sweep into a state: the cause a reaction names."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


class Reactor:
    """A loop: read the views, append what they imply, sleep until the views move or a deadline."""

    def __init__(self, db_path: Path | str, publisher: Publisher, *, notifier: SeqNotifier | None = None,
                 interval: float = 0.5, clock: Clock = utc_now) -> None:
        self.db_path = db_path
        self.publisher = publisher
        self.notifier = notifier
        self.interval = interval
        self.clock = clock
        self._sent: dict[str, float] = {}
        self.appended = 0
        self.passes = 0

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        raise NotImplementedError

    def wake_in(self) -> float | None:
        """Seconds until the reactor must look again though the views did not move; None: only when they move."""
        return None

    def passed(self) -> None:
        """Called once a pass appended everything it derived."""

    async def tick(self) -> int:
        """One pass over the views; returns how many events it appended."""
        if not Path(self.db_path).exists():
            return 0
        self.passes += 1
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
        self.passed()
        return len(fresh)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        seen = self.notifier.last_seq if self.notifier else 0
        while True:
            started = time.monotonic()
            wait: float | None = self.interval  # try again soon unless a pass says how long to sleep
            if self.publisher.nc.is_connected and not self._views_behind():
                try:
                    await self.tick()
                    wait = self.wake_in()
                except (LedgerError, aiosqlite.Error):
                    pass  # NATS away or the views being swapped: the next pass tries again
            await asyncio.sleep(max(0.0, MIN_GAP_S - (time.monotonic() - started)))
            if self.notifier is not None:
                # wake as soon as the views move, or at the deadline
                await self.notifier.wait_for(seen + 1, MAX_SLEEP_S if wait is None else min(wait, MAX_SLEEP_S))
                seen = self.notifier.last_seq
            else:
                await asyncio.sleep(self.interval if wait is None else min(wait, self.interval))

    def _views_behind(self) -> bool:
        """Views far behind the stream (a catch-up, a replay --to-seq) or stuck (a full disk) would imply
        stale facts: wait. (So does a NATS outage: nothing could be appended, and heartbeats are held up.)"""
        n = self.notifier
        return n is not None and (n.stream_last_seq - n.last_seq > MAX_LAG or n.problem is not None)


class Monitor(Reactor):
    """Liveness: a run alive in the views and silent for ``timeout`` on the ledger's clock gets ``run.crashed``.

    Silence is measured from ``last_seen_at`` (when the stream recorded the
    run's last applied event) to this process's clock, which on one node is
    the NATS server's; the producer's clock plays no part.
    """

    def __init__(self, db_path: Path | str, publisher: Publisher, *, timeout: float = 300.0, **kw: object) -> None:
        super().__init__(db_path, publisher, **kw)  # type: ignore[arg-type]
        self.timeout = timedelta(seconds=timeout)
        self.next_deadline: datetime | None = None

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        now = self.clock()
        cutoff = iso(now - self.timeout)
        async with db.execute(EXPIRED, (cutoff,)) as cur:
            expired = [recorded_run_from_row(row) for row in await cur.fetchall()]
        crashes: list[ev.AnyEvent] = [c for run in expired if (c := crash_on_silence(run, now, self.timeout))]
        earliest: list[datetime] = []
        for state in sorted(ALIVE):
            async with db.execute(NEXT_SEEN, (state, cutoff)) as cur:
                row = await cur.fetchone()
            if row is not None and (seen := _dt(row[0])) is not None:
                earliest.append(seen)
        self.next_deadline = min(earliest) + self.timeout if earliest else None
        return crashes

    def wake_in(self) -> float | None:
        if self.next_deadline is None:
            return None
        return max(0.0, (self.next_deadline - self.clock()).total_seconds()) + MIN_GAP_S


class SweepReactor(Reactor):
    """Cancel kills a sweep's non-terminal runs; a stopped sweep with none left finishes.

    Each pass looks only at cancelled or stopped sweeps whose row or runs
    changed since the views' checkpoint at its last complete pass (the first
    pass, and one after the views went back, look at all of them).
    """

    def __init__(self, db_path: Path | str, publisher: Publisher, **kw: object) -> None:
        super().__init__(db_path, publisher, **kw)  # type: ignore[arg-type]
        self.since = 0
        self._reading = 0

    async def derive(self, db: aiosqlite.Connection) -> list[ev.AnyEvent]:
        now = self.clock()
        async with db.execute("SELECT last_seq FROM checkpoint WHERE id = 1") as cur:
            row = await cur.fetchone()
        self._reading = checkpoint = row[0] if row else 0
        since = self.since if self.since <= checkpoint else 0  # views swapped for older ones: look again
        async with db.execute(CHANGED_SWEEPS, (since, since)) as cur:
            sweeps = [sweep_from_row(row) for row in await cur.fetchall()]
        out: list[ev.AnyEvent] = []
        for sweep in sweeps:
            async with db.execute(LAST_MOVE, (sweep.sweep_id, sweep.state)) as cur:
                row = await cur.fetchone()
            cause = row[0] if row else "-"
            async with db.execute(OPEN_RUNS, (sweep.sweep_id,)) as cur:
                runs: list[Run] = [run_from_row(r) for r in await cur.fetchall()]
            out += kill_on_cancel(sweep, cause, runs, now)
            if (finished := finish_when_done(sweep, cause, runs, now)) is not None:
                out.append(finished)
        return out

    def passed(self) -> None:
        self.since = self._reading
