"""The read side's answer shapes (the HTTP API's Sweep and audit trail), shared by the
service that answers in them and the clients that read them. Pure msgspec structs.

A Run (``ledger.core.machine.Run``) and a history Entry (``ledger.core.fold.Entry``)
are the core's own structs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from ledger.core.machine import Run


class SweepView(msgspec.Struct, kw_only=True):
    """The contract's Sweep: state, counts of its runs per state, and its preemption queue."""

    sweep_id: str
    state: str
    created_at: datetime | None
    updated_at: datetime | None
    runs: dict[str, int]
    queue: list[str]


Effect = Literal["applied", "unchanged", "late", "stale", "duplicate", "quarantined"]


class TimelineEntry(msgspec.Struct, kw_only=True):
    """One message of a run's subjects: the event, what it did to the run, and why."""

    seq: int
    recorded_at: datetime
    subject: str
    event_id: str | None
    event_type: str | None
    at: datetime | None
    attempt: int | None
    effect: Effect
    why: str
    changes: dict[str, list[Any]]
    """Field -> [before, after] for what the event changed."""
    history: bool
    """Whether the event made a history entry (a state or attempt change)."""
    state: str | None
    """The run's state after the event (None while the run does not exist)."""
    run: Run | None
    """The whole run after the event."""


class Timeline(msgspec.Struct, kw_only=True):
    """A run's audit trail (``GET /runs/{id}/events``, ``ledger audit``)."""

    run_id: str
    events: list[TimelineEntry]
    summary: dict[str, int]
    """Count per effect."""
    run: Run | None
    """The run after its last event: what the views should hold."""
