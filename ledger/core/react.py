"""Reactions: the facts the ledger derives from its own state and the time.

Pure functions of a run or sweep (as the views hold it) and ``now``: crash on
silence, kill on cancel, finish on stopped-and-done. The reactors in
``projections.workers.reactors`` only find candidates (through indexes) and append
what these return; the audit explains a crash with the same rules.

Every derived event has a deterministic id (``derived_id``) made of recorded
facts only, so several deriving processes, or one restarted halfway, produce
the same id and JetStream's dedup window and the projector keep one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta

from ledger.core.events import RunCrashed, RunKilled, SweepFinished
from ledger.core.fold import RecordedRun
from ledger.core.machine import ALIVE, TERMINAL, Run, Sweep

CRASH_REASON = "heartbeat-timeout"
CANCEL_REASON = "sweep-cancelled"
FINISH_REASON = "stopped and all runs done"


def derived_id(kind: str, *parts: object) -> str:
    """A deterministic event id for a fact the ledger derives (several deriving
    processes produce the same id, so JetStream and the projector keep one)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:40]
    return f"{kind}-{digest}"


def _stamp(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def crash_deadline(run: RecordedRun, timeout: timedelta) -> datetime | None:
    """When the run's silence turns into a crash (ledger's clock); None if the monitor does not watch it.

    Silence is measured from ``last_seen_at``, when the stream recorded the
    run's last applied event (CONTRACT section 2, "Liveness"), never from the
    producer's ``at``: a job host whose clock is off neither causes nor hides
    a crash.
    """
    if run.state not in ALIVE or run.last_seen_at is None:
        return None
    return run.last_seen_at + timeout


def crash_on_silence(run: RecordedRun, now: datetime, timeout: timedelta) -> RunCrashed | None:
    """``run.crashed`` for a run alive and silent for ``timeout`` at ``now``; None otherwise.

    The crash carries the run's ``last_heartbeat_at`` (the producer's clock, as
    rule 9 compares it with later heartbeats); its id is made of the recorded
    facts it was decided on, so every monitor deciding on the same views
    derives the same event.
    """
    deadline = crash_deadline(run, timeout)
    if deadline is None or now < deadline:
        return None
    return RunCrashed(
        id=derived_id("crash", run.run_id, run.attempt, _stamp(run.last_heartbeat_at), _stamp(run.last_seen_at)),
        at=now, run_id=run.run_id, attempt=run.attempt, reason=CRASH_REASON,
        last_heartbeat_at=run.last_heartbeat_at)


def kill_on_cancel(sweep: Sweep, cancel_id: str, runs: Iterable[Run], now: datetime) -> list[RunKilled]:
    """A cancelled sweep's non-terminal runs each get ``run.killed`` (``cause``: the cancel's event id)."""
    if sweep.state != "cancelled":
        return []
    return [
        RunKilled(id=derived_id("kill", cancel_id, run.run_id, run.attempt), at=now, run_id=run.run_id,
                  attempt=run.attempt, reason=CANCEL_REASON, cause=cancel_id)
        for run in runs
        if run.sweep_id == sweep.sweep_id and run.state not in TERMINAL
    ]


def finish_when_done(sweep: Sweep, stop_id: str, runs: Iterable[Run], now: datetime) -> SweepFinished | None:
    """A stopped sweep none of whose runs is non-terminal gets ``sweep.finished``; None otherwise."""
    if sweep.state != "stopped":
        return None
    if any(run.state not in TERMINAL for run in runs if run.sweep_id == sweep.sweep_id):
        return None
    return SweepFinished(id=derived_id("finish", sweep.sweep_id, stop_id), at=now, sweep_id=sweep.sweep_id,
                         reason=FINISH_REASON)
