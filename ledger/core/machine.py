"""The pure state machine of CONTRACT section 2: ``evolve(state, event) -> state``.

Total and silent: never raises, never logs, no I/O, no clock. An event that
cannot apply returns the state unchanged; ``effect`` says why for the audit.
Stream sequence and stream time are not part of the fold: the projector
stamps them on what changed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal, TypeAlias, assert_never

import msgspec
from msgspec.structs import replace

from ledger.core.events import (
    AnyRunEvent,
    AnySweepEvent,
    RunCrashed,
    RunEvent,
    RunExited,
    RunHeartbeat,
    RunIdle,
    RunInitializing,
    RunKilled,
    RunPreempting,
    RunQueued,
    RunSignalled,
    RunStarted,
    RunStopping,
    SweepCancelled,
    SweepCrashed,
    SweepCreated,
    SweepFailed,
    SweepFinished,
    SweepPaused,
    SweepResumed,
    SweepStopped,
)

RunState: TypeAlias = Literal[
    "pending", "initializing", "running", "stopping", "idle",
    "finished", "failed", "crashed", "killed", "preempted",
]
SweepState: TypeAlias = Literal[
    "running", "paused", "stopped", "cancelled", "finished", "failed", "crashed",
]
RUN_STATES: Final[tuple[RunState, ...]] = RunState.__args__  # type: ignore[attr-defined]
SWEEP_STATES: Final[tuple[SweepState, ...]] = SweepState.__args__  # type: ignore[attr-defined]
TERMINAL: Final[frozenset[RunState]] = frozenset({"finished", "failed", "killed"})
"""Terminal until a resume starts a new attempt."""
NON_TERMINAL: Final[frozenset[RunState]] = frozenset(RUN_STATES) - TERMINAL
"""Every other run state: a cancel kills a run in one of these, a stopped sweep waits for them."""
ALIVE: Final[frozenset[RunState]] = frozenset({"initializing", "running", "stopping"})
"""States the liveness monitor watches (rule 9: a crash applies only in these)."""
FAILURE_REASONS: Final = frozenset({"time-limit", "oom"})
"""An exit by signal with one of these reasons is ``failed``: the job broke a limit, nobody killed it."""
SWEEP_TERMINAL: Final[frozenset[SweepState]] = frozenset({"cancelled", "finished", "failed", "crashed"})
SWEEP_CLOSED: Final[frozenset[SweepState]] = SWEEP_TERMINAL | frozenset(("paused", "stopped"))
"""A sweep in one of these takes no new runs."""
SWEEP_REACTING: Final[frozenset[SweepState]] = frozenset({"cancelled", "stopped"})
"""Sweep states whose runs the ledger reacts to: a cancel kills them, a stop waits for them to end."""
HEARTBEAT_ENDED: Final[frozenset[RunState]] = TERMINAL | frozenset(("preempted",))
"""States in which a heartbeat is late (rule 3)."""
REVIVED: Final[frozenset[RunState]] = frozenset({"pending", "initializing", "crashed"})
"""States a heartbeat moves to ``running`` (rule 3)."""


class Run(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The current state of one run (the contract's Run shape).

    ``last_heartbeat_at`` is the latest heartbeat of the current attempt
    (a start of another attempt clears it), so it never moves backwards
    within an attempt.
    """

    run_id: str
    sweep_id: str | None = None
    state: RunState = "pending"
    attempt: int = 1
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    step: int | None = None
    progress: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    preempting: bool = False
    reproduced_from: str | None = None
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class Sweep(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The current state of one sweep, without the counts derived from its runs."""

    sweep_id: str
    state: SweepState = "running"
    created_at: datetime | None = None
    updated_at: datetime | None = None
    seq: int = 0


def starts_new_attempt(run: Run) -> bool:
    """Whether ``run.started`` on this run is a resume (rule 2): it started before, or ended."""
    return run.started_at is not None or run.terminal or run.state in ("preempted", "crashed")


def used_attempt(run: Run) -> int:
    """The highest attempt the run has started (or ended without starting, e.g. killed while
    pending): its current attempt once ``starts_new_attempt``, else 0 (no attempt used yet)."""
    return run.attempt if starts_new_attempt(run) else 0


def attempt_of_start(run: Run, requested: int | None) -> int | None:
    """The attempt ``run.started`` carrying ``requested`` starts on this run; None when it is stale.

    Contract section 2, "Attempts": a start that names its attempt N starts
    attempt N (a scheduler may know its restart count, e.g. SLURM_RESTART_COUNT,
    before the ledger does), unless N is not higher than an attempt the run
    already started (``used_attempt``): then it is stale and changes nothing.
    A start that names none keeps rule 2: the first start keeps the run's
    attempt, a resume takes the next one.
    """
    if requested is None:
        return run.attempt + 1 if starts_new_attempt(run) else run.attempt
    return requested if requested > used_attempt(run) else None


def new_run(event: RunEvent) -> Run:
    """Tolerance rule: an event of a run never seen creates it as ``pending``."""
    return Run(run_id=event.run_id, created_at=event.at)


def new_sweep(event: AnySweepEvent) -> Sweep:
    """Tolerance rule: an event of a sweep never seen creates it as ``running``."""
    return Sweep(sweep_id=event.sweep_id, created_at=event.at, updated_at=event.at)


Effect: TypeAlias = Literal["applied", "unchanged", "late", "stale"]


def fenced(run: Run, event: AnyRunEvent) -> bool:
    """Whether the event is ``stale``: rule 10, an event (not a start) of another attempt comes
    from a zombie; or a start naming an attempt the run already started ("Attempts")."""
    attempt = event.attempt
    if attempt is None:
        return False
    if type(event) is RunStarted:
        return attempt <= used_attempt(run)
    return attempt != run.attempt


def late(run: Run, event: RunHeartbeat) -> bool:
    """Whether a heartbeat changes nothing because it comes too late.

    Rule 3: the run is terminal or preempted. "Attempts": the heartbeat is
    not later (by ``at``) than the last one applied in the run's current
    attempt (``last_heartbeat_at``), so a run never moves backwards. The
    comparison restarts with each attempt, since a start of another attempt
    clears ``last_heartbeat_at`` (the new attempt's host keeps its own clock).
    A heartbeat at the same instant as the last one is late too: it may be
    that very heartbeat again, and the views do not remember heartbeat ids
    (``fold.remembers``), so a re-delivery must be a no-op by this rule. A
    late heartbeat is no evidence of life either: it does not revive a
    crashed run (only one later than the crash's evidence does), and rule 9
    still compares a crash with the latest heartbeat applied.
    """
    if run.state in HEARTBEAT_ENDED:
        return True
    latest = run.last_heartbeat_at
    return latest is not None and event.at <= latest


CrashIgnored: TypeAlias = Literal["not-alive", "heartbeat-after"]


def crash_ignored(run: Run, event: RunCrashed) -> CrashIgnored | None:
    """Why ``run.crashed`` changes nothing (rule 9), or None when it applies.

    ``not-alive``: the run is not ``initializing``, ``running`` or ``stopping``.
    ``heartbeat-after``: a heartbeat came after the crash's ``last_heartbeat_at``
    (the monitor decided on views that lagged behind it).
    """
    if run.state not in ALIVE:
        return "not-alive"
    seen, last = event.last_heartbeat_at, run.last_heartbeat_at
    if last is not None and (seen is None or last > seen):
        return "heartbeat-after"
    return None


def step(run: Run, event: AnyRunEvent) -> tuple[Effect, Run]:
    """Apply one run event and say what it did: applied, or why it changed nothing."""
    if fenced(run, event):
        return "stale", run
    if type(event) is RunHeartbeat:  # most of any stream: the shortest path
        if late(run, event):
            return "late", run
        new = _beat(run, event)
    else:
        new = _unfenced(run, event)
    return ("unchanged" if new is run or new == run else "applied"), new


def effect(run: Run, event: AnyRunEvent) -> Effect:
    """Why an event would change nothing: fenced (``stale``), ``late`` heartbeat, or no-op."""
    return step(run, event)[0]


def _ended(run: Run, state: RunState, at: datetime, **changes: object) -> Run:
    return replace(run, state=state, ended_at=at, **changes)


def evolve(run: Run, event: AnyRunEvent) -> Run:
    """Apply one run event (rules 1-10 and "Attempts" of CONTRACT section 2). Total: never raises."""
    if fenced(run, event):
        return run  # rule 10: a zombie of another attempt, or a stale start
    return _unfenced(run, event)


def _unfenced(run: Run, event: AnyRunEvent) -> Run:
    """``evolve`` once the event is known to belong to the run's attempt (rules 1-9)."""
    if type(event) is RunHeartbeat:  # most of any stream: decided before the match below
        return run if late(run, event) else _beat(run, event)
    match event:
        case RunQueued():
            if run.state != "pending" or run.started_at is not None:
                return run
            return replace(
                run,
                sweep_id=event.sweep_id or run.sweep_id,
                reproduced_from=event.reproduced_from or run.reproduced_from,
            )
        case RunInitializing():
            # from pending, or from preempted: claimed from the sweep's queue to start again
            return replace(run, state="initializing") if run.state in ("pending", "preempted") else run
        case RunStarted():
            attempt = attempt_of_start(run, event.attempt)
            if attempt is None:
                return run  # stale: fenced before this point; kept for a direct call
            return replace(
                run,
                state="running",
                attempt=attempt,
                sweep_id=event.sweep_id or run.sweep_id,
                started_at=event.at,
                ended_at=None,
                exit_code=None,
                signal=None,
                preempting=False,
                # another attempt keeps its own heartbeat clock ("Attempts"); the same one keeps it
                last_heartbeat_at=run.last_heartbeat_at if attempt == run.attempt else None,
            )
        case RunHeartbeat():
            return run if late(run, event) else _beat(run, event)
        case RunSignalled():
            return run if run.terminal else replace(run, signal=event.signal)
        case RunPreempting():
            return run if run.terminal or run.state == "preempted" else replace(run, preempting=True)
        case RunStopping():
            return run if run.terminal or run.state == "preempted" else replace(run, state="stopping")
        case RunIdle():
            return run if run.terminal or run.state == "preempted" else replace(run, state="idle")
        case RunExited():
            if run.state == "killed":
                return replace(run, exit_code=event.exit_code, signal=event.signal or run.signal)
            if run.terminal or run.state == "preempted":
                return run
            abnormal = event.signal is not None or event.exit_code != 0
            code = {"exit_code": event.exit_code, "signal": event.signal or run.signal}
            if run.preempting and abnormal:
                return _ended(run, "preempted", event.at, **code)
            if event.signal is not None:  # killed, unless the reason names a broken limit
                return _ended(run, "failed" if event.reason in FAILURE_REASONS else "killed", event.at, **code)
            return _ended(run, "finished" if event.exit_code == 0 else "failed", event.at, **code)
        case RunKilled():
            return run if run.terminal else _ended(run, "killed", event.at)
        case RunCrashed():
            return run if crash_ignored(run, event) else _ended(run, "crashed", event.at)
        case _:
            assert_never(event)


def _beat(run: Run, event: RunHeartbeat) -> Run:
    """Rule 3, for a heartbeat that is not ``late``: it keeps a live run's clock and progress,
    and revives a pending, initializing or crashed one."""
    if run.state in REVIVED:
        return replace(
            run,
            state="running",
            ended_at=None,
            last_heartbeat_at=event.at,
            step=event.step if event.step is not None else run.step,
            progress=event.progress if event.progress is not None else run.progress,
        )
    return replace(
        run,
        last_heartbeat_at=event.at,
        step=event.step if event.step is not None else run.step,
        progress=event.progress if event.progress is not None else run.progress,
    )


_SWEEP_MOVES: Final[dict[type, tuple[frozenset[str], SweepState]]] = {
    SweepCreated: (frozenset(), "running"),
    SweepPaused: (frozenset({"running"}), "paused"),
    SweepResumed: (frozenset({"paused"}), "running"),
    SweepStopped: (frozenset({"running", "paused"}), "stopped"),
    SweepCancelled: (frozenset({"running", "paused", "stopped"}), "cancelled"),
    SweepFinished: (frozenset({"running", "paused", "stopped"}), "finished"),
    SweepFailed: (frozenset({"running", "paused", "stopped"}), "failed"),
    SweepCrashed: (frozenset({"running", "paused", "stopped"}), "crashed"),
}
"""For each sweep event: the states it moves from, and the state it moves to."""


def can_move(sweep: Sweep, event_type: type) -> bool:
    """Whether a sweep event of this type would move the sweep."""
    sources, target = _SWEEP_MOVES[event_type]
    return sweep.state in sources and sweep.state != target


def evolve_sweep(sweep: Sweep, event: AnySweepEvent) -> Sweep:
    """Apply one sweep event. Total: never raises. ``sweep.created`` only creates."""
    if not can_move(sweep, type(event)):
        return sweep
    return replace(sweep, state=_SWEEP_MOVES[type(event)][1], updated_at=event.at)


def reason_of(event: AnyRunEvent | AnySweepEvent) -> str | None:
    """Why a state changed, for history entries: exit code, signal, stated reason."""
    match event:
        case RunExited(reason=str(reason)):
            return reason
        case RunExited(signal=int(sig)):
            return f"signal {sig}"
        case RunExited(exit_code=code):
            return f"exit code {code}"
        case RunKilled() | RunCrashed() | RunIdle():
            return event.reason
        case RunStarted(resume=mode):
            return f"resume={mode}" if mode else None
        case RunHeartbeat():
            return "heartbeat"
        case SweepCreated() | SweepPaused() | SweepResumed() | SweepStopped() | SweepCancelled() \
                | SweepFinished() | SweepFailed() | SweepCrashed():
            return event.reason
        case RunQueued() | RunInitializing() | RunSignalled() | RunPreempting() | RunStopping():
            return None
        case _:
            assert_never(event)
