"""One run's audit trail and as-of answers, read from the stream alone.

Both read only the run's (or sweep's) own subjects, ``ledger.run.<id>.>``,
with an ordered consumer filtered on them, and fold what they read with the
pure fold the projector uses (``Views``: duplicates by event id, the state
machine, its ``effect``). No views database and no full replay are involved:
this is how the stream proves what the views say.

Limits, by construction: an event id reused by *another* run or sweep (ids
should be globally unique) is a duplicate to the views but not here; and the
stream clock is taken as non-decreasing (a time cut stops at the first
message recorded after the time asked for).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import datetime
from typing import Any, Final, Literal

import msgspec
from nats.js import JetStreamContext

from ledger.errors import InvalidEvent
from ledger.events import (
    AnyEvent,
    RunCrashed,
    RunEvent,
    check_entity_id,
    decode_event,
    tag_of,
)
from ledger.fold import Recorded, Views
from ledger.machine import ALIVE, Run, Sweep, new_run
from ledger.stream import StreamMessage, read_range, recorded_at_of

Effect = Literal["applied", "unchanged", "late", "stale", "duplicate", "quarantined"]
SKIP_FIELDS: Final = frozenset({"seq"})
"""Fields not reported as changes: ``seq`` moves with every change."""


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


def _changes(before: Run | None, after: Run | None) -> dict[str, list[Any]]:
    if after is None or before == after:
        return {}
    if before is None:
        return {"state": [None, after.state]}
    out = {}
    for name in Run.__struct_fields__:
        if name in SKIP_FIELDS:
            continue
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            out[name] = [old, new]
    return out


def _why(outcome: str, event: AnyEvent, base: Run, after: Run | None, created: bool,
         first_seen: dict[str, int], changes: dict[str, list[Any]]) -> str:
    if outcome == "duplicate":
        return f"duplicate: event id {event.id} was first recorded at seq {first_seen[event.id]}"
    if outcome == "stale":
        suffix = " (it created the run)" if created else ""
        return (f"stale: fenced, the event's attempt {event.attempt} is not the run's attempt "  # type: ignore[union-attr]
                f"{base.attempt} (a zombie of another attempt){suffix}")
    if outcome == "late":
        return f"late heartbeat: the run is {base.state}; no state change"
    if outcome == "unchanged":
        if isinstance(event, RunCrashed):
            if base.state not in ALIVE:
                return f"stale crash: the run is {base.state}, not alive"
            return (f"stale crash: a heartbeat at {base.last_heartbeat_at} came after the crash's "
                    f"last_heartbeat_at {event.last_heartbeat_at}")
        return f"no-op: {tag_of(event)} changes nothing on a {base.state} run"
    if created and after is not None:
        return f"created the run as {after.state}"
    if "state" in changes:
        old, new = changes["state"]
        return f"{old} -> {new}" + (f" (attempt {after.attempt})" if "attempt" in changes and after else "")
    if "attempt" in changes and after is not None:
        return f"attempt {after.attempt}"
    return "updated " + ", ".join(changes) if changes else "applied"


def _quarantined(msg: StreamMessage, reason: str, run: Run | None) -> TimelineEntry:
    return TimelineEntry(
        seq=msg.seq, recorded_at=recorded_at_of(msg), subject=msg.subject, event_id=None, event_type=None, at=None,
        attempt=None, effect="quarantined", why=f"quarantined: {reason}", changes={}, history=False,
        state=run.state if run else None, run=run)


def run_subject(run_id: str) -> str:
    return f"ledger.run.{check_entity_id(run_id, 'run id')}.>"


def sweep_subject(sweep_id: str) -> str:
    return f"ledger.sweep.{check_entity_id(sweep_id, 'sweep id')}.>"


async def run_timeline(js: JetStreamContext, run_id: str, *, stall_timeout: float = 10.0) -> Timeline:
    """Every message on the run's subjects, in stream order, with the run's state after each."""
    views = Views()
    entries: list[TimelineEntry] = []
    first_seen: dict[str, int] = {}
    async with contextlib.aclosing(read_range(js, subject=run_subject(run_id), stall_timeout=stall_timeout)) as batches:
        async for batch in batches:
            for msg in batch:
                current = views.runs.get(run_id)
                try:
                    event = decode_event(msg.subject, msg.data)
                except InvalidEvent as exc:
                    entries.append(_quarantined(msg, exc.reason, current))
                    continue
                assert isinstance(event, RunEvent)
                base = current if current is not None else new_run(event)
                marks = len(views.history)
                outcome = views.apply(Recorded(msg.seq, recorded_at_of(msg), event))
                first_seen.setdefault(event.id, msg.seq)
                after = views.runs.get(run_id)
                changes = _changes(current, after)
                entries.append(TimelineEntry(
                    seq=msg.seq, recorded_at=recorded_at_of(msg), subject=msg.subject, event_id=event.id,
                    event_type=tag_of(event), at=event.at, attempt=event.attempt, effect=outcome,  # type: ignore[arg-type]
                    why=_why(outcome, event, base, after, current is None and after is not None, first_seen, changes),
                    changes=changes, history=len(views.history) > marks,
                    state=after.state if after else None, run=after))
    summary: Counter[str] = Counter(e.effect for e in entries)
    return Timeline(run_id=run_id, events=entries, summary=dict(summary), run=views.runs.get(run_id))


# --------------------------------------------------------------------------- as of

class AsOf(msgspec.Struct, frozen=True):
    """A cut of the stream: at sequence ``seq``, or at stream time ``time`` (both inclusive)."""

    seq: int | None = None
    time: datetime | None = None


async def _fold_until(js: JetStreamContext, subject: str, cut: AsOf, stall_timeout: float) -> Views:
    views = Views()
    async with contextlib.aclosing(read_range(js, subject=subject, stop_seq=cut.seq,
                                              stall_timeout=stall_timeout)) as batches:
        async for batch in batches:
            for msg in batch:
                recorded = recorded_at_of(msg)
                if cut.time is not None and recorded > cut.time:
                    return views
                try:
                    event = decode_event(msg.subject, msg.data)
                except InvalidEvent:
                    continue  # quarantined: changes nothing
                views.apply(Recorded(msg.seq, recorded, event))
    return views


async def run_as_of(js: JetStreamContext, run_id: str, cut: AsOf, *, stall_timeout: float = 10.0) -> Run | None:
    """The run as the ledger held it after the last of its events at or before the cut; None if unknown then."""
    views = await _fold_until(js, run_subject(run_id), cut, stall_timeout)
    return views.runs.get(run_id)


async def sweep_as_of(js: JetStreamContext, sweep_id: str, cut: AsOf, *, stall_timeout: float = 10.0) -> Sweep | None:
    """The sweep's own state after the last of its events at or before the cut; None if unknown then."""
    views = await _fold_until(js, sweep_subject(sweep_id), cut, stall_timeout)
    return views.sweeps.get(sweep_id)
