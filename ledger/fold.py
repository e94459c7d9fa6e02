"""Folding recorded events into views: the whole projection logic, without I/O.

The projector loads the rows a batch touches into a ``Views``, applies the
batch here, and writes back what changed; tests fold whole streams in memory.
Both give the same answer by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal, TypeAlias

import msgspec
from msgspec.structs import replace

from ledger.events import AnyEvent, RunEvent, SweepEvent, tag_of
from ledger.machine import Effect, Run, Sweep, evolve_sweep, new_run, new_sweep, reason_of, step

Kind: TypeAlias = Literal["run", "sweep"]


class Recorded(msgspec.Struct, frozen=True):
    """An event as the stream recorded it: its sequence and the stream's clock."""

    seq: int
    recorded_at: datetime
    event: AnyEvent


class Entry(msgspec.Struct, frozen=True, kw_only=True):
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
        if event.id in self.seen:
            return "duplicate"
        self.seen.add(event.id)
        self.new_ids.append((event.id, rec.seq))
        if isinstance(event, RunEvent):
            old_run = self.runs.get(event.run_id)
            base = old_run if old_run is not None else new_run(event)
            result, run = step(base, event)  # type: ignore[arg-type]
            if result != "applied" and old_run is not None:
                return result
            run = replace(run, seq=rec.seq)
            self.runs[run.run_id] = run
            self.dirty_runs.add(run.run_id)
            if old_run is None or (old_run.state, old_run.attempt) != (run.state, run.attempt):
                self.history.append(("run", run.run_id, self._entry(run.state, rec)))
            return "applied"
        assert isinstance(event, SweepEvent)
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

    @staticmethod
    def _entry(state: str, rec: Recorded) -> Entry:
        return Entry(
            state=state,
            at=rec.event.at,
            recorded_at=rec.recorded_at,
            seq=rec.seq,
            event_id=rec.event.id,
            event_type=tag_of(rec.event),
            reason=reason_of(rec.event),
        )

    def fold(self, batch: Iterable[Recorded]) -> Views:
        """Apply a batch in order; return self for chaining."""
        for rec in batch:
            self.apply(rec)
        return self
