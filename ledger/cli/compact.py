"""``ledger compact``: remove from the stream the heartbeats no view depends on (an admin verb)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from ledger.cli.common import console, json_option, nats_url_option, nats_url_or_default, needs_server
from ledger.errors import LedgerError


def parse_duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``45s``, ``0s`` (or sums like ``1d12h``); LedgerError otherwise."""
    units = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    rest, total, number = text.strip().lower(), 0.0, ""
    if not rest:
        raise LedgerError("a duration is a number and a unit, like 7d, 12h, 30m or 0s")
    for char in rest:
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            try:
                total += float(number) * units[char]
            except ValueError:
                raise LedgerError(f"not a duration: {text!r} (like 7d, 12h, 30m or 0s)") from None
            number = ""
        else:
            raise LedgerError(f"not a duration: {text!r} (like 7d, 12h, 30m or 0s)")
    if number:
        raise LedgerError(f"not a duration: {text!r}: {number} needs a unit (d, h, m or s)")
    return total


class Duration(click.ParamType):
    """``7d``, ``12h``, ``30m``, ``0s`` (or sums like ``1d12h``), as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except LedgerError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True,
              type=click.Path(path_type=Path), help="Where the views database lives  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--older-than", "older_than", default="7d", show_default=True, type=Duration(),
              help="Only runs that ended more than this long ago (7d, 12h, 30m, 0s)")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@json_option
def compact(data_dir: Path, nats_url: str | None, older_than: float, dry_run: bool, as_json: bool) -> None:
    """Remove from the stream the heartbeats of ended runs that no view depends on.

    Looks at runs that ended (finished, failed, killed, preempted, crashed)
    more than --older-than ago, by the ledger's clock, and removes the
    heartbeats whose absence changes nothing: what stays is every state
    change, the heartbeats that revived a run, the last heartbeat before each
    other event (the last of each attempt among them) and any whose step or
    progress no later one replaced. Afterwards `ledger verify` still holds and
    every run's view and history are unchanged; as-of reads inside compacted
    ranges are approximate for last_heartbeat_at, step and progress.

    Needs the admin role on a ledger with credentials. Prints what it freed.
    """
    with needs_server("compact"):
        from projections.workers.compaction import compact as run_compact
        from projections.workers.compaction import human_bytes

    from ledger.cli.progress import progress_bar
    from ledger.nats.stream import check_stream, connect

    async def work() -> Any:
        nc = await connect(nats_url_or_default(nats_url))
        try:
            js = nc.jetstream()
            await check_stream(js)
            with progress_bar("compact", None, unit="runs") as bar:
                return await run_compact(js, data_dir / "views.db", older_than=older_than, dry_run=dry_run,
                                         on_progress=lambda done, total: bar(done))
        finally:
            await nc.close()

    done = asyncio.run(work())
    summary = {
        "dry_run": done.dry_run, "horizon": done.horizon.isoformat(), "checkpoint": done.checkpoint,
        "runs_examined": done.runs_examined, "runs_compacted": done.runs_compacted,
        "messages_examined": done.messages_examined, "messages_removed": done.messages_removed,
        "bytes_removed": done.bytes_removed, "stream_messages_before": done.stream_before[0],
        "stream_bytes_before": done.stream_before[1], "stream_messages_after": done.stream_after[0],
        "stream_bytes_after": done.stream_after[1], "seconds": round(done.seconds, 3),
        "messages_per_s": round(done.rate), "kept_whole": done.kept_whole,
    }
    if as_json:
        print(json.dumps(summary))
        return
    verb = "would remove" if dry_run else "removed"
    line = (f"{verb} {done.messages_removed:,} heartbeat(s) of {done.runs_compacted:,} run(s) "
            f"({human_bytes(done.bytes_removed)}); looked at {done.runs_examined:,} run(s) ended before "
            f"{done.horizon:%Y-%m-%d %H:%M:%S} UTC, {done.messages_examined:,} message(s)")
    if not dry_run:
        line += (f"; stream {human_bytes(done.stream_before[1])} -> {human_bytes(done.stream_after[1])} "
                 f"in {done.seconds:.1f} s")
    console.print(line, highlight=False)
