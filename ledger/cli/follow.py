"""Verbs that follow and inspect: ``ledger runs list --watch`` (the loop) and ``ledger quarantine``."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ledger.cli.common import api_get, console, http_option, json_option, print_json

WATCH_GAP_S = 0.5
"""At most one redraw this often, however fast the ledger moves."""


def since_param(since: str | None) -> str | None:
    """``--since 1h`` (or 30m, 2d, an RFC 3339 time) as the API's RFC 3339 text."""
    if since is None:
        return None
    from ledger.jobs.reader import _time_text

    try:
        return _time_text(since)
    except ValueError as exc:
        raise click.BadParameter(f"{since!r}: use a duration like 30m, 1h, 2d or an RFC 3339 time "
                                 f"with offset ({exc})", param_hint="--since") from exc


def watch_runs(http: str, params: dict[str, Any], as_json: bool) -> None:
    """Print the runs, then again each time the ledger moves, until Ctrl-C.

    Waits with ``min_seq`` long polls (no busy polling); ``--json`` prints one JSON object per update.
    """
    from ledger.cli import tables
    from ledger.jobs.reader import Reader

    reader = Reader(http)
    try:
        while True:
            seq = reader.last_seq()
            data = reader.get_json("/runs", params)
            if as_json:
                print(json.dumps({"seq": seq, **data}), flush=True)
            else:
                console.clear()
                tables.print_runs(console, data["runs"], data["next"])
                console.print(f"[dim]views at seq {seq}; watching, Ctrl-C to stop[/]", highlight=False)
            while reader.last_seq() <= seq:
                reader._get("/runs", {"min_seq": seq + 1, "timeout": "5", "limit": 1}, timeout=15, accept=(504,))
            time.sleep(WATCH_GAP_S)
    except KeyboardInterrupt:
        return


@click.command()
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=0, type=click.IntRange(0), help="Cursor: messages after this stream sequence.")
@http_option
@json_option
def quarantine(limit: int, after: int, http: str, as_json: bool) -> None:
    """List what the projector kept aside: sequence, subject, why, and the raw payload (escaped)."""
    data = api_get(http, "/quarantine", {"limit": limit, "after": after or None})
    if as_json:
        print_json(data)
        return
    from rich.markup import escape
    from rich.table import Table

    if not data["items"]:
        console.print("nothing quarantined")
        return
    table = Table(title="quarantine")
    for column in ("seq", "recorded", "subject", "reason", "raw"):
        table.add_column(column, overflow="fold")
    for item in data["items"]:
        raw = item["raw"].encode("unicode_escape").decode()
        table.add_row(str(item["seq"]), item["recorded_at"][:19].replace("T", " "), escape(item["subject"]),
                      escape(item["reason"]), escape(raw[:200] + ("…" if len(raw) > 200 else "")))
    console.print(table)
