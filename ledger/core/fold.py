"""Folding recorded events into views: the whole projection logic, without I/O.

The projector loads the rows a batch touches into a ``Views``, applies the
batch here, and writes back what changed; tests fold whole streams in memory.
Both give the same answer by construction.

A sweep exists from its first event, or from the first run event that names
it (CONTRACT section 2): a ``run.queued`` or ``run.started`` whose
``sweep_id`` the run takes on creates an unknown sweep as ``running``, at
that event's time, with a history entry of its own. So a run never points at
a sweep the views cannot show. A reader that folds a batch onto loaded rows
must load the sweeps its run events name (``naming_sweep``), or it would
take a known sweep for a new one.

Duplicates (CONTRACT section 1: a duplicate changes nothing, however late)
are caught by the ``seen`` ids, except heartbeats, which the views do not
remember one by one (section 9: views grow with state changes, not with
heartbeats). A heartbeat that names the run's attempt (or an earlier one) is
a no-op when it comes again by reasoning alone (``remembers``): within its
attempt ``last_heartbeat_at`` never moves back and a heartbeat not later
than it is ``late`` (``machine.late``), another attempt fences it, and
attempts only go up. Heartbeats that name no attempt, or one the run has not
started yet, are remembered like any other event: a later attempt clears
``last_heartbeat_at``, so they could apply again. A re-delivered heartbeat
therefore answers ``late`` (or ``stale``), not ``duplicate``. The price: an
event that reuses the id of a forgotten heartbeat (ids are the producer's
and must be unique) is not caught as its duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal, TypeAlias

import msgspec
from msgspec import structs
from msgspec.structs import replace

from ledger.core.events import (
    AnyEvent,
    RunEvent,
    RunHeartbeat,
    RunQueued,
    RunStarted,
    SweepEvent,
    tag_of,
)
from ledger.core.machine import (
    Effect,
    Run,
    Sweep,
    evolve_sweep,
    new_run,
    new_sweep,
    reason_of,
    step,
)

Kind: TypeAlias = Literal["run", "sweep"]


def naming_sweep(event: AnyEvent) -> str | None:
    """The sweep a run event names (``sweep_id`` of ``run.queued`` / ``run.started``), if any."""
    kind = type(event)
    if kind is RunStarted or kind is RunQueued:
        return event.sweep_id  # type: ignore[union-attr]
    return None


def remembers(run: Run | None, event: AnyEvent) -> bool:
    """Whether the views keep the event's id in ``seen``: every event but a heartbeat whose
    re-delivery is a no-op by reasoning (it names an attempt the run already has, or an older one)."""
    if type(event) is not RunHeartbeat:
        return True
    attempt = event.attempt
    return attempt is None or attempt > (run.attempt if run is not None else 1)


class Recorded(msgspec.Struct, frozen=True, gc=False):
    """An event as the stream recorded it: its sequence and the stream's clock."""

    seq: int
    recorded_at: datetime
    event: AnyEvent


class RecordedRun(Run, frozen=True, kw_only=True, gc=False):
    """A run as the views keep it: the contract's Run, plus when the stream recorded the last event
    applied to it (``last_seen_at``, the ledger's clock, never the producer's). Liveness measures
    silence from there (CONTRACT section 2). Stamped by the fold, like ``seq``; readers show ``as_run``.
    """

    last_seen_at: datetime | None = None


def recorded_run(run: Run, seq: int, recorded_at: datetime) -> RecordedRun:
    """``run`` stamped with the stream's sequence and clock of the event just applied to it."""
    if type(run) is RecordedRun:
        return replace(run, seq=seq, last_seen_at=recorded_at)
    return RecordedRun(**{**structs.asdict(run), "seq": seq, "last_seen_at": recorded_at})


def as_run(run: Run) -> Run:
    """The contract's Run shape of a run the views keep (what the API and the audit show)."""
    if type(run) is Run:
        return run
    return Run(**{name: getattr(run, name) for name in Run.__struct_fields__})


