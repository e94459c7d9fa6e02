"""Never lose an event, never fail the job: NATS down at start or lost mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ledger.core import events as ev
from ledger.jobs.client import AsyncLedger
from ledger.jobs.spool import Spool
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import connect, ensure_stream
from tests.jobs import (
    LEDGER,
    async_wait_until,
    job_env,
    ledger_run,
    run_events,
    types,
    wait_until,
)


class Server:
    """A nats-server this test may stop and start again (same port, same store)."""

    def __init__(self, tmp_path: Path) -> None:
        self.nats = EmbeddedNats(tmp_path / "store", port=free_port())

    async def start(self) -> None:
        self.nats.start()
        nc = await connect(self.nats.url)
        await ensure_stream(nc.jetstream())
        await nc.close()

    def stop(self) -> None:
        self.nats.stop()

    async def events(self, run_id: str) -> list[ev.AnyEvent]:
        nc = await connect(self.nats.url)
        try:
            return await run_events(nc.jetstream(), run_id)
        finally:
            await nc.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(tmp_path)
    yield srv
    srv.stop()


async def spooled(path: Path) -> int:
    spool = await Spool(path).open()
    try:
        return await spool.count()
    finally:
        await spool.close()


def assert_no_duplicates(events: list[ev.AnyEvent]) -> None:
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))


class TestLostMidRun:
    async def test_client_spools_and_drains_by_itself(self, server: Server, tmp_path: Path) -> None:
        """Heartbeats sent while NATS is down reach the stream in order, once, when it is back."""
        await server.start()
        spool = tmp_path / "spool.db"
        client = await AsyncLedger.connect(server.nats.url, spool=spool, heartbeat_min_interval=0)  # every one
        run = await client.start_run("m1", heartbeat=None)
        for step in range(5):
            await run.heartbeat(step=step)
        await async_wait_until(lambda: client.outbox.drain(0.2), what="first heartbeats sent")
        server.stop()
        for step in range(5, 10):
            await run.heartbeat(step=step)  # the job goes on; the events wait in the spool
        await async_wait_until(lambda: spooled(spool), what="events spooled while NATS is down")
        await server.start()
        await async_wait_until(lambda: client.outbox.drain(0.5), timeout=30, what="spool drained after restart")
        await run.exited(0)
        assert await client.close()
        events = await server.events("m1")
        assert_no_duplicates(events)
        assert ["run.started", *["run.heartbeat"] * 10, "run.exited"] == types(events)
        assert list(range(10)) == [e.step for e in events if isinstance(e, ev.RunHeartbeat)]
        assert 0 == await spooled(spool)

    async def test_down_at_start(self, server: Server, tmp_path: Path) -> None:
        """A client started while NATS is down runs unchecked, then delivers everything once NATS is up."""
        spool = tmp_path / "spool.db"
        client = await AsyncLedger.connect(server.nats.url, spool=spool, timeout=0.3)
        assert not client.connected
        run = await client.start_run("d1", heartbeat=None)
        await run.heartbeat(step=1)
        await run.exited(0, wait=0)
        await server.start()
        await async_wait_until(lambda: client.outbox.drain(0.5), timeout=30, what="spool drained")
        await client.close()
        events = await server.events("d1")
        assert ["run.started", "run.heartbeat", "run.exited"] == types(events)
        assert 0 == await spooled(spool)


class TestWrapperWithoutNats:
    async def test_job_survives_and_sync_delivers(self, server: Server, tmp_path: Path) -> None:
        """NATS lost mid-run: the job runs to its end, exits 0, and `ledger sync` delivers the rest once."""
        await server.start()
        env = job_env(server.nats.url, tmp_path)
        release = tmp_path / "release"
        script = f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): time.sleep(0.01)\n"
        proc = ledger_run(["--run-id", "w1", "--heartbeat", "0.05", "--drain", "0.3", "--", sys.executable, "-c",
                           script], env)
        await async_wait_until(lambda: _count(server, "w1", "run.heartbeat", 2), what="heartbeats before the outage")
        server.stop()
        spool = tmp_path / "spool.db"
        await async_wait_until(lambda: _spool_at_least(spool, 2), what="heartbeats spooled during the outage")
        release.touch()
        out, err = proc.communicate(timeout=60)
        assert 0 == proc.returncode, err
        assert "ledger sync" in err
        left = await spooled(spool)
        assert left >= 3  # heartbeats and the exit wait in the spool
        await server.start()
        sync = subprocess.run([*LEDGER, "sync", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert 0 == sync.returncode, sync.stderr
        assert {"sent": left, "left": 0, "set_aside": 0, "elsewhere": 0} == json.loads(sync.stdout)
        events = await server.events("w1")
        assert_no_duplicates(events)
        kinds = types(events)
        assert ("run.started", "run.exited") == (kinds[0], kinds[-1])
        assert {"run.heartbeat"} == set(kinds[1:-1])
        again = subprocess.run([*LEDGER, "sync", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert {"sent": 0, "left": 0, "set_aside": 0, "elsewhere": 0} == json.loads(again.stdout)

    def test_down_at_start_job_still_runs(self, tmp_path: Path) -> None:
        """With no NATS at all the job runs, exits with its own code, and its events stay spooled."""
        env = job_env(f"nats://127.0.0.1:{free_port()}", tmp_path)
        proc = ledger_run(["--run-id", "n1", "--drain", "0.2", "--", "sh", "-c", "exit 4"], env)
        _, err = proc.communicate(timeout=60)
        assert 4 == proc.returncode
        assert "NATS unreachable" in err
        wait_until(lambda: (tmp_path / "spool.db").exists(), what="spool file")


async def _count(server: Server, run_id: str, kind: str, at_least: int) -> bool:
    return types(await server.events(run_id)).count(kind) >= at_least


async def _spool_at_least(path: Path, n: int) -> bool:
    return await spooled(path) >= n


class TestSpoolFile:
    async def test_many_jobs_open_one_new_spool_at_once(self, tmp_path: Path) -> None:
        """Jobs starting together on one new spool file all open it (WAL set-up races are retried)."""
        import asyncio

        path = tmp_path / "shared-spool.db"
        spools = await asyncio.gather(*(Spool(path).open() for _ in range(8)))
        try:
            for i, spool in enumerate(spools):
                await spool.add(f"h:{i}", [("ledger.run.r.heartbeat", b"{}", f"id{i}")])
            assert 8 == await spools[0].count()
        finally:
            for spool in spools:
                await spool.close()
