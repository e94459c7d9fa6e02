"""The Python client: resume rules enforced atomically, the run block, preemption."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.decide import StartRefused
from ledger.errors import ResumeRefused
from ledger.jobs.client import AsyncLedger
from ledger.jobs.sync_client import Ledger
from ledger.nats.publisher import Publisher
from tests.factory import exited, started
from tests.jobs import run_events, run_state, types


@pytest.fixture
async def client(nats_url: str, js: JetStreamContext, tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db")
    yield ledger
    await ledger.close()


async def message_count(js: JetStreamContext) -> int:
    return int((await js.stream_info("LEDGER")).state.messages)


RESUME_TABLE = [
    ("never", True, "resume-never"), ("never", False, None),
    ("allow", True, None), ("allow", False, None),
    ("must", True, None), ("must", False, "resume-must"),
    ("auto", True, None), ("auto", False, None),
]


class TestResumeTable:
    @pytest.mark.parametrize("mode,exists,refusal", RESUME_TABLE,
                             ids=[f"{m}-{'exists' if e else 'new'}-{r or 'ok'}" for m, e, r in RESUME_TABLE])
    async def test_resume_modes(self, client: AsyncLedger, publisher: Publisher, js: JetStreamContext,
                                mode: str, exists: bool, refusal: str | None) -> None:
        """Each cell of the resume table: resumed / new run, or refused with nothing appended."""
        if exists:
            await publisher.publish(started("r1"))
            await publisher.publish(exited("r1", 0))
        before = await message_count(js)
        if refusal:
            with pytest.raises(StartRefused) as info:
                await client.start_run("r1", resume=mode, heartbeat=None)  # type: ignore[arg-type]
            assert refusal == info.value.rule
            assert before == await message_count(js)
            return
        handle = await client.start_run("r1", resume=mode, heartbeat=None)  # type: ignore[arg-type]
        expected_attempt = 2 if exists else 1
        assert expected_attempt == handle.attempt
        run = await run_state(js, "r1")
        assert ("running", expected_attempt) == (run.state, run.attempt)

    async def test_concurrent_new_starts_one_wins(self, nats_url: str, js: JetStreamContext, tmp_path: Path) -> None:
        """Many processes starting one new run id under `never` at once: exactly one wins."""
        clients = [await AsyncLedger.connect(nats_url, spool=tmp_path / f"spool{i}.db") for i in range(12)]
        try:
            results = await asyncio.gather(*(c.start_run("contested", resume="never", heartbeat=None)
                                             for c in clients), return_exceptions=True)
        finally:
            for c in clients:
                await c.close()
        winners = [r for r in results if not isinstance(r, BaseException)]
        refusals = [r for r in results if isinstance(r, ResumeRefused)]
        assert (1, 11) == (len(winners), len(refusals))
        assert ["run.started"] == types(await run_events(js, "contested"))

    async def test_live_twin_refused_unless_forced(self, client: AsyncLedger, js: JetStreamContext) -> None:
        """A run that is running with a fresh heartbeat cannot be started again unless forced."""
        await client.start_run("twin", heartbeat=None)
        with pytest.raises(StartRefused) as info:
            await client.start_run("twin", resume="allow", heartbeat=None)
        assert "run-alive" == info.value.rule
        forced = await client.start_run("twin", resume="allow", force=True, heartbeat=None)
        assert 2 == forced.attempt


class TestRunBlock:
    async def test_clean_block_finishes(self, client: AsyncLedger, js: JetStreamContext) -> None:
        """A block that ends normally publishes exited 0: finished, with the heartbeats it sent."""
        async with client.run("b1", heartbeat=None) as run:
            await run.heartbeat(step=1, progress=0.5)
        kinds = types(await run_events(js, "b1"))
        assert ["run.started", "run.heartbeat", "run.exited"] == kinds
        state = await run_state(js, "b1")
        assert ("finished", 1, 0.5) == (state.state, state.step, state.progress)

    async def test_raising_block_fails(self, client: AsyncLedger, js: JetStreamContext) -> None:
        """A block that raises publishes a non-zero exit: failed, and the error propagates."""
        with pytest.raises(ZeroDivisionError):
            async with client.run("b2", heartbeat=None):
                1 / 0  # noqa: B018
        assert "failed" == (await run_state(js, "b2")).state

    async def test_preemption_in_block(self, client: AsyncLedger, js: JetStreamContext, publisher: Publisher) -> None:
        """mark_preempting then exiting 143 leaves the run preempted in its sweep."""
        await publisher.publish(ev.SweepCreated(id="sw1", at=started("x").at, sweep_id="s1"))
        with pytest.raises(SystemExit):
            async with client.run("b3", sweep="s1", heartbeat=None) as run:
                await run.mark_preempting()
                raise SystemExit(143)
        state = await run_state(js, "b3")
        assert ("preempted", True, 143) == (state.state, state.preempting, state.exit_code)

    async def test_background_heartbeats(self, client: AsyncLedger, js: JetStreamContext) -> None:
        """With heartbeat=S the client heartbeats in the background while the block runs."""
        async with client.run("b4", heartbeat=0.05):
            while types(await run_events(js, "b4")).count("run.heartbeat") < 2:
                await asyncio.sleep(0.02)  # the block's own work; the condition is what the test waits for
        assert "finished" == (await run_state(js, "b4")).state

    async def test_closed_sweep_refuses_new_runs(self, client: AsyncLedger, publisher: Publisher,
                                                 js: JetStreamContext) -> None:
        """A paused sweep refuses a fresh start and a queued run, appending nothing."""
        t = started("x").at
        await publisher.publish(ev.SweepCreated(id="c1", at=t, sweep_id="s9"))
        await publisher.publish(ev.SweepPaused(id="p1", at=t, sweep_id="s9"))
        before = await message_count(js)
        with pytest.raises(StartRefused) as info:
            await client.start_run("n1", sweep="s9", heartbeat=None)
        assert "sweep-closed" == info.value.rule
        with pytest.raises(StartRefused):
            await client.queue_run("n2", sweep="s9")
        assert before == await message_count(js)


class TestSyncClient:
    async def test_sync_result_visible(self, nats_url: str, js: JetStreamContext, tmp_path: Path) -> None:
        """A sync client's run, read back from the stream, is finished with its step."""
        def job() -> None:
            ledger = Ledger.connect(nats_url, spool=tmp_path / "spool.db")
            with ledger.run("sync2", heartbeat=None) as run:
                run.heartbeat(step=7)
            ledger.close()

        await asyncio.to_thread(job)
        state = await run_state(js, "sync2")
        assert ("finished", 7) == (state.state, state.step)
