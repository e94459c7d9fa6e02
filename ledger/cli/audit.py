"""Proving the views from the stream: ``ledger audit``, ``ledger replay``, ``ledger verify``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from ledger.cli.common import (
    console,
    json_option,
    nats_url_option,
    nats_url_or_default,
)
from ledger.errors import LedgerError

data_dir_option = click.option(
    "--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True, type=click.Path(path_type=Path),
    help="Where the views database lives  [env LEDGER_DATA_DIR]")

DIFFERENT = 2
"""Exit status of ``ledger verify`` when the views differ from the stream (1 is an error)."""


def _to_builtins(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


async def _with_stream(nats_url: str | None, work: Any) -> Any:
    from ledger.nats.stream import check_stream, connect

    nc = await connect(nats_url_or_default(nats_url))
    try:
        js = nc.jetstream()
        await check_stream(js)  # read only: never update_stream
        return await work(js)
    finally:
        await nc.close()


@click.command()
@click.argument("run_id")
@nats_url_option
@json_option
def audit(run_id: str, nats_url: str | None, as_json: bool) -> None:
    """Show a run's timeline from the stream: every event, the state after it, and why.

    Reads only the run's own subjects (ledger.run.RUN_ID.>) and folds them with
    the projector's own rules. Events that changed nothing are marked with
    why: a duplicate (same event id), a late heartbeat, a stale (fenced) event
    of another attempt, a stale crash, or a no-op; quarantined messages on the
    run's subjects are listed too. The same data as GET /runs/RUN_ID/events.
    """
    from projections.audit.timeline import run_timeline

    found = asyncio.run(_with_stream(nats_url, lambda js: run_timeline(js, run_id)))
    if not found.events:
        raise LedgerError(f"no message on ledger.run.{run_id}.> in the stream: unknown run {run_id!r}")
    if as_json:
        print(json.dumps(_to_builtins(found), indent=2))
        return
    from ledger.cli.tables import print_audit

    rows = [{"seq": e.seq, "recorded_at": e.recorded_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
             "event_type": e.event_type or e.subject.rsplit(".", 1)[-1], "att": e.attempt, "effect": e.effect,
             "state": e.state, "why": e.why + (" *" if e.history else "")} for e in found.events]
    print_audit(console, f"run {run_id}: {len(found.events)} messages", rows)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(found.summary.items()))
    state = f"now {found.run.state}, attempt {found.run.attempt}" if found.run else "never created"
    console.print(f"{counts}; {state}. [dim]* made a history entry[/]", highlight=False)


@click.command()
@data_dir_option
@nats_url_option
@click.option("--to-seq", default=None, type=click.IntRange(0),
              help="Rebuild only up to this stream sequence  [default: the stream's last message]")
@json_option
def replay(data_dir: Path, nats_url: str | None, to_seq: int | None, as_json: bool) -> None:
    """Rebuild every view from the stream into a fresh database and swap it in atomically.

    The new database is built beside the live one (DATA_DIR/views-N.db), then
    DATA_DIR/views.db (a symlink) is replaced in one step. The HTTP API and
    the projector of a running `ledger up`, in this or another process, keep
    serving the old views until the swap and switch at their next request or
    batch; the projector then continues from the new database's checkpoint.
    The previous generation is kept (point the symlink back to undo); older
    ones are deleted.

    With --to-seq N the swapped-in views stop at N. A running projector then
    continues from N at once (that is expected): the views catch up with the
    stream again within moments, and meanwhile readers (and that ledger's
    monitor and sweep reactor) see views that are behind. To look at the
    ledger as of N, prefer the as-of queries (ledger runs show ID --as-of-seq
    N); to keep views at N, stop `ledger up` first.
    """
    from ledger.cli.progress import progress_bar
    from projections.audit.rebuild import replay as run_replay

    async def work(js: Any) -> Any:
        from ledger.nats.stream import last_seq_on

        end = await last_seq_on(js)
        total = end if to_seq is None else min(end, to_seq)
        with progress_bar("replay", total) as bar:
            return await run_replay(js, data_dir, to_seq=to_seq, on_progress=lambda seq, _: bar(seq))

    done = asyncio.run(_with_stream(nats_url, work))
    summary = {"last_seq": done.rebuild.last_seq, "messages": done.rebuild.messages,
               "seconds": round(done.rebuild.seconds, 3), "events_per_s": round(done.rebuild.rate),
               "outcomes": dict(done.rebuild.outcomes), "views": str(done.views),
               "previous": str(done.previous) if done.previous else None, "removed": [str(p) for p in done.removed]}
    if as_json:
        print(json.dumps(summary))
        return
    previous = f" (previous: {done.previous.name})" if done.previous else ""
    console.print(f"replayed {summary['messages']:,} messages up to seq {summary['last_seq']} in "
                  f"{summary['seconds']:.1f} s ({summary['events_per_s']:,} events/s); "
                  f"swapped in {done.views.name}{previous}", highlight=False)


def _cell(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def render_report(report: Any) -> str:
    """A readable diff: which table, which key, which columns."""
    lines = []
    for name, table in report.tables.items():
        if not table.differences:
            continue
        lines.append(f"{name}: {table.differences} row(s) differ (live {table.live_rows} rows, rebuilt "
                     f"{table.rebuilt_rows})")
        for diff in table.shown:
            key = ", ".join(map(str, diff.key))
            if diff.kind == "changed":
                cols = "; ".join(f"{c} live={_cell(a)} rebuilt={_cell(b)}" for c, (a, b) in diff.columns.items())
                lines.append(f"  {key}: {cols}")
            elif diff.kind == "missing-in-live":
                lines.append(f"  {key}: missing in the live views")
            else:
                lines.append(f"  {key}: in the live views only, not in the stream's")
        if table.differences > len(table.shown):
            lines.append(f"  ... and {table.differences - len(table.shown)} more")
    return "\n".join(lines)


@click.command()
@data_dir_option
@nats_url_option
@json_option
def verify(data_dir: Path, nats_url: str | None, as_json: bool) -> None:
    """Rebuild the views from the stream and compare them with the live ones, table by table.

    The rebuild goes exactly to the live checkpoint, against one consistent
    snapshot of the live views (a running projector may go on meanwhile).
    Compares runs, sweeps, history, seen and quarantine row by row.

    Exit status: 0 the views equal the stream's, 2 they differ (the
    differences are printed: table, key, columns), 1 an error.
    """
    from ledger.cli.progress import progress_bar
    from projections.audit.compare import verify as run_verify

    async def work(js: Any) -> Any:
        import sqlite3

        live = data_dir / "views.db"
        total = None
        if live.exists():
            try:
                with sqlite3.connect(live) as con:
                    total = con.execute("SELECT last_seq FROM checkpoint").fetchone()[0]
            except sqlite3.Error:
                total = None
        with progress_bar("verify", total) as bar:
            return await run_verify(js, live, on_progress=lambda seq, _: bar(seq))

    report = asyncio.run(_with_stream(nats_url, work))
    if as_json:
        print(json.dumps(_to_builtins(report), indent=2))
    elif report.equal:
        rows = ", ".join(f"{n} {t.live_rows}" for n, t in report.tables.items())
        console.print(f"views equal the stream up to seq {report.checkpoint} ({rows})", highlight=False)
    else:
        print(f"views differ from the stream up to seq {report.checkpoint}:")
        print(render_report(report))
    if not report.equal:
        sys.exit(DIFFERENT)
