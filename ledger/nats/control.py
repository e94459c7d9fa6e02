"""Commands people and agents give: change a sweep, kill a run, claim the next
preempted run of a sweep. Each reads the entity from the stream, decides, and
appends with an expected subject sequence, so that concurrent commands never
both act on the same state. A command whose outcome already holds appends
nothing (idempotent); one that makes no sense is CommandRefused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone

from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.machine import (
    TERMINAL,
    Run,
    Sweep,
    can_move,
    evolve,
    evolve_sweep,
    new_sweep,
)
from ledger.errors import CommandRefused, ConcurrencyConflict
from ledger.ids import new_id
from ledger.nats.entity import implied_by, implied_sweep, load_run, load_sweep
from ledger.nats.publisher import Publisher

RETRIES = 8
SWEEP_VERBS: dict[str, type[ev.SweepEvent]] = {
    "create": ev.SweepCreated, "pause": ev.SweepPaused, "resume": ev.SweepResumed,
    "stop": ev.SweepStopped, "cancel": ev.SweepCancelled,
}
_TARGET = {"create": "running", "pause": "paused", "resume": "running", "stop": "stopped", "cancel": "cancelled"}


def derived_id(kind: str, *parts: object) -> str:
    """A deterministic event id for a fact the ledger derives (several deriving
    processes produce the same id, so JetStream and the projector keep one)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:40]
    return f"{kind}-{digest}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def change_sweep(js: JetStreamContext, publisher: Publisher, verb: str, sweep_id: str,
                       reason: str | None = None) -> tuple[Sweep, bool]:
    """Apply ``ledger sweep VERB ID``; returns the sweep's new state and whether an event was appended."""
    kind = SWEEP_VERBS[verb]
    ev.check_entity_id(sweep_id, "sweep id")
    for _ in range(RETRIES):
        sweep, last = await load_sweep(js, sweep_id)
        if sweep is None and verb != "create":
            implied = await implied_by(js, sweep_id)  # a sweep a run named exists (CONTRACT section 2)
            sweep = implied_sweep(sweep_id, implied) if implied is not None else None
        if verb == "create":
            if sweep is not None:
                raise CommandRefused(f"sweep {sweep_id!r} already exists ({sweep.state})")
        elif sweep is None:
            raise CommandRefused(f"unknown sweep {sweep_id!r}: create it first")
        elif sweep.state == _TARGET[verb]:
            return sweep, False  # already so: nothing to append
        elif not can_move(sweep, kind):
            raise CommandRefused(f"cannot {verb} sweep {sweep_id!r}: it is {sweep.state}")
        event: ev.AnySweepEvent = kind(id=new_id(), at=_now(), sweep_id=sweep_id, reason=reason)  # type: ignore[assignment]
        try:
            await publisher.publish(event, expect_last_subject_seq=last, expect_subject=f"ledger.sweep.{sweep_id}.>")
        except ConcurrencyConflict:
            continue
        return evolve_sweep(sweep or new_sweep(event), event), True
    raise ConcurrencyConflict(f"sweep {sweep_id!r} kept changing; gave up after {RETRIES} tries")


async def kill_run(js: JetStreamContext, publisher: Publisher, run_id: str,
                   reason: str | None = None) -> tuple[Run, bool]:
    """``ledger runs kill ID``: append ``run.killed`` for the run's current attempt."""
    ev.check_entity_id(run_id, "run id")
    for _ in range(RETRIES):
        run, last = await load_run(js, run_id)
        if run is None:
            raise CommandRefused(f"unknown run {run_id!r}")
        if run.state == "killed":
            return run, False
        if run.state in TERMINAL:
            raise CommandRefused(f"run {run_id!r} is {run.state}: nothing to kill")
        event = ev.RunKilled(id=new_id(), at=_now(), run_id=run_id, attempt=run.attempt,
                             reason=reason or "killed by user")
        try:
            await publisher.publish(event, expect_last_subject_seq=last, expect_subject=f"ledger.run.{run_id}.>")
        except ConcurrencyConflict:
            continue
        return evolve(run, event), True
    raise ConcurrencyConflict(f"run {run_id!r} kept changing; gave up after {RETRIES} tries")


async def claim_next(js: JetStreamContext, publisher: Publisher, queue: Iterable[str]) -> Run | None:
    """Claim the first run of ``queue`` that is still preempted: append ``run.initializing``
    guarded by its subject sequence, so two agents never claim the same run."""
    for run_id in queue:
        for _ in range(RETRIES):
            run, last = await load_run(js, run_id)
            if run is None or run.state != "preempted":
                break  # taken by someone else meanwhile, or the views were behind
            event = ev.RunInitializing(id=new_id(), at=_now(), run_id=run_id, attempt=run.attempt)
            try:
                await publisher.publish(event, expect_last_subject_seq=last, expect_subject=f"ledger.run.{run_id}.>")
            except ConcurrencyConflict:
                continue
            return evolve(run, event)
    return None


