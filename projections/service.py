"""``ledger up``: embedded NATS (unless given one), the stream, the projector,
the liveness monitor, the sweep reactor and the HTTP API in one process,
stopped cleanly by SIGINT or SIGTERM (to the process or its whole group).

It owns its data dir (an exclusive lock on ``DATA_DIR/ledger.lock``, taken
before anything starts) and supervises the embedded ``nats-server``: one that
dies is started again on the same port and store, and the NATS connection,
the projector, the reactors and the API's stream reads carry on by themselves.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from ledger.errors import LedgerError
from ledger.nats.server import EmbeddedNats, check_port_free
from ledger.nats.stream import connect, ensure_stream
from projections.http.auth import is_loopback

LOCK_FILE = "ledger.lock"
SHUTDOWN_S = 10.0
"""Longest wait for each step of a shutdown: the API's last requests, the NATS drain."""


@dataclass(frozen=True)
class UpSettings:
    data_dir: Path
    nats_url: str | None
    nats_port: int
    http: str
    heartbeat_timeout: float
    http_token: str | None = None
    replicas: int | None = None
    """Replicas of the stream: on creation, or to raise an existing one's (never lowered); None: the default."""
    compact_after: float | None = None
    """``--compact-after``: compact the heartbeats of runs ended longer ago than this (seconds); None: never."""
    auth_dir: Path | None = None
    """``ledger auth init``'s directory: the embedded server runs with its roles, and ``ledger up`` uses ``service.nk``."""
    nats_creds: str | None = None
    """This process's own key (default: the auth dir's ``service.nk``, else ``$LEDGER_NATS_CREDS``)."""
    nats_tls: tuple[Path, Path] | None = None
    """Certificate and key of the embedded server: it then takes ``tls://`` clients only."""

    def creds(self) -> str | None:
        if self.nats_creds:
            return self.nats_creds
        if self.auth_dir is not None:
            from ledger.nats.auth import key_path

            return str(key_path(self.auth_dir, "service"))
        return None


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` (or ``:port``) into its parts; a clear error otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LedgerError(f"--http must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def say(line: str) -> None:
    """One line on stderr about what ``ledger up`` saw or did (a restart, a full disk)."""
    print(f"ledger up: {line}", file=sys.stderr, flush=True)


class DataDirLock:
    """The claim of one ``ledger up`` on its data dir: an exclusive ``flock`` on
    ``DATA_DIR/ledger.lock``, which holds the owner's pid. The kernel drops it
    when the process ends, however it ends."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise LedgerError (one line, with the owner's pid) at once."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LedgerError(f"data dir {self.data_dir} is in use by another ledger up (pid {owner})") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same, only the pid is missing
            pass

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


async def up(settings: UpSettings, on_ready: Callable[[dict[str, object]], None]) -> None:
    """Run everything until SIGINT/SIGTERM; ``on_ready`` gets the addresses once serving."""
    host, port = parse_hostport(settings.http)
    if settings.auth_dir is not None and not settings.http_token and not is_loopback(host):
        raise LedgerError(f"--auth with the HTTP API on {host} (beyond loopback) needs a token: "
                          "--http-token / LEDGER_HTTP_TOKEN")
    auth = None
    if settings.auth_dir is not None:
        from ledger.nats.auth import key_path, read_auth_conf

        auth = read_auth_conf(settings.auth_dir)
        if not settings.nats_creds and not key_path(settings.auth_dir, "service").exists():
            raise LedgerError(f"{key_path(settings.auth_dir, 'service')} does not exist: "
                              f"run `ledger auth init {settings.auth_dir}`")
    # Signals first: from here on SIGINT/SIGTERM are events, not KeyboardInterrupt or death mid-start.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with DataDirLock(settings.data_dir):
            check_port_free(host, port, "HTTP")
            embedded: EmbeddedNats | None = None
            url = settings.nats_url
            if url is None:
                embedded = EmbeddedNats(settings.data_dir / "nats", port=settings.nats_port, auth=auth,
                                        tls=settings.nats_tls)
                url = embedded.start()
            try:
                await _serve(settings, url, embedded, host, port, signals, on_ready)
            finally:
                if embedded is not None:
                    embedded.stop()


async def _serve(settings: UpSettings, url: str, embedded: EmbeddedNats | None, host: str, port: int,
                 signals: AsyncIterator[int], on_ready: Callable[[dict[str, object]], None]) -> None:
    from ledger.nats.publisher import Publisher
    from projections.http.api import ApiState, api_server
    from projections.workers.compaction import compact_every
    from projections.projector.projector import Projector, SeqNotifier
    from projections.workers.reactors import Monitor, SweepReactor

    stopping = False

    async def lost() -> None:
        if not stopping:
            say(f"lost NATS at {url}; reconnecting (the views still answer, /health is degraded)")

    async def back() -> None:
        say(f"NATS back at {url}")

    nc = await connect(url, disconnected_cb=lost, reconnected_cb=back, creds=settings.creds())
    try:
        js = nc.jetstream()
        await ensure_stream(js, replicas=settings.replicas, say=say)
        notifier = SeqNotifier()
        db_path = settings.data_dir / "views.db"
        await _check_views(db_path)
        server = api_server(ApiState(db_path, notifier=notifier, js=js, http_token=settings.http_token), host, port)
        api_done = anyio.Event()

        async def serve_api() -> None:
            try:
                await server.serve()
            except SystemExit:  # uvicorn's way to say its startup failed (it logged why): reported below
                pass
            finally:
                api_done.set()

        async with anyio.create_task_group() as tg:
            if embedded is not None:
                tg.start_soon(embedded.supervise, say)
            await tg.start(Projector(js, db_path, notifier=notifier, log=say).run)
            publisher = Publisher(nc)
            await tg.start(Monitor(db_path, publisher, notifier=notifier, timeout=settings.heartbeat_timeout).run)
            await tg.start(SweepReactor(db_path, publisher, notifier=notifier, interval=0.2).run)
            tg.start_soon(serve_api)
            if settings.compact_after is not None:
                tg.start_soon(lambda: compact_every(js, db_path, settings.compact_after or 0.0, log=say))
            with anyio.fail_after(15):
                while not server.started:  # uvicorn exposes readiness only as a flag
                    if api_done.is_set():
                        raise LedgerError(f"HTTP server could not start on {host}:{port}")
                    await anyio.sleep(0.02)
            on_ready({"nats": url, "http": f"http://{host}:{port}", "data_dir": str(settings.data_dir),
                      "embedded_nats": embedded is not None})
            async for _ in signals:
                break
            server.should_exit = True
            with anyio.move_on_after(SHUTDOWN_S, shield=True):
                await api_done.wait()
            tg.cancel_scope.cancel()
    finally:
        stopping = True
        with anyio.CancelScope(shield=True):
            await _close(nc)


async def _check_views(db_path: Path) -> None:
    """Open the views database once before serving: one that cannot be opened (a disk full before the
    start leaves no room for its shared-memory file) is one clear line, not a failed startup."""
    import aiosqlite

    from projections.views.store import open_db

    try:
        db = await open_db(db_path)
    except aiosqlite.Error as exc:
        raise LedgerError(f"cannot open the views database {db_path}: {exc}") from exc
    await db.close()


async def _close(nc: NATS) -> None:
    """Drain the connection (bounded); a connection that cannot drain (NATS away) is closed."""
    try:
        with anyio.fail_after(SHUTDOWN_S):
            await nc.drain()
        return
    except (TimeoutError, NatsError, OSError):  # reconnecting, or NATS gone: nothing left to flush, just close
        pass
    with anyio.move_on_after(SHUTDOWN_S):
        try:
            await nc.close()
        except (NatsError, OSError):  # closing a connection to a dead server: nothing to save
            pass
