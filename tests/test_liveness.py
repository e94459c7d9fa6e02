"""Liveness on the ledger's clock, end to end: a projector and a monitor that sleeps, against a real
NATS server and a real SQLite file."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from projections.projector.projector import Projector, SeqNotifier
from projections.workers.reactors import Monitor
from tests.factory import run_row
from tests.jobs import async_wait_until, run_events

TIMEOUT_S = 3.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _history(db_path: Path, run_id: str) -> list[tuple[str, datetime]]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT state, recorded_at FROM history WHERE kind = 'run' AND entity_id = ? ORDER BY seq",
                          (run_id,)).fetchall()
    return [(state, datetime.fromisoformat(at)) for state, at in rows]


class TestLedgerClock:
    async def test_skewed_live_job_is_never_crashed_and_a_silent_one_is(
            self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """A job whose clock is 10 minutes behind, heartbeating every 0.5 s with a 3 s timeout, is never
        crashed; a silent job is crashed within timeout + 2 s of its last event, as the ledger recorded them."""
        skew = timedelta(minutes=-10)
        notifier = SeqNotifier()
        monitor = Monitor(db_path, publisher, notifier=notifier, timeout=TIMEOUT_S)
        async with anyio.create_task_group() as tg:
            await tg.start(Projector(js, db_path, notifier=notifier).run)
            await tg.start(monitor.run)
            await publisher.publish(ev.RunStarted(id="skewed-start", at=_now() + skew, run_id="skewed"))
            await publisher.publish(ev.RunStarted(id="silent-start", at=_now(), run_id="silent"))
            beats = 0
            until = time.monotonic() + 3 * TIMEOUT_S
            while time.monotonic() < until:  # the job's own pace, not a synchronisation
                beats += 1
                await publisher.publish(ev.RunHeartbeat(id=f"skewed-hb-{beats}", at=_now() + skew, run_id="skewed",
                                                        step=beats))
                await anyio.sleep(0.5)
            await async_wait_until(lambda: (run_row(db_path, "silent") or {}).get("state") == "crashed",
                                   timeout=60, what="the silent run crashed")
            await async_wait_until(lambda: (run_row(db_path, "skewed") or {}).get("step") == beats,
                                   timeout=60, what="the last heartbeat projected")
            tg.cancel_scope.cancel()
        skewed_events = await run_events(js, "skewed")
        assert [] == [e for e in skewed_events if isinstance(e, ev.RunCrashed)]
        assert ["running"] == [state for state, _ in _history(db_path, "skewed")]
        (started_state, started_at), (crashed_state, crashed_at) = _history(db_path, "silent")
        assert ("running", "crashed") == (started_state, crashed_state)
        assert crashed_at - started_at <= timedelta(seconds=TIMEOUT_S + 2)

    async def test_idle_monitor_sleeps_until_the_next_deadline(
            self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """With live runs and nothing arriving, the monitor makes a handful of passes while it waits for the
        first deadline, not one per poll interval."""
        notifier = SeqNotifier()
        monitor = Monitor(db_path, publisher, notifier=notifier, timeout=600, interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(Projector(js, db_path, notifier=notifier).run)
            for i in range(50):
                await publisher.publish(ev.RunStarted(id=f"start-{i}", at=_now(), run_id=f"r{i}"))
            await async_wait_until(lambda: (run_row(db_path, "r49") or {}).get("state") == "running",
                                   timeout=60, what="the runs projected")
            await tg.start(monitor.run)
            await async_wait_until(lambda: monitor.next_deadline is not None, timeout=60, what="a first pass")
            passes = monitor.passes
            await anyio.sleep(1.0)  # a window in which a polling monitor would pass 100 times
            idle_passes = monitor.passes - passes
            tg.cancel_scope.cancel()
        assert idle_passes <= 2
