"""``ledger up``: embedded NATS (unless given one), the stream, the projector,
the liveness monitor, the sweep reactor and the HTTP API in one process,
stopped cleanly by SIGINT or SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from ledger.errors import LedgerError
from ledger.server import EmbeddedNats, check_port_free
from ledger.stream import connect, ensure_stream


@dataclass(frozen=True)
class UpSettings:
    data_dir: Path
    nats_url: str | None
    nats_port: int
    http: str
    heartbeat_timeout: float
    http_token: str | None = None


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` (or ``:port``) into its parts; a clear error otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LedgerError(f"--http must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


async def up(settings: UpSettings, on_ready: Callable[[dict[str, object]], None]) -> None:
    """Run everything until SIGINT/SIGTERM; ``on_ready`` gets the addresses once serving."""
    from ledger.publisher import Publisher
    from projections.api import ApiState, api_server
    from projections.projector import Projector, SeqNotifier
    from projections.reactors import Monitor, SweepReactor

    host, port = parse_hostport(settings.http)
    check_port_free(host, port, "HTTP")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedNats | None = None
    url = settings.nats_url
    if url is None:
        embedded = EmbeddedNats(settings.data_dir / "nats", port=settings.nats_port)
        url = embedded.start()
    try:
        nc = await connect(url)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            notifier = SeqNotifier()
            db_path = settings.data_dir / "views.db"
            server = api_server(ApiState(db_path, notifier=notifier, js=js, http_token=settings.http_token), host, port)
            api_done = anyio.Event()

            async def serve_api() -> None:
                try:
                    await server.serve()
                finally:
                    api_done.set()

            async with anyio.create_task_group() as tg:
                await tg.start(Projector(js, db_path, notifier=notifier).run)
                publisher = Publisher(nc)
                await tg.start(Monitor(db_path, publisher, notifier=notifier, timeout=settings.heartbeat_timeout).run)
                await tg.start(SweepReactor(db_path, publisher, notifier=notifier, interval=0.2).run)
                tg.start_soon(serve_api)
                with anyio.fail_after(15):
                    while not server.started:  # uvicorn exposes readiness only as a flag
                        if api_done.is_set():
                            raise LedgerError(f"HTTP server could not start on {host}:{port}")
                        await anyio.sleep(0.02)
                on_ready({"nats": url, "http": f"http://{host}:{port}", "data_dir": str(settings.data_dir),
                          "embedded_nats": embedded is not None})
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                server.should_exit = True
                with anyio.move_on_after(10, shield=True):
                    await api_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await nc.drain()
    finally:
        if embedded is not None:
            embedded.stop()
