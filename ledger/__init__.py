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
    "AsyncLedger": "ledger.client", "AsyncRunHandle": "ledger.client",
    "Ledger": "ledger.sync_client", "RunHandle": "ledger.sync_client", "current_run": "ledger.sync_client",
    "LedgerError": "ledger.errors", "InvalidEvent": "ledger.errors", "ResumeRefused": "ledger.errors",
    "ConcurrencyConflict": "ledger.errors", "StreamUnavailable": "ledger.errors",
    "StartRefused": "ledger.decide", "ResumeMode": "ledger.events",
    "Reader": "ledger.reader", "ReadFailed": "ledger.reader",
}

if TYPE_CHECKING:
    from ledger import events
    from ledger.client import AsyncLedger, AsyncRunHandle
    from ledger.decide import StartRefused
    from ledger.errors import (
        ConcurrencyConflict,
        InvalidEvent,
        LedgerError,
        ResumeRefused,
        StreamUnavailable,
    )
    from ledger.events import ResumeMode
    from ledger.reader import ReadFailed, Reader
    from ledger.sync_client import Ledger, RunHandle, current_run


def __getattr__(name: str) -> Any:
    if name == "events":
        return import_module("ledger.events")
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
