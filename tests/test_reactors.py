"""The liveness monitor and the sweep reactor: derived facts appended once."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.errors import CommandRefused
from ledger.nats.control import change_sweep, claim_next, kill_run
from ledger.nats.publisher import Publisher
from projections.projector.projector import Projector
from projections.workers.reactors import Monitor, SweepReactor
from tests.factory import at, exited, heartbeat, preempting, run_row, started, sweep
from tests.jobs import run_events, types


async def project(js: JetStreamContext, db_path: Path) -> None:
    await Projector(js, db_path).run(until_idle=True)


def seen_at(db_path: Path, run_id: str) -> datetime:
    """When the stream recorded the run's last applied event, as the views keep it (the monitor's clock)."""
    row = run_row(db_path, run_id)
    assert row is not None
    return datetime.fromisoformat(row["last_seen_at"])


class TestMonitor:
    async def test_silent_run_crashes_once_with_two_monitors(self, js: JetStreamContext, publisher: Publisher,
                                                             db_path: Path) -> None:
        """Two monitors find the same silent run: one run.crashed (heartbeat-timeout) is recorded."""
        await publisher.publish(started("r1", t=0))
        await publisher.publish(heartbeat("r1", t=10))
        await project(js, db_path)
        clock = lambda: seen_at(db_path, "r1") + timedelta(seconds=301)  # noqa: E731  (just past the timeout)
        monitors = [Monitor(db_path, publisher, timeout=300, clock=clock) for _ in range(2)]
        assert [1, 1] == [await m.tick() for m in monitors]
        await project(js, db_path)
        crashes = [e for e in await run_events(js, "r1") if isinstance(e, ev.RunCrashed)]
        assert 1 == len(crashes)
        assert ("heartbeat-timeout", at(10), 1) == (crashes[0].reason, crashes[0].last_heartbeat_at, crashes[0].attempt)
        assert "crashed" == run_row(db_path, "r1")["state"]  # type: ignore[index]
        assert 0 == await monitors[0].tick()

    async def test_fresh_run_is_left_alone(self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """A run heard from within the timeout is not crashed."""
        await publisher.publish(started("r1", t=0))
        await publisher.publish(heartbeat("r1", t=100))
        await project(js, db_path)
        clock = lambda: seen_at(db_path, "r1") + timedelta(seconds=299)  # noqa: E731
        assert 0 == await Monitor(db_path, publisher, timeout=300, clock=clock).tick()

    async def test_heartbeat_after_crash_revives(self, js: JetStreamContext, publisher: Publisher,
                                                 db_path: Path) -> None:
        """A crashed run that heartbeats again is running (rule 3)."""
        await publisher.publish(started("r1", t=0))
        await project(js, db_path)
        silent = seen_at(db_path, "r1") + timedelta(seconds=400)
        await Monitor(db_path, publisher, timeout=300, clock=lambda: silent).tick()
        await project(js, db_path)
        assert "crashed" == run_row(db_path, "r1")["state"]  # type: ignore[index]
        await publisher.publish(heartbeat("r1", t=401))
        await project(js, db_path)
        assert "running" == run_row(db_path, "r1")["state"]  # type: ignore[index]

    async def test_stale_crash_is_ignored(self, js: JetStreamContext, publisher: Publisher, db_path: Path) -> None:
        """A crash decided on views that lagged behind a newer heartbeat changes nothing (rule 9)."""
        await publisher.publish(started("r1", t=0))
        await project(js, db_path)
        silent = seen_at(db_path, "r1") + timedelta(seconds=400)
        monitor = Monitor(db_path, publisher, timeout=300, clock=lambda: silent)
        await publisher.publish(heartbeat("r1", t=399))  # in the stream, not yet in the views
        await monitor.tick()
        await project(js, db_path)
        assert "running" == run_row(db_path, "r1")["state"]  # type: ignore[index]


class TestSweepReactor:
    async def test_cancel_kills_live_runs_once(self, js: JetStreamContext, publisher: Publisher,
                                               db_path: Path) -> None:
        """Cancel: every non-terminal run gets run.killed (sweep-cancelled, cause = the cancel), once."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        for run in ("a", "b", "c"):
            await publisher.publish(started(run, sweep_id="s1"))
        await publisher.publish(exited("c", 0))
        state, _ = await change_sweep(js, publisher, "cancel", "s1", reason="bad config")
        assert "cancelled" == state.state
        await project(js, db_path)
        reactors = [SweepReactor(db_path, publisher) for _ in range(2)]
        assert [2, 2] == [await r.tick() for r in reactors]
        await project(js, db_path)
        cancel_id = [e for e in (await _all(js)) if isinstance(e, ev.SweepCancelled)][0].id
        for run in ("a", "b"):
            kills = [e for e in await run_events(js, run) if isinstance(e, ev.RunKilled)]
            assert [("sweep-cancelled", cancel_id)] == [(k.reason, k.cause) for k in kills]
            assert "killed" == run_row(db_path, run)["state"]  # type: ignore[index]
        assert "finished" == run_row(db_path, "c")["state"]  # type: ignore[index]
        assert 0 == await SweepReactor(db_path, publisher).tick()

    async def test_stopped_sweep_finishes_when_runs_done(self, js: JetStreamContext, publisher: Publisher,
                                                         db_path: Path) -> None:
        """A stopped sweep turns finished once none of its runs is non-terminal."""
        await change_sweep(js, publisher, "create", "s1")
        await publisher.publish(started("a", sweep_id="s1"))
        await change_sweep(js, publisher, "stop", "s1")
        await project(js, db_path)
        assert 0 == await SweepReactor(db_path, publisher).tick()
        await publisher.publish(exited("a", 0))
        await project(js, db_path)
        assert 1 == await SweepReactor(db_path, publisher).tick()
        await project(js, db_path)
        finished = [e for e in await _all(js) if isinstance(e, ev.SweepFinished)]
        assert 1 == len(finished)


