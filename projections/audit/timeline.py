"""One run's audit trail and as-of answers, read from the stream alone.

Both read only the run's (or sweep's) own subjects, ``ledger.run.<id>.>``,
with an ordered consumer filtered on them, and fold what they read with the
pure fold the projector uses (``Views``: duplicates by event id, the state
machine, its ``effect``). No views database and no full replay are involved:
this is how the stream proves what the views say.

A sweep implied by a run event (CONTRACT section 2: it exists from the first
run event that names it) has no message of its own before that event, so its
as-of also searches the ``run.queued`` and ``run.started`` subjects before
the sweep's first own message for the event that implied it.

A heartbeat delivered again is ``late`` (or ``stale``), not ``duplicate``:
the views do not remember heartbeat ids (``ledger.core.fold.remembers``), the
monotonic heartbeat rule makes the copy a no-op, and this trail says so.

Limits, by construction: an event id reused by *another* run or sweep (ids
should be globally unique) is a duplicate to the views but not here; and the
stream clock is taken as non-decreasing (a time cut stops at the first
message recorded after the time asked for).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import datetime
from typing import Any, Final

import msgspec
from nats.js import JetStreamContext

from ledger.core.events import (
    AnyEvent,
    RunCrashed,
    RunEvent,
    RunHeartbeat,
    RunStarted,
    check_entity_id,
    decode_event,
    tag_of,
)
from ledger.core.fold import Recorded, Views, as_run
from ledger.core.machine import HEARTBEAT_ENDED, Run, Sweep, crash_ignored, new_run
from ledger.core.shapes import Timeline, TimelineEntry
from ledger.errors import InvalidEvent
from ledger.nats.entity import implied_by, implied_sweep, recorded_on
from ledger.nats.stream import StreamMessage, read_range, recorded_at_of

SKIP_FIELDS: Final = frozenset({"seq"})
"""Fields not reported as changes: ``seq`` moves with every change (and the contract's Run is compared:
``last_seen_at``, the views' own stamp, is not a field of it)."""


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
        if isinstance(event, RunStarted):
            return (f"stale start: the run already started attempt {base.attempt}, and this start's "
                    f"attempt {event.attempt} is not higher; no change")
        return (f"stale: fenced, the event's attempt {event.attempt} is not the run's attempt "  # type: ignore[union-attr]
                f"{base.attempt} (a zombie of another attempt){suffix}")
    if outcome == "late":
        if isinstance(event, RunHeartbeat) and base.state not in HEARTBEAT_ENDED:
            if base.last_heartbeat_at is not None and event.at == base.last_heartbeat_at:
                return (f"late heartbeat: at the instant of the last one applied in attempt {base.attempt} "
                        f"({base.last_heartbeat_at}), so that one delivered again or its twin; no change")
            return (f"late heartbeat: older (at {event.at}) than the last one applied in attempt {base.attempt} "
                    f"(at {base.last_heartbeat_at}); no change")
        return f"late heartbeat: the run is {base.state}; no state change"
    if outcome == "unchanged":
        if isinstance(event, RunCrashed):
            match crash_ignored(base, event):
                case "not-alive":
                    return f"stale crash: the run is {base.state}, not alive"
                case "heartbeat-after":
                    return (f"stale crash: a heartbeat at {base.last_heartbeat_at} came after the crash's "
                            f"last_heartbeat_at {event.last_heartbeat_at}")
                case None:
                    pass
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
        state=run.state if run else None, run=as_run(run) if run else None)


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
                made_entry = any(kind == "run" for kind, _, _ in views.history[marks:])
                entries.append(TimelineEntry(
                    seq=msg.seq, recorded_at=recorded_at_of(msg), subject=msg.subject, event_id=event.id,
                    event_type=tag_of(event), at=event.at, attempt=event.attempt, effect=outcome,  # type: ignore[arg-type]
                    why=_why(outcome, event, base, after, current is None and after is not None, first_seen, changes),
                    changes=changes, history=made_entry,
                    state=after.state if after else None, run=as_run(after) if after else None))
    summary: Counter[str] = Counter(e.effect for e in entries)
    final = views.runs.get(run_id)
    return Timeline(run_id=run_id, events=entries, summary=dict(summary), run=as_run(final) if final else None)


# --------------------------------------------------------------------------- as of

class AsOf(msgspec.Struct, frozen=True):
    """A cut of the stream: at sequence ``seq``, or at stream time ``time`` (both inclusive)."""

    seq: int | None = None
    time: datetime | None = None


async def _fold_until(js: JetStreamContext, subject: str, cut: AsOf, stall_timeout: float) -> Views:
    views = Views()
    async with contextlib.aclosing(recorded_on(js, subject, stop_seq=cut.seq, until=cut.time,
                                               stall_timeout=stall_timeout)) as events:
        async for rec in events:
            views.apply(rec)
    return views


async def run_as_of(js: JetStreamContext, run_id: str, cut: AsOf, *, stall_timeout: float = 10.0) -> Run | None:
    """The run as the ledger held it after the last of its events at or before the cut; None if unknown then."""
    views = await _fold_until(js, run_subject(run_id), cut, stall_timeout)
    run = views.runs.get(run_id)
    return as_run(run) if run is not None else None


async def sweep_as_of(js: JetStreamContext, sweep_id: str, cut: AsOf, *, stall_timeout: float = 10.0) -> Sweep | None:
    """The sweep's own state after the last of its events at or before the cut; None if unknown then.

    A sweep a run event implied exists from that event (``implied_by``), as
    the views have it: ``running``, created at that event's time.
    """
    own: list[Recorded] = []
    async with contextlib.aclosing(recorded_on(js, sweep_subject(sweep_id), stop_seq=cut.seq, until=cut.time,
                                               stall_timeout=stall_timeout)) as events:
        async for rec in events:
            own.append(rec)
    stop = cut.seq if not own else min(own[0].seq - 1, cut.seq if cut.seq is not None else own[0].seq)
    views = Views()
    implied = await implied_by(js, sweep_id, stop_seq=stop, until=cut.time, stall_timeout=stall_timeout)
    if implied is not None:
        views.sweeps[sweep_id] = implied_sweep(sweep_id, implied)
    for rec in own:
        views.apply(rec)
    return views.sweeps.get(sweep_id)
