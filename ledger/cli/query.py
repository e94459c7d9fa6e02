"""Query verbs: ``ledger runs list|show|history`` and ``ledger sweeps list|show``."""

from __future__ import annotations

import click

from ledger.cli.common import (
    api_get,
    console,
    http_option,
    json_option,
    print_json,
)


def _tables():  # type: ignore[no-untyped-def]
    from ledger.cli import tables

    return tables


@click.group()
def runs() -> None:
    """Query runs: list, show, history."""


@runs.command("list")
@click.option("--sweep", default=None, help="Only runs of this sweep.")
@click.option("--state", default=None, help="Only runs in this state.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Cursor: list runs after this run id.")
@click.option("--sort", type=click.Choice(["run_id", "started"]), default="run_id", show_default=True,
              help="run_id, or started: newest first.")
@click.option("--since", default=None, metavar="WHEN", help="Only runs started since: 30m, 1h, 2d or an RFC 3339 time.")
@click.option("--prefix", default=None, help="Only runs whose id starts with this.")
@click.option("--watch", is_flag=True, help="Print again each time the ledger moves, until Ctrl-C.")
@http_option
@json_option
def runs_list(sweep: str | None, state: str | None, limit: int, after: str | None, sort: str, since: str | None,
              prefix: str | None, watch: bool, http: str, as_json: bool) -> None:
    """List runs, in run id order or newest first (--sort started)."""
    from ledger.cli.follow import since_param, watch_runs

    params = {"sweep": sweep, "state": state, "limit": limit, "after": after, "prefix": prefix,
              "sort": None if sort == "run_id" else sort, "since": since_param(since)}
    if watch:
        return watch_runs(http, params, as_json)
    data = api_get(http, "/runs", params)
    print_json(data) if as_json else _tables().print_runs(console, data["runs"], data["next"])


as_of_option = click.option("--as-of", "as_of", default=None, metavar="TIME",
                            help="As the ledger held it at TIME (RFC 3339 with offset, stream clock), "
                                 "e.g. 2026-11-25T03:12:00Z; read from the stream.")
as_of_seq_option = click.option("--as-of-seq", "as_of_seq", default=None, type=click.IntRange(0), metavar="N",
                                help="As the ledger held it at stream sequence N; read from the stream.")


def _as_of_params(as_of: str | None, as_of_seq: int | None) -> dict[str, object]:
    if as_of is not None and as_of_seq is not None:
        raise click.UsageError("give --as-of or --as-of-seq, not both")
    return {"as_of": as_of, "as_of_seq": as_of_seq}


@runs.command("show")
@click.argument("run_id")
@as_of_option
@as_of_seq_option
@http_option
@json_option
def runs_show(run_id: str, as_of: str | None, as_of_seq: int | None, http: str, as_json: bool) -> None:
    """Show one run's current state, or its state at a past time or sequence."""
    data = api_get(http, f"/runs/{run_id}", _as_of_params(as_of, as_of_seq))
    print_json(data) if as_json else _tables().print_record(console, f"run {run_id}", data)


@runs.command("history")
@click.argument("run_id")
@http_option
@json_option
def runs_history(run_id: str, http: str, as_json: bool) -> None:
    """Show every state a run went through."""
    data = api_get(http, f"/runs/{run_id}/history")
    print_json(data) if as_json else _tables().print_history(console, f"history of run {run_id}", data["history"])


@click.group()
def sweeps() -> None:
    """Query sweeps: list, show."""


@sweeps.command("list")
@http_option
@json_option
def sweeps_list(http: str, as_json: bool) -> None:
    """List sweeps with the count of their runs per state."""
    data = api_get(http, "/sweeps")
    print_json(data) if as_json else _tables().print_sweeps(console, data["sweeps"])


@sweeps.command("show")
@click.argument("sweep_id")
@as_of_option
@as_of_seq_option
@http_option
@json_option
def sweeps_show(sweep_id: str, as_of: str | None, as_of_seq: int | None, http: str, as_json: bool) -> None:
    """Show one sweep: state, runs per state, preemption queue (now, or at a past time or sequence)."""
    data = api_get(http, f"/sweeps/{sweep_id}", _as_of_params(as_of, as_of_seq))
    print_json(data) if as_json else _tables().print_record(console, f"sweep {sweep_id}", data)

