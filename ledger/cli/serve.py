"""Long-running verbs: ``ledger up``, ``ledger projector`` and ``ledger monitor``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import anyio
import click

from ledger.cli.common import console, json_option, nats_url_option, needs_server
from ledger.cli.compact import Duration


@click.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True, type=click.Path(path_type=Path),
              help="Where the embedded NATS store and the views live  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--nats-port", envvar="LEDGER_NATS_PORT", default=4222, show_default=True, type=int,
              help="Port of the embedded NATS server  [env LEDGER_NATS_PORT]")
@click.option("--http", "http", envvar="LEDGER_HTTP", default="127.0.0.1:8480", show_default=True,
              help="HOST:PORT the HTTP API listens on  [env LEDGER_HTTP]")
@click.option("--heartbeat-timeout", envvar="LEDGER_HEARTBEAT_TIMEOUT", default=300.0, show_default=True, type=float,
              help="Seconds without heartbeat before a run is crashed  [env LEDGER_HEARTBEAT_TIMEOUT]")
@click.option("--http-token", "http_token", envvar="LEDGER_HTTP_TOKEN", default=None,
              help="Every HTTP route but /health and /metrics needs Authorization: Bearer TOKEN  [env LEDGER_HTTP_TOKEN]")
@click.option("--replicas", envvar="LEDGER_REPLICAS", default=None, type=click.IntRange(1, 5),
              help="Replicas of the LEDGER stream when created (default 1, or 3 on a cluster); an existing "
                   "stream's are raised to this, never lowered  [env LEDGER_REPLICAS]")
@click.option("--compact-after", "compact_after", envvar="LEDGER_COMPACT_AFTER", default=None, type=Duration(),
              help="Now and then remove from the stream the heartbeats no view needs, of runs ended longer ago "
                   "than this (7d, 12h, 30m; needs the admin role)  [env LEDGER_COMPACT_AFTER; default: never]")
@click.option("--auth", "auth_dir", envvar="LEDGER_AUTH_DIR", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run NATS with the roles of `ledger auth init DIR`; up itself uses DIR/service.nk  [env LEDGER_AUTH_DIR]")
@click.option("--nats-tls-cert", envvar="LEDGER_NATS_TLS_CERT", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Certificate of the embedded NATS server: it then takes tls:// clients only  [env LEDGER_NATS_TLS_CERT]")
@click.option("--nats-tls-key", envvar="LEDGER_NATS_TLS_KEY", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Its private key  [env LEDGER_NATS_TLS_KEY]")
@json_option
def up(data_dir: Path, nats_url: str | None, nats_port: int, http: str, heartbeat_timeout: float,
       http_token: str | None, replicas: int | None, compact_after: float | None, auth_dir: Path | None,
       nats_tls_cert: str | None, nats_tls_key: str | None, as_json: bool) -> None:
    """Run the ledger: embedded NATS (unless --nats-url), stream, projector and HTTP API."""
    with needs_server("up"):
        import projections.http.api  # noqa: F401  (the API and its server: the extra's libraries, checked up front)
        from projections.service import UpSettings
        from projections.service import up as run_up

    def ready(info: dict[str, object]) -> None:
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            kind = "embedded" if info["embedded_nats"] else "external"
            console.print(f"ledger up: NATS {info['nats']} ({kind}), HTTP {info['http']}, data {info['data_dir']}",
                          highlight=False)
            console.print("[dim]Ctrl-C to stop[/]")
        sys.stdout.flush()

    if bool(nats_tls_cert) != bool(nats_tls_key):
        raise click.UsageError("--nats-tls-cert and --nats-tls-key go together")
    tls = (Path(nats_tls_cert), Path(nats_tls_key)) if nats_tls_cert and nats_tls_key else None
    settings = UpSettings(data_dir, nats_url, nats_port, http, heartbeat_timeout, http_token or None,
                          replicas=replicas, compact_after=compact_after, auth_dir=auth_dir,
                          nats_creds=os.environ.get("LEDGER_NATS_CREDS") or None, nats_tls=tls)
    try:
        asyncio.run(run_up(settings, ready))
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were in place: nothing had started
        pass
    if not as_json:
        console.print("ledger stopped")


@click.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True, type=click.Path(path_type=Path),
              help="Where the views database lives  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--until-idle", is_flag=True, help="Stop once the views have caught up with the stream.")
@json_option
def projector(data_dir: Path, nats_url: str | None, until_idle: bool, as_json: bool) -> None:
    """Run the projector alone: fold the stream into the views, from its checkpoint."""
    from ledger.nats.stream import DEFAULT_NATS_URL, connect, ensure_stream

    with needs_server("projector"):
        from projections.projector.projector import Projector

    def say(line: str) -> None:
        print(f"ledger projector: {line}", file=sys.stderr, flush=True)

    async def go() -> int:
        nc = await connect(nats_url or DEFAULT_NATS_URL)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            return await Projector(js, data_dir / "views.db", log=say).run(until_idle=until_idle)
        finally:
            await nc.close()

    try:
        last = asyncio.run(go())
    except KeyboardInterrupt:
        return
    if as_json:
        print(json.dumps({"last_seq": last}))
    else:
        console.print(f"views at seq {last}")




@click.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True,
              type=click.Path(path_type=Path), help="Where the views database lives  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--heartbeat-timeout", envvar="LEDGER_HEARTBEAT_TIMEOUT", default=300.0, show_default=True, type=float,
              help="Seconds without heartbeat before a run is crashed  [env LEDGER_HEARTBEAT_TIMEOUT]")
@click.option("--interval", default=1.0, show_default=True, type=float, help="Seconds between passes over the views.")
@click.option("--once", is_flag=True, help="One pass, then exit (prints what was appended).")
@json_option
def monitor(data_dir: Path, nats_url: str | None, heartbeat_timeout: float, interval: float, once: bool,
            as_json: bool) -> None:
    """Run the liveness monitor and the sweep reactor alone, from the views in --data-dir.

    Appends run.crashed (reason heartbeat-timeout) for runs silent longer than
    the timeout, run.killed for runs of cancelled sweeps, and sweep.finished for
    stopped sweeps whose runs are all done, under deterministic event ids: any
    number of monitors may run at once. `ledger up` runs one already.
    """
    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import DEFAULT_NATS_URL, connect

    with needs_server("monitor"):
        from projections.workers.reactors import Monitor, SweepReactor

    async def go() -> dict[str, int]:
        nc = await connect(nats_url or DEFAULT_NATS_URL)
        try:
            publisher = Publisher(nc)
            db_path = data_dir / "views.db"
            crash = Monitor(db_path, publisher, timeout=heartbeat_timeout, interval=interval)
            sweeps = SweepReactor(db_path, publisher, interval=interval)
            if once:
                return {"crashed": await crash.tick(), "sweep_events": await sweeps.tick()}
            async with anyio.create_task_group() as tg:
                tg.start_soon(crash.run)
                tg.start_soon(sweeps.run)
            return {}
        finally:
            await nc.close()

    try:
        result = asyncio.run(go())
    except KeyboardInterrupt:
        return
    if as_json:
        print(json.dumps(result))
    elif once:
        console.print(f"appended {result['crashed']} crash(es) and {result['sweep_events']} sweep event(s)")
