"""Verbs that append to the stream: ``ledger emit``, ``ledger run``, ``ledger sync``."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from ledger.commands.common import (
    fail,
    json_option,
    nats_url_option,
    nats_url_or_default,
)


@click.command()
@click.argument("event", required=False)
@nats_url_option
@json_option
def emit(event: str | None, nats_url: str | None, as_json: bool) -> None:
    """Publish one event given as JSON (argument, or stdin) and print its stream sequence."""
    from ledger.publisher import Publisher
    from ledger.stream import DEFAULT_NATS_URL, connect

    payload = (event if event is not None else sys.stdin.read()).strip().encode()
    if not payload:
        fail("no event given: pass JSON as an argument or on stdin")

    async def go() -> int:
        nc = await connect(nats_url or DEFAULT_NATS_URL, reconnect=False)
        try:
            return await Publisher(nc).publish_json(payload)
        finally:
            await nc.close()

    seq = asyncio.run(go())
    print(json.dumps({"seq": seq}) if as_json else seq)




@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--run-id", default=None, help="The run's id (1-128 of [A-Za-z0-9_-]); a fresh ULID if omitted.")
@click.option("--sweep", default=None, help="The sweep this run belongs to.")
@click.option("--resume", type=click.Choice(["never", "allow", "must", "auto"]), default=None,
              help="What to do when the run id exists (CONTRACT section 2).  [default: never; auto inside Slurm]")
@click.option("--heartbeat", default=30.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between heartbeats while CMD lives.")
@click.option("--force", is_flag=True, help="Start even if the run is alive with a fresh heartbeat elsewhere.")
@click.option("--drain", default=3.0, show_default=True, type=float,
              help="Seconds to wait at the end for NATS to take spooled events.")
@nats_url_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(run_id: str | None, sweep: str | None, resume: str | None, heartbeat: float, force: bool, drain: float,
        nats_url: str | None, command: tuple[str, ...]) -> None:
    """Run CMD as a child and publish its lifecycle: ledger run [OPTIONS] -- CMD ...

    Publishes run.started (host, pid, command), a heartbeat every --heartbeat
    seconds, run.signalled for forwarded SIGINT/SIGTERM/SIGUSR1, and run.exited;
    exits with CMD's code (128+N when signal N ended it). A refused start
    (resume rules, a live twin, a closed sweep) runs nothing, prints why and
    exits 1. With NATS down the job still runs; its events wait in the spool.
    """
    from ledger.wrapper import run_command

    code = run_command(command, run_id=run_id, sweep=sweep, resume=resume, heartbeat=heartbeat, force=force,
                       nats_url=nats_url, drain=drain)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is sent or spooled and closed: skip ~30 ms of interpreter teardown


@click.command()
@nats_url_option
@click.option("--spool", "spool_path", default=None, type=click.Path(), help="Spool file  [env LEDGER_SPOOL]")
@click.option("--all", "everything", is_flag=True, help="Also send rows of processes that still run.")
@json_option
def sync(nats_url: str | None, spool_path: str | None, everything: bool, as_json: bool) -> None:
    """Send the events a dead job left in the local spool, in order."""
    from ledger.connection import Connection
    from ledger.errors import StreamUnavailable
    from ledger.spool import Outbox, Spool, owner_alive

    async def go() -> tuple[int, int]:
        spool = await Spool(spool_path).open()
        try:
            owners = [o for o in await spool.owners() if everything or not owner_alive(o)]
            if not owners:
                return 0, await spool.count()
            connection = Connection(nats_url_or_default(nats_url))
            if not await connection.try_connect():
                raise StreamUnavailable(connection.error or "cannot connect to NATS")
            outbox = Outbox(spool, owners[0], connection, also=owners[1:])
            try:
                if not await outbox.send_spooled():
                    raise StreamUnavailable(f"NATS did not take every spooled event ({outbox.sent} sent)")
            finally:
                await connection.close()
            return outbox.sent, await spool.count()
        finally:
            await spool.close()

    sent, left = asyncio.run(go())
    if as_json:
        print(json.dumps({"sent": sent, "left": left}))
    else:
        print(f"sent {sent} spooled events; {left} left (of processes still running)")
