"""The projector against a real nats-server and a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from projections.projector.projector import Projector
from projections.views.store import STOP_WAIT_S
from tests.conftest import Started, stop_task
from tests.factory import (
    dump_views,
    exited,
    heartbeat,
    killed,
    preempting,
    run_row,
    started,
    sweep,
)


async def project(js: JetStreamContext, db_path: Path, **kw: object) -> int:
    return await Projector(js, db_path, idle_poll=0.2, **kw).run(until_idle=True)  # type: ignore[arg-type]


class TestProjection:
    async def test_lifecycle_lands_in_views(self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """started, heartbeats and a failing exit leave the run failed with its history."""
        for event in [started("r1", sweep_id="s1"), heartbeat("r1", step=5, progress=0.5), exited("r1", 1)]:
            await publisher.publish(event)
        assert 3 == await project(js, db_path)
        row = run_row(db_path, "r1")
        assert row is not None
        assert ("failed", 1, 5, 0.5, "s1", 3) == (row["state"], row["exit_code"], row["step"], row["progress"],
                                                  row["sweep_id"], row["seq"])
        states = [r[3] for r in dump_views(db_path)["history"] if r[0] == "run"]  # s1 has its own (implied)
        assert ["running", "failed"] == states

    async def test_resumes_from_checkpoint(self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """A second projector run applies only what came after the first one's checkpoint."""
        await publisher.publish(started("r1"))
        assert 1 == await project(js, db_path)
        await publisher.publish(exited("r1", 0))
        assert 2 == await project(js, db_path)
        assert "finished" == run_row(db_path, "r1")["state"]  # type: ignore[index]

    async def test_preemption_then_resume(self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """A preempted run sits in its sweep's queue; a new start resumes it with attempt 2."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        for event in [started("r1", sweep_id="s1"), preempting("r1"), exited("r1", 143, signal=None)]:
            await publisher.publish(event)
        await project(js, db_path)
        assert ("preempted", 1) == (run_row(db_path, "r1")["state"], run_row(db_path, "r1")["attempt"])  # type: ignore[index]
        await publisher.publish(started("r1", t=10, resume="must"))
        await project(js, db_path)
        row = run_row(db_path, "r1")
        assert ("running", 2, 0) == (row["state"], row["attempt"], row["preempting"])  # type: ignore[index]

    async def test_same_batch_or_many_batches_same_views(self, js: JetStreamContext, publisher: Publisher,
                                                         tmp_path: Path) -> None:
        """Batch size does not change the views."""
        for i in range(30):
            await publisher.publish(started(f"r{i % 7}", t=i))
            await publisher.publish(heartbeat(f"r{i % 7}", t=i + 0.5, step=i))
            if i % 5 == 0:
                await publisher.publish(killed(f"r{i % 7}", t=i + 0.7))
        await project(js, tmp_path / "a.db", batch_size=1)
        await project(js, tmp_path / "b.db", batch_size=5000)
        assert dump_views(tmp_path / "a.db") == dump_views(tmp_path / "b.db")

    async def test_two_projectors_on_one_database(self, js: JetStreamContext, publisher: Publisher,
                                                  tmp_path: Path) -> None:
        """Two projectors writing the same views (a mistake, but a possible one) end with the views of one:
        each commit checks the checkpoint its fold assumed, and one that finds it moved starts again."""
        for i in range(60):
            await publisher.publish(started(f"r{i % 9}", t=i))
            await publisher.publish(heartbeat(f"r{i % 9}", t=i + 0.5, step=i))
            if i % 4 == 0:
                await publisher.publish(exited(f"r{i % 9}", i % 3, t=i + 0.7))
        last = await project(js, tmp_path / "alone.db")
        both = await asyncio.gather(project(js, tmp_path / "shared.db", batch_size=3),
                                    project(js, tmp_path / "shared.db", batch_size=5))
        assert [last, last] == both
        assert dump_views(tmp_path / "alone.db") == dump_views(tmp_path / "shared.db")

    async def test_a_locked_database_is_waited_out(self, js: JetStreamContext, publisher: Publisher,
                                                   tmp_path: Path) -> None:
        """Another connection holding the write lock past SQLite's busy timeout (5 s) delays the views and
        loses nothing: the batch whose commit gave up is applied again once the lock is gone."""
        db_path = tmp_path / "v.db"
        for event in [started("r1"), heartbeat("r1", step=1)]:
            await publisher.publish(event)
        projector = Projector(js, db_path, idle_poll=0.2)
        status = Started()
        task = asyncio.create_task(projector.run(task_status=status))  # type: ignore[arg-type]
        try:
            await status.wait()
            assert await projector.notifier.wait_for(2, 60)
            locker = sqlite3.connect(db_path, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            try:
                for event in [heartbeat("r1", t=2, step=2), exited("r1", 0, t=3)]:
                    await publisher.publish(event)
                assert not await projector.notifier.wait_for(4, 6.0)  # nothing lands while the lock is held
            finally:
                locker.rollback()
                locker.close()
            assert await projector.notifier.wait_for(4, 60)
        finally:
            await stop_task(task)
        assert 4 == await project(js, tmp_path / "reference.db")
        assert dump_views(tmp_path / "reference.db") == dump_views(db_path)
        assert ("finished", 2) == (run_row(db_path, "r1")["state"], run_row(db_path, "r1")["step"])  # type: ignore[index]

    async def test_a_stop_while_the_views_are_locked_is_bounded(self, js: JetStreamContext, publisher: Publisher,
                                                                tmp_path: Path) -> None:
        """Stopping a projector whose commit waits for a lock another connection never lets go ends it within
        STOP_WAIT_S (the commit rolls back whole), and a later projector applies the batch exactly once."""
        db_path = tmp_path / "v.db"
        await publisher.publish(started("r1"))
        projector = Projector(js, db_path, idle_poll=0.2)
        locker: sqlite3.Connection | None = None
        try:
            async with anyio.create_task_group() as tg:  # as `ledger up` runs it: a cancel scope, not Task.cancel
                await tg.start(projector.run)
                assert await projector.notifier.wait_for(1, 30)
                locker = sqlite3.connect(db_path, isolation_level=None)
                locker.execute("BEGIN IMMEDIATE")
                for event in [heartbeat("r1", t=2, step=2), exited("r1", 0, t=3)]:
                    await publisher.publish(event)
                assert not await projector.notifier.wait_for(3, 6.0)  # the commit is retrying behind the lock
                with anyio.fail_after(STOP_WAIT_S + 30):  # before: retried under a shield, forever
                    tg.cancel_scope.cancel()
                    await anyio.lowlevel.checkpoint()
            assert 1 == sqlite3.connect(f"file:{db_path}?mode=ro", uri=True).execute(
                "SELECT last_seq FROM checkpoint").fetchone()[0]
        finally:
            if locker is not None:
                locker.rollback()
                locker.close()
        assert 3 == await project(js, db_path)
        assert 3 == await project(js, tmp_path / "reference.db")
        assert dump_views(tmp_path / "reference.db") == dump_views(db_path)

    async def test_a_failed_commit_ends_the_projector_loudly(self, js: JetStreamContext, publisher: Publisher,
                                                             db_path: Path) -> None:
        """A commit that fails for good (a table gone from under the views) ends the projector with that
        error, not a retry loop or a silent stall, and leaves the checkpoint where it was."""
        await publisher.publish(started("r1"))
        projector = Projector(js, db_path, idle_poll=0.2)
        status = Started()
        task = asyncio.create_task(projector.run(task_status=status))  # type: ignore[arg-type]
        try:
            await status.wait()
            assert await projector.notifier.wait_for(1, 30)
            with sqlite3.connect(db_path, isolation_level=None) as other:
                other.execute("DROP TABLE history")
            await publisher.publish(exited("r1", 0))
            with pytest.raises(sqlite3.OperationalError, match="no such table: history"):
                async with asyncio.timeout(60):
                    await task
        finally:
            if not task.done():
                await stop_task(task)
        with sqlite3.connect(db_path) as db:
            assert (1,) == db.execute("SELECT last_seq FROM checkpoint").fetchone()

    async def test_a_cancellation_at_any_moment_stops_it(self, js: JetStreamContext, publisher: Publisher,
                                                         tmp_path: Path) -> None:
        """A plain Task.cancel() at any moment (reading, folding, committing, polling the stream's last sequence)
        stops the projector, and what it committed is whole: projecting on gives the reference views.

        nats-py's request (``stream_info``) waits with ``asyncio.wait_for``, which on Python 3.11 loses a
        cancellation that lands as the reply arrives; the projector used to run on after one (what the
        ``api`` fixture saw as "did not stop within 30 s"), a quarter of the cancellations here."""
        db_path = tmp_path / "v.db"
        t = 0
        for round_ in range(12):
            for i in range(40):
                t += 1
                await publisher.publish(heartbeat(f"r{i % 7}", t=t, step=t) if round_ else started(f"r{i % 7}", t=t))
            projector = Projector(js, db_path, idle_poll=0.001, batch_size=7)  # polls the stream often
            status = Started()
            task = asyncio.create_task(projector.run(task_status=status))  # type: ignore[arg-type]
            await status.wait()
            await asyncio.sleep(0.013 * round_)  # where the cancellation lands (not a synchronisation)
            await stop_task(task)
        assert 480 == await project(js, db_path)
        assert 480 == await project(js, tmp_path / "reference.db")
        assert dump_views(tmp_path / "reference.db") == dump_views(db_path)


class TestDuplicates:
    async def test_duplicate_within_window_is_dropped_by_stream(self, js: JetStreamContext, publisher: Publisher,
                                                                db_path: Path) -> None:
        """Re-publishing an event id inside the window appends nothing and answers the first sequence."""
        event = started("r1")
        first = await publisher.publish(event)
        assert first == await publisher.publish(event)
        assert 1 == (await js.stream_info("LEDGER")).state.messages

    async def test_duplicate_beyond_window_changes_nothing(self, js: JetStreamContext, publisher: Publisher,
                                                          db_path: Path) -> None:
        """The same event id stored again (as after the dedup window, a day later) changes no view."""
        first = started("r1")
        await publisher.publish(first)
        await publisher.publish(exited("r1", 0))
        late_copy = ev.RunStarted(id=first.id, at=first.at.replace(day=first.at.day + 1), run_id="r1")
        ack = await js.publish("ledger.run.r1.started", ev.encode_event(late_copy))  # no Nats-Msg-Id: window bypassed
        assert 3 == ack.seq
        await project(js, db_path)
        row = run_row(db_path, "r1")
        assert ("finished", 1, 2) == (row["state"], row["attempt"], row["seq"])  # type: ignore[index]


BAD_INPUT = {
    "not-json": ("ledger.run.r1.started", b"{not json"),
    "not-an-object": ("ledger.run.r1.started", b"[1, 2]"),
    "unknown-type": ("ledger.run.r1.exploded", b'{"type":"run.exploded","id":"x1","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "missing-field": ("ledger.run.r1.exited", b'{"type":"run.exited","id":"x2","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "mistyped-field": ("ledger.run.r1.exited", b'{"type":"run.exited","id":"x3","at":"2026-11-25T12:00:00Z","run_id":"r1","exit_code":"1"}'),
    "type-disagrees-with-subject": ("ledger.run.r1.exited", b'{"type":"run.started","id":"x4","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "run-id-disagrees-with-subject": ("ledger.run.r1.started", b'{"type":"run.started","id":"x5","at":"2026-11-25T12:00:00Z","run_id":"r2"}'),
    "event-id-with-dot": ("ledger.run.r1.started", b'{"type":"run.started","id":"x.6","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "event-id-with-star": ("ledger.run.r1.started", b'{"type":"run.started","id":"x*7","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "event-id-with-gt": ("ledger.run.r1.started", b'{"type":"run.started","id":"x>8","at":"2026-11-25T12:00:00Z","run_id":"r1"}'),
    "run-id-with-space": ("ledger.run.r1.started", b'{"type":"run.started","id":"x9","at":"2026-11-25T12:00:00Z","run_id":"r 1"}'),
    "run-id-200-chars": ("ledger.run." + "r" * 200 + ".started",
                         b'{"type":"run.started","id":"x10","at":"2026-11-25T12:00:00Z","run_id":"' + b"r" * 200 + b'"}'),
    "time-without-offset": ("ledger.run.r1.started", b'{"type":"run.started","id":"x11","at":"2026-11-25T12:00:00","run_id":"r1"}'),
    "one-megabyte": ("ledger.run.r1.heartbeat",
                     b'{"type":"run.heartbeat","id":"x12","at":"2026-11-25T12:00:00Z","run_id":"r1","message":"'
                     + b"a" * 1_000_000 + b'"}'),
}


class TestQuarantine:
    @pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
    async def test_bad_message_is_quarantined_and_changes_nothing(self, case: str, js: JetStreamContext,
                                                                  publisher: Publisher, db_path: Path) -> None:
        """A bad message is kept aside with its reason and raw bytes; the run around it is untouched."""
        subject, payload = BAD_INPUT[case]
        await publisher.publish(started("r1"))
        bad_seq = (await js.publish(subject, payload)).seq
        await publisher.publish(heartbeat("r1", step=3))
        assert 3 == await project(js, db_path)
        with sqlite3.connect(db_path) as db:
            items = db.execute("SELECT seq, subject, reason, raw FROM quarantine").fetchall()
        assert [(bad_seq, subject, payload)] == [(s, subj, bytes(raw)) for s, subj, _, raw in items]
        assert items[0][2]  # a readable reason
        row = run_row(db_path, "r1")
        assert ("running", 3, 3) == (row["state"], row["step"], row["seq"])  # type: ignore[index]
        with sqlite3.connect(db_path) as db:
            assert [("r1",)] == db.execute("SELECT run_id FROM runs").fetchall()


class TestTolerance:
    async def test_events_before_started_create_the_run(self, js: JetStreamContext, publisher: Publisher,
                                                        db_path: Path) -> None:
        """Documented tolerance: the first event of an unknown run creates it; a later start is applied."""
        await publisher.publish(heartbeat("r1", t=1, step=1))
        await publisher.publish(started("r1", t=0))
        await project(js, db_path)
        row = run_row(db_path, "r1")
        assert ("running", 1) == (row["state"], row["step"])  # type: ignore[index]

    async def test_late_heartbeat_after_finish_changes_nothing(self, js: JetStreamContext, publisher: Publisher,
                                                               db_path: Path) -> None:
        """A heartbeat arriving after the exit (rule 3) leaves the run finished and adds no history."""
        for event in [started("r1"), exited("r1", 0), heartbeat("r1", t=5, step=9)]:
            await publisher.publish(event)
        await project(js, db_path)
        row = run_row(db_path, "r1")
        assert ("finished", None, 2) == (row["state"], row["step"], row["seq"])  # type: ignore[index]
