"""The ``ledger`` command line: the group, and where each verb comes from.

Each verb's module is imported only when that verb runs (or when ``--help``
lists them all): ``ledger run`` must not pay for the HTTP server, the tables
or the audit code before it starts its child.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import click

from ledger.errors import LedgerError

VERBS: dict[str, str] = {
    "up": "ledger.cli.serve:up",
    "projector": "ledger.cli.serve:projector",
    "monitor": "ledger.cli.serve:monitor",
    "emit": "ledger.cli.publish:emit",
    "run": "ledger.cli.publish:run",
    "sync": "ledger.cli.publish:sync",
    "sweep": "ledger.cli.sweep:sweep",
    "runs": "ledger.cli.query:runs",
    "sweeps": "ledger.cli.query:sweeps",
    "events": "ledger.cli.events:events",
    "audit": "ledger.cli.audit:audit",
    "replay": "ledger.cli.audit:replay",
    "verify": "ledger.cli.audit:verify",
    "compact": "ledger.cli.compact:compact",
    "quarantine": "ledger.cli.follow:quarantine",
    "status": "ledger.cli.status:status",
    "auth": "ledger.cli.auth:auth",
}
"""Verb -> ``module:attribute`` of its click command, in the order ``--help`` lists them."""

SUBVERBS: dict[str, dict[str, str]] = {
    "runs": {"kill": "ledger.cli.sweep:runs_kill"},
}
"""Verbs of a group that live in another module than the group itself."""


def _load(spec: str) -> click.Command:
    module, _, name = spec.partition(":")
    command = getattr(import_module(module), name)
    assert isinstance(command, click.Command), spec
    return command


class LedgerGroup(click.Group):
    """Loads each verb's module on first use, and turns LedgerError anywhere below into one line and exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*VERBS, *(name for name in super().list_commands(ctx) if name not in VERBS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in VERBS:
            return super().get_command(ctx, cmd_name)
        command = _load(VERBS[cmd_name])
        if isinstance(command, click.Group):
            for sub, spec in SUBVERBS.get(cmd_name, {}).items():
                if sub not in command.commands:
                    command.add_command(_load(spec), sub)
        self.add_command(command, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LedgerError as exc:
            from ledger.cli.common import fail

            fail(str(_refusal_in(exc) or exc))


def _refusal_in(exc: BaseException) -> BaseException | None:
    """The server's permission refusal behind an error, if any: it is what the user must hear."""
    from ledger.errors import PermissionDenied

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PermissionDenied):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="run-ledger")
def main() -> None:
    """run-ledger: the lifecycle of every run and sweep, as events in NATS JetStream."""

