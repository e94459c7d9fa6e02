"""The ``ledger`` command line: the group, and where each verb comes from."""

from __future__ import annotations

from typing import Any

import click

from ledger.commands.audit import audit, replay, verify
from ledger.commands.common import fail
from ledger.commands.control import runs_kill, sweep
from ledger.commands.events import events
from ledger.commands.publish import emit, run, sync
from ledger.commands.query import runs, sweeps
from ledger.commands.serve import monitor, projector, up
from ledger.errors import LedgerError


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


for command in (up, projector, monitor, emit, run, sync, sweep, runs, sweeps):
    main.add_command(command)
runs.add_command(runs_kill)
for command in (events, audit, replay, verify):  # audit and replay (issue 5)
    main.add_command(command)
main.add_command(__import__("ledger.commands.follow", fromlist=["quarantine"]).quarantine)  # issue 11


if __name__ == "__main__":
    main()