class Entry(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One state change of a run or sweep (the contract's history Entry)."""

    state: str
    at: datetime
    recorded_at: datetime
    seq: int
    event_id: str
    event_type: str
    reason: str | None = None


class Views:
    """Current runs and sweeps, history entries and seen event ids: a mutable accumulator."""

    def __init__(
        self,
        runs: dict[str, Run] | None = None,
        sweeps: dict[str, Sweep] | None = None,
        seen: set[str] | None = None,
    ) -> None:
        self.runs = runs if runs is not None else {}
        self.sweeps = sweeps if sweeps is not None else {}
        self.seen = seen if seen is not None else set()
        self.history: list[tuple[Kind, str, Entry]] = []
        self.dirty_runs: set[str] = set()
        self.dirty_sweeps: set[str] = set()
        self.new_ids: list[tuple[str, int]] = []

    def apply(self, rec: Recorded) -> Effect | Literal["duplicate"]:
        """Apply one recorded event; return what it did."""
        event = rec.event
        event_id = event.id
        seen = self.seen
        if event_id in seen:
            return "duplicate"
        if isinstance(event, RunEvent):
            run_id = event.run_id
            old_run = self.runs.get(run_id)
            if remembers(old_run, event):
                seen.add(event_id)
                self.new_ids.append((event_id, rec.seq))
            if old_run is None:
                result, run = step(new_run(event), event)  # type: ignore[arg-type]
            else:
                result, run = step(old_run, event)  # type: ignore[arg-type]
                if result != "applied":
                    return result
            self.runs[run_id] = run = recorded_run(run, rec.seq, rec.recorded_at)
            self.dirty_runs.add(run_id)
            if old_run is None or old_run.state != run.state or old_run.attempt != run.attempt:
                self.history.append(("run", run_id, self._entry(run.state, rec)))
            sweep_id = naming_sweep(event)
            if sweep_id is not None and sweep_id == run.sweep_id and sweep_id not in self.sweeps:
                self._imply_sweep(sweep_id, rec, run_id)
            return "applied"
        assert isinstance(event, SweepEvent)
        seen.add(event_id)
        self.new_ids.append((event_id, rec.seq))
        old_sweep = self.sweeps.get(event.sweep_id)
        base_sweep = old_sweep if old_sweep is not None else new_sweep(event)  # type: ignore[arg-type]
        sweep = evolve_sweep(base_sweep, event)  # type: ignore[arg-type]
        if sweep == base_sweep and old_sweep is not None:
            return "unchanged"
        sweep = replace(sweep, seq=rec.seq)
        self.sweeps[sweep.sweep_id] = sweep
        self.dirty_sweeps.add(sweep.sweep_id)
        self.history.append(("sweep", sweep.sweep_id, self._entry(sweep.state, rec)))
        return "applied"

    def _imply_sweep(self, sweep_id: str, rec: Recorded, run_id: str) -> None:
        """A run event named a sweep never seen: the sweep exists from it, ``running``, at the event's time."""
        at = rec.event.at
        self.sweeps[sweep_id] = Sweep(sweep_id=sweep_id, created_at=at, updated_at=at, seq=rec.seq)
        self.dirty_sweeps.add(sweep_id)
        self.history.append(("sweep", sweep_id, self._entry("running", rec, f"implied by run {run_id}")))

    @staticmethod
    def _entry(state: str, rec: Recorded, reason: str | None = None) -> Entry:
        return Entry(
            state=state,
            at=rec.event.at,
            recorded_at=rec.recorded_at,
            seq=rec.seq,
            event_id=rec.event.id,
            event_type=tag_of(rec.event),
            reason=reason if reason is not None else reason_of(rec.event),
        )

    def fold(self, batch: Iterable[Recorded]) -> Views:
        """Apply a batch in order; return self for chaining."""
        for rec in batch:
            self.apply(rec)
        return self