class TestCommands:
    async def test_sweep_refusals(self, js: JetStreamContext, publisher: Publisher) -> None:
        """Pausing a cancelled sweep or resuming a finished one is refused; repeating a pause appends nothing."""
        await change_sweep(js, publisher, "create", "s1")
        _, appended = await change_sweep(js, publisher, "pause", "s1")
        assert appended
        assert (False, "paused") == ((r := await change_sweep(js, publisher, "pause", "s1"))[1], r[0].state)
        await change_sweep(js, publisher, "cancel", "s1")
        with pytest.raises(CommandRefused, match="cancelled"):
            await change_sweep(js, publisher, "pause", "s1")
        with pytest.raises(CommandRefused, match="already exists"):
            await change_sweep(js, publisher, "create", "s1")
        with pytest.raises(CommandRefused, match="unknown sweep"):
            await change_sweep(js, publisher, "stop", "nope")
        await change_sweep(js, publisher, "create", "s2")
        await publisher.publish(sweep(ev.SweepFinished, "s2", t=5))
        with pytest.raises(CommandRefused, match="finished"):
            await change_sweep(js, publisher, "resume", "s2")

    async def test_kill_run(self, js: JetStreamContext, publisher: Publisher) -> None:
        """runs kill appends run.killed for the current attempt; a finished run is refused."""
        await publisher.publish(started("r1"))
        run, appended = await kill_run(js, publisher, "r1", "oom")
        assert ("killed", True) == (run.state, appended)
        assert (False,) == ((await kill_run(js, publisher, "r1"))[1],)
        await publisher.publish(started("r2"))
        await publisher.publish(exited("r2", 0))
        with pytest.raises(CommandRefused, match="finished"):
            await kill_run(js, publisher, "r2")

    async def test_two_agents_never_claim_the_same_run(self, js: JetStreamContext, publisher: Publisher) -> None:
        """Concurrent claims on one queue hand out each preempted run at most once."""
        import asyncio

        for run in ("p1", "p2"):
            await publisher.publish(started(run, sweep_id="s1"))
            await publisher.publish(preempting(run))
            await publisher.publish(exited(run, 143))
        claims = await asyncio.gather(*(claim_next(js, publisher, ["p1", "p2"]) for _ in range(5)))
        claimed = sorted(c.run_id for c in claims if c is not None)
        assert ["p1", "p2"] == claimed
        assert ["run.initializing"] == [t for t in types(await run_events(js, "p1")) if t == "run.initializing"]


async def _all(js: JetStreamContext) -> list[ev.AnyEvent]:
    from ledger.nats.stream import PullReader

    reader = PullReader(js, 1)
    await reader.start()
    try:
        out: list[ev.AnyEvent] = []
        while batch := await reader.next_batch(1000, 0.3):
            out += [ev.decode_event(m.subject, m.data) for m in batch]
            if batch[-1].pending == 0:
                break
        return out
    finally:
        await reader.stop()


