"""The ``ledger`` command line: ``up``, ``emit`` and the query verbs."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console

from ledger import tables
from ledger.errors import LedgerError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

nats_url_option = click.option("--nats-url", envvar="LEDGER_NATS_URL", default=None,
                               help="NATS server URL  [env LEDGER_NATS_URL; default nats://127.0.0.1:4222]")
http_option = click.option("--http", "http", envvar="LEDGER_HTTP", default="127.0.0.1:8480", show_default=True,
                           help="HOST:PORT of the ledger HTTP API  [env LEDGER_HTTP]")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


class LedgerGroup(click.Group):
    """Turns LedgerError anywhere below into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LedgerError as exc:
            fail(str(exc))


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="run-ledger")
def main() -> None:
    """run-ledger: the lifecycle of every run and sweep, as events in NATS JetStream."""


@main.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True, type=click.Path(path_type=Path),
              help="Where the embedded NATS store and the views live  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--nats-port", envvar="LEDGER_NATS_PORT", default=4222, show_default=True, type=int,
              help="Port of the embedded NATS server  [env LEDGER_NATS_PORT]")
@click.option("--http", "http", envvar="LEDGER_HTTP", default="127.0.0.1:8480", show_default=True,
              help="HOST:PORT the HTTP API listens on  [env LEDGER_HTTP]")
@click.option("--heartbeat-timeout", envvar="LEDGER_HEARTBEAT_TIMEOUT", default=300.0, show_default=True, type=float,
              help="Seconds without heartbeat before a run is crashed  [env LEDGER_HEARTBEAT_TIMEOUT]")
@json_option
def up(data_dir: Path, nats_url: str | None, nats_port: int, http: str, heartbeat_timeout: float, as_json: bool) -> None:
    """Run the ledger: embedded NATS (unless --nats-url), stream, projector and HTTP API."""
    from ledger.up import UpSettings
    from ledger.up import up as run_up

    def ready(info: dict[str, object]) -> None:
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            kind = "embedded" if info["embedded_nats"] else "external"
            console.print(f"ledger up: NATS {info['nats']} ({kind}), HTTP {info['http']}, data {info['data_dir']}",
                          highlight=False)
            console.print("[dim]Ctrl-C to stop[/]")
        sys.stdout.flush()

    settings = UpSettings(data_dir, nats_url, nats_port, http, heartbeat_timeout)
    asyncio.run(run_up(settings, ready))
    if not as_json:
        console.print("ledger stopped")


@main.command()
@click.option("--data-dir", envvar="LEDGER_DATA_DIR", default="./.ledger", show_default=True, type=click.Path(path_type=Path),
              help="Where the views database lives  [env LEDGER_DATA_DIR]")
@nats_url_option
@click.option("--until-idle", is_flag=True, help="Stop once the views have caught up with the stream.")
@json_option
def projector(data_dir: Path, nats_url: str | None, until_idle: bool, as_json: bool) -> None:
    """Run the projector alone: fold the stream into the views, from its checkpoint."""
    from ledger.stream import DEFAULT_NATS_URL, connect, ensure_stream
    from projections.projector import Projector

    async def go() -> int:
        nc = await connect(nats_url or DEFAULT_NATS_URL)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            return await Projector(js, data_dir / "views.db").run(until_idle=until_idle)
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


@main.command()
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


def _get(http: str, path: str, params: dict[str, Any] | None = None) -> Any:
    url = f"http://{http}{path}"
    try:
        resp = httpx.get(url, params={k: v for k, v in (params or {}).items() if v is not None}, timeout=10)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the ledger API at http://{http} ({type(exc).__name__}); is `ledger up` running?")
    if resp.status_code >= 400:
        try:
            message = resp.json().get("error", resp.text)
        except ValueError:
            message = resp.text
        fail(message)
    return resp.json()


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


@main.group()
def runs() -> None:
    """Query runs: list, show, history."""


@runs.command("list")
@click.option("--sweep", default=None, help="Only runs of this sweep.")
@click.option("--state", default=None, help="Only runs in this state.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Cursor: list runs after this run id.")
@http_option
@json_option
def runs_list(sweep: str | None, state: str | None, limit: int, after: str | None, http: str, as_json: bool) -> None:
    """List runs, in run id order."""
    data = _get(http, "/runs", {"sweep": sweep, "state": state, "limit": limit, "after": after})
    _emit_json(data) if as_json else tables.print_runs(console, data["runs"], data["next"])


@runs.command("show")
@click.argument("run_id")
@http_option
@json_option
def runs_show(run_id: str, http: str, as_json: bool) -> None:
    """Show one run's current state."""
    data = _get(http, f"/runs/{run_id}")
    _emit_json(data) if as_json else tables.print_record(console, f"run {run_id}", data)


@runs.command("history")
@click.argument("run_id")
@http_option
@json_option
def runs_history(run_id: str, http: str, as_json: bool) -> None:
    """Show every state a run went through."""
    data = _get(http, f"/runs/{run_id}/history")
    _emit_json(data) if as_json else tables.print_history(console, f"history of run {run_id}", data["history"])


@main.group()
def sweeps() -> None:
    """Query sweeps: list, show."""


@sweeps.command("list")
@http_option
@json_option
def sweeps_list(http: str, as_json: bool) -> None:
    """List sweeps with the count of their runs per state."""
    data = _get(http, "/sweeps")
    _emit_json(data) if as_json else tables.print_sweeps(console, data["sweeps"])


@sweeps.command("show")
@click.argument("sweep_id")
@http_option
@json_option
def sweeps_show(sweep_id: str, http: str, as_json: bool) -> None:
    """Show one sweep: state, runs per state, preemption queue."""
    data = _get(http, f"/sweeps/{sweep_id}")
    _emit_json(data) if as_json else tables.print_record(console, f"sweep {sweep_id}", data)


if __name__ == "__main__":
    main()
