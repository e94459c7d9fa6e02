"""Verbs that append to the stream: ``ledger emit``, ``ledger run``, ``ledger sync``."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from ledger.cli.common import (
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
    """Publish one event given as JSON (argument, or stdin) and print its stream sequence.

    A missing "id" is filled with a new ULID and a missing "at" with the time
    now (UTC), so a person can type just the facts, e.g.
    {"type":"run.started","run_id":"r1"}. The event is validated before it is
    published; an event id JetStream saw within its duplicate window is
    appended once: emit then prints the first copy's sequence and says so.
    """
    raw = event.encode() if event is not None else sys.stdin.buffer.read()
    subject, payload, event_id = _event_to_emit(raw.strip())
    seq, duplicate = asyncio.run(_publish_once(nats_url_or_default(nats_url), subject, payload, event_id))
    if as_json:
        print(json.dumps({"seq": seq, "duplicate": duplicate}))
        return
    print(seq)
    if duplicate:
        print(f"duplicate: already at seq {seq} (event id {event_id} was appended before; nothing appended)",
              file=sys.stderr)


def _event_to_emit(raw: bytes) -> tuple[str, bytes, str]:
    """The subject, payload and event id of an event typed by a person: checked, with id and at filled in."""
    from ledger.core import events as ev
    from ledger.errors import LedgerError
    from ledger.ids import new_id

    if not raw:
        fail("no event given: pass JSON as an argument or on stdin")
    try:
        probe = json.loads(raw)
    except UnicodeDecodeError as exc:
        fail(f"not UTF-8: invalid byte at offset {exc.start}")
    except ValueError as exc:
        fail(f"not JSON: {exc}")
    if not isinstance(probe, dict):
        fail("an event must be a JSON object")
    kind = probe.get("type")
    if not isinstance(kind, str) or kind not in ev.EVENT_TYPES:
        given = 'no "type"' if kind is None else f"unknown event type {kind!r}"
        fail(f"{given}: use one of {', '.join(ev.EVENT_TYPES)}")
    missing = {"id": new_id(), "at": _now()}
    missing = {key: value for key, value in missing.items() if key not in probe}
    payload = json.dumps({"type": kind, **missing, **probe}, separators=(",", ":")).encode() if missing else raw
    entity = probe.get("run_id") if kind.startswith("run.") else probe.get("sweep_id")
    owner = "run_id" if kind.startswith("run.") else "sweep_id"
    if not isinstance(entity, str):
        fail(f"{kind} needs {owner}: a string of 1-128 of [A-Za-z0-9_-]")
    tag_kind, _, name = kind.partition(".")
    subject = f"ledger.{tag_kind}.{entity}.{name}"
    try:
        checked = ev.decode_event(subject, payload)
    except LedgerError as exc:
        fail(str(exc))
    return subject, payload, checked.id


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _publish_once(url: str, subject: str, payload: bytes, event_id: str) -> tuple[int, bool]:
    """Publish one message with its event id as Nats-Msg-Id: its stream sequence, and whether it was a duplicate
    (JetStream then appends nothing and answers with the first copy's sequence)."""
    import nats.errors
    from nats.js.errors import APIError, NoStreamResponseError

    from ledger.errors import PermissionDenied, StreamUnavailable
    from ledger.nats.stream import connect

    nc = await connect(url, reconnect=False)
    try:
        ack = await nc.jetstream().publish(subject, payload, timeout=5, headers={"Nats-Msg-Id": event_id})
        return int(ack.seq), bool(ack.duplicate)
    except PermissionDenied:
        raise
    except (NoStreamResponseError, nats.errors.NoRespondersError) as exc:
        raise StreamUnavailable(f"no JetStream stream takes {subject} at {url}: is `ledger up` running?") from exc
    except nats.errors.TimeoutError as exc:
        raise StreamUnavailable(f"no publish ack from {url} within 5 s") from exc
    except APIError as exc:
        raise StreamUnavailable(f"JetStream refused the publish: {exc.description} ({exc.err_code})") from exc
    finally:
        await nc.close()


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
    seconds, run.signalled for SIGINT/SIGTERM/SIGHUP/SIGUSR1 (forwarded to CMD's
    whole process group), and run.exited; exits with CMD's code (128+N when
    signal N ended it), whatever the ledger does. Under a terminal CMD gets
    its foreground (it can read stdin). A refused start
    (resume rules, a live twin, a closed sweep) runs nothing, prints why and
    exits 1. With NATS down the job still runs; its events wait in the spool.
    """
    from ledger.jobs.wrapper import run_command

    code = run_command(command, run_id=run_id, sweep=sweep, resume=resume, heartbeat=heartbeat, force=force,
                       nats_url=nats_url, drain=drain)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is sent or spooled and closed: skip ~30 ms of interpreter teardown


@click.command()
@nats_url_option
@click.option("--spool", "spool_path", default=None, type=click.Path(), help="Spool file  [env LEDGER_SPOOL]")
@click.option("--all", "everything", is_flag=True, help="Also send rows of processes that still run.")
@click.option("--any-url", is_flag=True,
              help="Also send rows spooled for another NATS url to this one (refused by default).")
@json_option
def sync(nats_url: str | None, spool_path: str | None, everything: bool, any_url: bool, as_json: bool) -> None:
    """Send the events a dead job left in the local spool, in order.

    Only rows spooled for this NATS url are sent (a row from an older spool,
    whose url is unknown, too); rows meant for another ledger are refused
    with one line per url unless --any-url. Events the server refused for good
    are kept aside in the spool and listed. Exits 1 when rows for another url
    were left unsent.
    """
    from ledger.errors import StreamUnavailable
    from ledger.jobs.spool import Outbox, RefusedRow, Spool, owner_alive
    from ledger.nats.connection import Connection

    target = nats_url_or_default(nats_url)
    lines: list[str] = []

    async def go() -> tuple[int, int, list[RefusedRow], dict[str, int]]:
        spool = await Spool(spool_path).open()
        try:
            owners = [o for o in await spool.owners() if everything or not owner_alive(o)]
            elsewhere = {} if any_url or not owners else {
                url: n for url, n in (await spool.urls(owners)).items() if url not in ("", target)}
            sent = 0
            if owners and (any_url or set(await spool.urls(owners)) - set(elsewhere)):
                connection = Connection(target)
                if not await connection.try_connect():
                    raise StreamUnavailable(connection.error or "cannot connect to NATS")
                outbox = Outbox(spool, owners[0], connection, also=owners[1:], any_url=any_url, report=lines.append)
                try:
                    if not await outbox.send_spooled():
                        raise StreamUnavailable(f"NATS did not take every spooled event ({outbox.sent} sent)")
                finally:
                    await connection.close()
                sent = outbox.sent
            return sent, await spool.count(), await spool.refused(), elsewhere
        finally:
            await spool.close()

    sent, left, refused, elsewhere = asyncio.run(go())
    for line in lines:
        print(f"ledger sync: {line}", file=sys.stderr)
    for url, n in sorted(elsewhere.items()):
        print(f"ledger sync: refused {n} event(s) spooled for {url}, not {target}: sync with --nats-url {url} "
              "(or --any-url to send them here)", file=sys.stderr)
    if as_json:
        print(json.dumps({"sent": sent, "left": left, "set_aside": len(refused), "elsewhere": sum(elsewhere.values())}))
    else:
        print(f"sent {sent} spooled events; {left} left (of processes still running, or meant for another url)")
        if refused:
            print(f"{len(refused)} event(s) refused by the ledger for good, kept aside in the spool:")
            for row in refused:
                print(f"  {row.subject} id {row.msg_id} ({row.size} bytes): {row.reason}")
    if elsewhere:
        sys.exit(1)
