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
from ledger.machine import (
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


class Recorded(msgspec.Struct, frozen=True, gc=False):
    """An event as the stream recorded it: its sequence and the stream's clock."""

    seq: int
    recorded_at: datetime
    event: AnyEvent


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
        seen.add(event_id)
        self.new_ids.append((event_id, rec.seq))
        if isinstance(event, RunEvent):
            run_id = event.run_id
            old_run = self.runs.get(run_id)
            if old_run is None:
                result, run = step(new_run(event), event)  # type: ignore[arg-type]
            else:
                result, run = step(old_run, event)  # type: ignore[arg-type]
                if result != "applied":
                    return result
            self.runs[run_id] = run = replace(run, seq=rec.seq)
            self.dirty_runs.add(run_id)
            if old_run is None or old_run.state != run.state or old_run.attempt != run.attempt:
                self.history.append(("run", run_id, self._entry(run.state, rec)))
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
