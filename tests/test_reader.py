"""``from ledger import Reader``: the Python read client against a real ledger (API, projector, stream)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from ledger import Reader, ReadFailed
from ledger.core import events as ev
from ledger.core.fold import Entry
from ledger.core.machine import Run
from ledger.core.shapes import SweepView, Timeline
from ledger.nats.publisher import Publisher
from tests.factory import exited, heartbeat, started, sweep


@pytest.fixture
def reader(api: httpx.AsyncClient) -> Reader:
    return Reader(str(api.base_url), token="")


def now_started(run_id: str, minutes_ago: float, **kw: object) -> ev.RunStarted:
    at = datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)
    return ev.RunStarted(id=f"now-{run_id}", at=at, run_id=run_id, **kw)  # type: ignore[arg-type]


class TestReader:
    async def test_runs_filters_and_types(self, reader: Reader, publisher: Publisher) -> None:
        """runs() filters by sweep, state and since, newest first, and answers typed Run structs."""
        await publisher.publish(started("old", sweep_id="s1"))  # 2026-11-25: long before "1h"
        await publisher.publish(now_started("new-a", 30, sweep_id="s1"))
        await publisher.publish(now_started("new-b", 10, sweep_id="s2"))
        seq = await publisher.publish(exited("old", 1))
        await asyncio.to_thread(reader.run, "old", min_seq=seq)
        runs = await asyncio.to_thread(lambda: list(reader.runs()))
        assert all(isinstance(r, Run) for r in runs)
        assert ["new-b", "new-a", "old"] == [r.run_id for r in runs]
        assert ["new-b", "new-a"] == [r.run_id for r in await asyncio.to_thread(lambda: list(reader.runs(since="1h")))]
        assert ["new-a"] == [r.run_id for r in await asyncio.to_thread(
            lambda: list(reader.runs(sweep="s1", since="1h")))]
        assert ["old"] == [r.run_id for r in await asyncio.to_thread(lambda: list(reader.runs(state="failed")))]

    async def test_runs_pages_through_everything(self, reader: Reader, publisher: Publisher) -> None:
        """runs() fetches page after page until every run has been returned."""
        for i in range(25):
            seq = await publisher.publish(started(f"r{i:02d}", t=i))
        await asyncio.to_thread(reader.run, "r24", min_seq=seq)
        got = await asyncio.to_thread(lambda: [r.run_id for r in reader.runs(page_size=7)])
        assert [f"r{i:02d}" for i in reversed(range(25))] == got

    async def test_run_as_of_history_events_and_sweep(self, reader: Reader, publisher: Publisher) -> None:
        """run() reads now and as of a past sequence or time; history, events and sweep answer typed."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        first = await publisher.publish(started("r1", sweep_id="s1"))
        await publisher.publish(heartbeat("r1", step=5))
        seq = await publisher.publish(exited("r1", 2))
        now = await asyncio.to_thread(reader.run, "r1", min_seq=seq)
        assert ("failed", 2) == (now.state, now.exit_code)
        assert "running" == (await asyncio.to_thread(reader.run, "r1", as_of=first)).state
        assert "failed" == (await asyncio.to_thread(reader.run, "r1", as_of=datetime.now(timezone.utc))).state
        with pytest.raises(ReadFailed) as gone:
            await asyncio.to_thread(reader.run, "r1", as_of="2000-01-01T00:00:00Z")
        assert 404 == gone.value.status
        history = await asyncio.to_thread(reader.history, "r1")
        assert all(isinstance(e, Entry) for e in history)
        assert [("running", None), ("failed", "exit code 2")] == [(e.state, e.reason) for e in history]
        trail = await asyncio.to_thread(reader.events, "r1")
        assert isinstance(trail, Timeline)
        assert ["run.started", "run.heartbeat", "run.exited"] == [e.event_type for e in trail.events]
        found = await asyncio.to_thread(reader.sweep, "s1")
        assert isinstance(found, SweepView)
        assert ("running", 1) == (found.state, found.runs["failed"])

    async def test_wait_returns_once_the_run_gets_there(self, reader: Reader, publisher: Publisher) -> None:
        """wait() blocks until the run reaches one of the states, even a run not known yet."""
        waiting = asyncio.create_task(asyncio.to_thread(reader.wait, "r1", {"finished", "failed"}, 30))
        seq = await publisher.publish(started("r1"))
        await asyncio.to_thread(reader.run, "r1", min_seq=seq)
        assert not waiting.done()
        await publisher.publish(exited("r1", 0))
        run = await asyncio.wait_for(waiting, 30)
        assert ("r1", "finished") == (run.run_id, run.state)

    async def test_wait_times_out(self, reader: Reader, publisher: Publisher) -> None:
        """wait() raises TimeoutError when the run does not get there in time."""
        seq = await publisher.publish(started("r1"))
        await asyncio.to_thread(reader.run, "r1", min_seq=seq)
        with pytest.raises(TimeoutError, match="r1"):
            await asyncio.to_thread(reader.wait, "r1", "finished", 0.5)

    async def test_errors_are_one_line(self, reader: Reader) -> None:
        """An unknown run and an unreachable API are ReadFailed with the API's message."""
        with pytest.raises(ReadFailed, match="unknown run 'nope'"):
            await asyncio.to_thread(reader.run, "nope")
        with pytest.raises(ReadFailed, match="cannot reach"):
            await asyncio.to_thread(Reader("127.0.0.1:1").run, "r1")
