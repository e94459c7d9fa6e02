"""Commands that change sweeps and runs: ``ledger sweep create|pause|resume|stop|cancel|next``
and ``ledger runs kill``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from ledger.cli.common import (
    api_get,
    console,
    fail,
    http_option,
    json_option,
    nats_url_option,
    nats_url_or_default,
)

T = TypeVar("T")


def _with_stream(nats_url: str | None, action: Callable[[Any, Any], Awaitable[T]]) -> T:
    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import connect

    async def go() -> T:
        nc = await connect(nats_url_or_default(nats_url), reconnect=False)
        try:
            return await action(nc.jetstream(), Publisher(nc))
        finally:
            await nc.close()

    return asyncio.run(go())


@click.group()
def sweep() -> None:
    """Change a sweep: create, pause, resume, stop, cancel; claim its next preempted run."""


def _sweep_verb(verb: str, summary: str) -> click.Command:
    @click.command(verb, help=summary)
    @click.argument("sweep_id")
    @click.option("--reason", default=None, help="Why (kept in the sweep's history).")
    @nats_url_option
    @json_option
    def command(sweep_id: str, reason: str | None, nats_url: str | None, as_json: bool) -> None:
        from ledger.nats.control import change_sweep

        state, appended = _with_stream(nats_url, lambda js, pub: change_sweep(js, pub, verb, sweep_id, reason))
        if as_json:
            print(json.dumps({"sweep_id": sweep_id, "state": state.state, "appended": appended}))
        else:
            note = "" if appended else " (already so: nothing appended)"
            console.print(f"sweep {sweep_id}: {state.state}{note}", highlight=False)

    return command


for _verb, _summary in [
    ("create", "Create a sweep; it takes runs."),
    ("pause", "Pause a sweep: its runs go on, it takes no new runs."),
    ("resume", "Resume a paused sweep."),
    ("stop", "Stop a sweep: it takes no new runs and finishes when its runs are done."),
    ("cancel", "Cancel a sweep: every non-terminal run of it is killed (SIGKILL through its wrapper)."),
]:
    sweep.add_command(_sweep_verb(_verb, _summary))


@sweep.command("next")
@click.argument("sweep_id")
@nats_url_option
@http_option
@json_option
def sweep_next(sweep_id: str, nats_url: str | None, http: str, as_json: bool) -> None:
    """Claim the oldest preempted run of a sweep and print its id (exit 1 when the queue is empty).

    Two agents asking at once never get the same run. Resume the claimed run with
    `ledger run --run-id ID --resume must --sweep SWEEP -- CMD`.
    """
    from ledger.nats.control import claim_next

    queue = api_get(http, f"/sweeps/{sweep_id}")["queue"]
    run = _with_stream(nats_url, lambda js, pub: claim_next(js, pub, queue))
    if run is None:
        if as_json:
            print(json.dumps({"run_id": None}))
        fail(f"the queue of sweep {sweep_id!r} is empty")
    if as_json:
        print(json.dumps({"run_id": run.run_id, "attempt": run.attempt}))
    else:
        print(run.run_id)


@click.command("kill")
@click.argument("run_id")
@click.option("--reason", default=None, help="Why (kept in the run's history).")
@nats_url_option
@json_option
def runs_kill(run_id: str, reason: str | None, nats_url: str | None, as_json: bool) -> None:
    """Kill a run: append run.killed; its `ledger run` wrapper SIGKILLs the process at once."""
    from ledger.nats.control import kill_run

    run, appended = _with_stream(nats_url, lambda js, pub: kill_run(js, pub, run_id, reason))
    if as_json:
        print(json.dumps({"run_id": run_id, "state": run.state, "appended": appended}))
    else:
        console.print(f"run {run_id}: {run.state}{'' if appended else ' (already so)'}", highlight=False)
