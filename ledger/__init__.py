"""run-ledger: the lifecycle of every run and sweep, as events in NATS JetStream.

The job-side surface::

    from ledger import Ledger, current_run

    ledger = Ledger.connect()                      # $LEDGER_NATS_URL, else nats://127.0.0.1:4222
    with ledger.run("train-42", sweep="s1", resume="allow") as run:
        run.heartbeat(step=10, progress=0.1)

``AsyncLedger`` is the same for async code; ``Reader`` reads runs and sweeps
back through the HTTP API. ``current_run()`` attaches to the
run of an enclosing ``ledger run -- CMD`` wrapper. Errors are ``LedgerError``
and its subclasses. Names are imported on first use, so that the command line
starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncLedger", "AsyncRunHandle", "ConcurrencyConflict", "InvalidEvent", "Ledger", "LedgerError",
    "ReadFailed", "Reader", "ResumeMode", "ResumeRefused", "RunHandle", "StartRefused", "StreamUnavailable", "current_run", "events",
]

_WHERE = {
    "AsyncLedger": "ledger.jobs.client", "AsyncRunHandle": "ledger.jobs.client",
    "Ledger": "ledger.jobs.sync_client", "RunHandle": "ledger.jobs.sync_client", "current_run": "ledger.jobs.sync_client",
    "LedgerError": "ledger.errors", "InvalidEvent": "ledger.errors", "ResumeRefused": "ledger.errors",
    "ConcurrencyConflict": "ledger.errors", "StreamUnavailable": "ledger.errors",
    "StartRefused": "ledger.core.decide", "ResumeMode": "ledger.core.events",
    "Reader": "ledger.jobs.reader", "ReadFailed": "ledger.jobs.reader",
}

if TYPE_CHECKING:
    from ledger.core import events
    from ledger.core.decide import StartRefused
    from ledger.core.events import ResumeMode
    from ledger.errors import (
        ConcurrencyConflict,
        InvalidEvent,
        LedgerError,
        ResumeRefused,
        StreamUnavailable,
    )
    from ledger.jobs.client import AsyncLedger, AsyncRunHandle
    from ledger.jobs.reader import Reader, ReadFailed
    from ledger.jobs.sync_client import Ledger, RunHandle, current_run


def __getattr__(name: str) -> Any:
    if name == "events":
        return import_module("ledger.core.events")
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
