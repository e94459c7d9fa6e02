"""Commands people and agents give, as a thin shell around the core's Decider:
load the run or sweep from the stream, ``decide``, append what it returns with
the subject's expected last sequence, and on a conflict decide again on the
new history. So concurrent commands never both act on the same state; a
command whose outcome already holds appends nothing (idempotent); a refused
one raises ``Refused`` (a CommandRefused) with the rule's one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.decide import SWEEP_COMMANDS, ClaimRun, KillRun, Refused, SweepCommand, decide, decide_sweep
from ledger.core.machine import Run, Sweep, evolve, evolve_sweep, new_sweep
from ledger.errors import ConcurrencyConflict
from ledger.ids import new_id
from ledger.nats.entity import implied_by, implied_sweep, load_run, load_sweep
from ledger.nats.publisher import Publisher

__all__ = ["RETRIES", "SWEEP_VERBS", "change_sweep", "claim_next", "kill_run"]

RETRIES = 8
SWEEP_VERBS: dict[str, type[SweepCommand]] = SWEEP_COMMANDS


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _append(publisher: Publisher, events: list[ev.AnyEvent], subject: str, last: int) -> None:
    """Append the decided events guarded by the subject's last sequence (ConcurrencyConflict if it moved)."""
    for event in events:
        last = await publisher.publish(event, expect_last_subject_seq=last, expect_subject=subject)


async def change_sweep(js: JetStreamContext, publisher: Publisher, verb: str, sweep_id: str,
                       reason: str | None = None) -> tuple[Sweep, bool]:
    """Apply ``ledger sweep VERB ID``; returns the sweep's new state and whether an event was appended."""
    kind = SWEEP_COMMANDS[verb]
    ev.check_entity_id(sweep_id, "sweep id")
    for _ in range(RETRIES):
        sweep, last = await load_sweep(js, sweep_id)
        if sweep is None and verb != "create":
            implied = await implied_by(js, sweep_id)  # a sweep a run named exists (CONTRACT section 2)
            sweep = implied_sweep(sweep_id, implied) if implied is not None else None
        events = decide_sweep(kind(id=new_id(), at=_now(), sweep_id=sweep_id, reason=reason), sweep)
        if not events:
            assert sweep is not None
            return sweep, False  # already so: nothing to append
        try:
            await _append(publisher, events, f"ledger.sweep.{sweep_id}.>", last)
        except ConcurrencyConflict:
            continue
        for event in events:
            sweep = evolve_sweep(sweep or new_sweep(event), event)  # type: ignore[arg-type]
        assert sweep is not None
        return sweep, True
    raise ConcurrencyConflict(f"sweep {sweep_id!r} kept changing; gave up after {RETRIES} tries")


async def kill_run(js: JetStreamContext, publisher: Publisher, run_id: str,
                   reason: str | None = None) -> tuple[Run, bool]:
    """``ledger runs kill ID``: append ``run.killed`` for the run's current attempt."""
    ev.check_entity_id(run_id, "run id")
    for _ in range(RETRIES):
        run, last = await load_run(js, run_id)
        events = decide(KillRun(id=new_id(), at=_now(), run_id=run_id, reason=reason), run)
        assert run is not None  # an unknown run is refused
        if not events:
            return run, False
        try:
            await _append(publisher, events, f"ledger.run.{run_id}.>", last)
        except ConcurrencyConflict:
            continue
        return _evolved(run, events), True
    raise ConcurrencyConflict(f"run {run_id!r} kept changing; gave up after {RETRIES} tries")


async def claim_next(js: JetStreamContext, publisher: Publisher, queue: Iterable[str]) -> Run | None:
    """Claim the first run of ``queue`` that is still preempted: append ``run.initializing``
    guarded by its subject sequence, so two agents never claim the same run."""
    for run_id in queue:
        for _ in range(RETRIES):
            run, last = await load_run(js, run_id)
            try:
                events = decide(ClaimRun(id=new_id(), at=_now(), run_id=run_id), run)
            except Refused:
                break  # taken by someone else meanwhile, or the views were behind
            assert run is not None
            try:
                await _append(publisher, events, f"ledger.run.{run_id}.>", last)
            except ConcurrencyConflict:
                continue
            return _evolved(run, events)
    return None


def _evolved(run: Run, events: list[ev.AnyEvent]) -> Run:
    for event in events:
        run = evolve(run, event)  # type: ignore[arg-type]
    return run
