"""The Decider: ``decide(command, state) -> events``, or a refusal carrying its rule.

Every command people and agents give is a small struct carrying its time and
the id of the event it would append (no clock and no id source in the core):
sweep create, pause, resume, stop and cancel; run kill; claim a preempted run
from a sweep's queue (``ledger sweep next``); start and queue a run. ``decide``
takes the run and sweep as folded from the stream and returns the events to
append: none when the command's outcome already holds (idempotent), or it
raises ``Refused`` / ``StartRefused`` naming the rule that refused and why.

The atomicity against concurrent commands comes from the caller's
expected-sequence append (``ledger.nats.control``), not from here: the
caller loads, decides, appends guarded by the subject's last sequence, and on
a conflict decides again on the new history.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, ClassVar, assert_never

import msgspec

from ledger.core.events import (
    AnyEvent,
    ResumeMode,
    RunInitializing,
    RunKilled,
    RunQueued,
    RunStarted,
    SweepCancelled,
    SweepCreated,
    SweepEvent,
    SweepPaused,
    SweepResumed,
    SweepStopped,
)
from ledger.core.machine import (
    SWEEP_CLOSED,
    TERMINAL,
    Run,
    Sweep,
    SweepState,
    attempt_of_start,
    can_move,
    used_attempt,
)
from ledger.errors import CommandRefused, ResumeRefused


class Refused(CommandRefused):
    """A refused command; ``rule`` names the rule, the message says why in one line."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class StartRefused(ResumeRefused):
    """A refused start; ``rule`` names the rule, the message says why."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _never_reuses_an_id(run: Run | None, mode: ResumeMode) -> None:
    """``never``: a run id names one run; starting it again is a mistake, not a resume."""
    if run is not None and mode == "never":
        raise StartRefused("resume-never", f"run {run.run_id!r} already exists (state {run.state}); "
                                           "resume it with --resume allow, must or auto")


def _must_find_the_run(run: Run | None, run_id: str, mode: ResumeMode) -> None:
    """``must``: the caller means to continue an existing run; a typo must not start a new one."""
    if run is None and mode == "must":
        raise StartRefused("resume-must", f"run {run_id!r} does not exist, and --resume must needs it to")


def _no_twin_processes(run: Run | None, now: datetime, fresh_within: timedelta, force: bool,
                       attempt: int | None) -> None:
    """Two processes must not share one run id by accident: a live run is taken.

    ``initializing`` is not taken: it is how a claimed run from a sweep's queue waits for its agent.
    A scheduler asking for a higher attempt than the live one is no accident: it restarted the
    job, so the old attempt is over (its process may have died unrecorded, with its node).
    """
    if attempt is not None and run is not None and attempt > run.attempt:
        return
    if run is None or force or run.state not in ("running", "stopping"):
        return
    last = max((t for t in (run.last_heartbeat_at, run.started_at) if t is not None), default=None)
    if last is not None and now - last < fresh_within:
        raise StartRefused("run-alive", f"run {run.run_id!r} is {run.state} with a fresh heartbeat "
                                        f"({int((now - last).total_seconds())} s ago); use --force to take it over")


def _sweep_takes_new_runs(run: Run | None, sweep: Sweep | None) -> None:
    """A paused, stopped or cancelled sweep takes no new runs (resumes of its runs are still allowed)."""
    if run is None and sweep is not None and sweep.state in SWEEP_CLOSED:
        raise StartRefused("sweep-closed", f"sweep {sweep.sweep_id!r} is {sweep.state} and takes no new runs")


def _attempt_is_new(run: Run | None, attempt: int | None) -> None:
    """A start naming its attempt must name one the run has not started: the ledger would record
    it as stale and change nothing (CONTRACT section 2, "Attempts"), so the caller would run a
    process the ledger does not see. It exists for a scheduler restarting a job twice under one
    restart count, or a requeued job that reads an old count."""
    if run is not None and attempt is not None and attempt <= used_attempt(run):
        raise StartRefused("attempt-stale", f"run {run.run_id!r} already started attempt {used_attempt(run)} "
                                            f"(state {run.state}); attempt {attempt} would be stale")


def _attempt_in_range(attempt: int | None) -> None:
    """Attempts count from 1 (the wire schema refuses anything else)."""
    if attempt is not None and not 1 <= attempt <= 2**63 - 1:
        raise StartRefused("attempt-invalid", f"attempt {attempt} is not a positive 64-bit integer")


def decide_start(run: Run | None, run_id: str, mode: ResumeMode, *, sweep: Sweep | None = None,
                 now: datetime, fresh_within: timedelta, force: bool = False, attempt: int | None = None) -> int:
    """The attempt a start of ``run_id`` gets under ``mode``, or StartRefused.

    ``run`` is the run as folded from the stream (None: the id was never used).
    ``attempt`` is the attempt the caller knows it is (a scheduler's restart
    count, e.g. SLURM_RESTART_COUNT + 1), or None to let the ledger count:
    given, it is the answer unless the run already started it or a later one
    (refused: ``attempt-stale``); publish it in ``run.started`` as ``attempt``.
    The resume modes apply either way: a run that exists is a resume.
    """
    _attempt_in_range(attempt)
    _never_reuses_an_id(run, mode)
    _must_find_the_run(run, run_id, mode)
    _no_twin_processes(run, now, fresh_within, force, attempt)
    _sweep_takes_new_runs(run, sweep)
    _attempt_is_new(run, attempt)
    if run is None:
        return attempt if attempt is not None else 1
    decided = attempt_of_start(run, attempt)
    assert decided is not None  # a stale attempt was refused above
    return decided


def decide_queue(run: Run | None, run_id: str, sweep: Sweep | None) -> None:
    """``run.queued`` creates a run: refused for an existing id or into a closed sweep."""
    if run is not None:
        raise StartRefused("queued-exists", f"run {run_id!r} already exists (state {run.state})")
    _sweep_takes_new_runs(None, sweep)


# --------------------------------------------------------------------------- commands

class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A command: when it was given, and the id of the event it appends if it is not refused."""

    id: str
    at: datetime


class SweepCommand(Command, frozen=True, kw_only=True):
    """``ledger sweep VERB ID``: move a sweep (CONTRACT section 3)."""

    verb: ClassVar[str]
    event: ClassVar[type[SweepEvent]]
    target: ClassVar[SweepState]
    sweep_id: str
    reason: str | None = None


class CreateSweep(SweepCommand, frozen=True, kw_only=True):
    verb = "create"
    event = SweepCreated
    target = "running"


class PauseSweep(SweepCommand, frozen=True, kw_only=True):
    verb = "pause"
    event = SweepPaused
    target = "paused"


class ResumeSweep(SweepCommand, frozen=True, kw_only=True):
    verb = "resume"
    event = SweepResumed
    target = "running"


class StopSweep(SweepCommand, frozen=True, kw_only=True):
    verb = "stop"
    event = SweepStopped
    target = "stopped"


class CancelSweep(SweepCommand, frozen=True, kw_only=True):
    verb = "cancel"
    event = SweepCancelled
    target = "cancelled"


SWEEP_COMMANDS: dict[str, type[SweepCommand]] = {
    c.verb: c for c in (CreateSweep, PauseSweep, ResumeSweep, StopSweep, CancelSweep)}
"""The sweep verbs, in the CLI's order."""


class KillRun(Command, frozen=True, kw_only=True):
    """``ledger runs kill ID``: the run's current attempt is killed."""

    run_id: str
    reason: str | None = None


class ClaimRun(Command, frozen=True, kw_only=True):
    """``ledger sweep next``: take a preempted run from its sweep's queue to start it again."""

    run_id: str


class QueueRun(Command, frozen=True, kw_only=True):
    """``run.queued``: create a run that waits for an agent."""

    run_id: str
    sweep_id: str | None = None
    config: dict[str, Any] | None = None
    reproduced_from: str | None = None


class StartRun(Command, frozen=True, kw_only=True):
    """A start through the ledger's publishers, under a resume mode (``decide_start``)."""

    run_id: str
    mode: ResumeMode = "auto"
    fresh_within: timedelta = timedelta(seconds=90)
    force: bool = False
    attempt: int | None = None
    sweep_id: str | None = None
    host: str | None = None
    pid: int | None = None
    command: list[str] | None = None
    config: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None


AnyCommand = CreateSweep | PauseSweep | ResumeSweep | StopSweep | CancelSweep | KillRun | ClaimRun | QueueRun | StartRun


# --------------------------------------------------------------------------- rules

def _sweep_is_new(command: SweepCommand, sweep: Sweep | None) -> None:
    """A sweep id names one sweep: creating it twice is a mistake (a typo, or two agents racing)."""
    if sweep is not None:
        raise Refused("sweep-exists", f"sweep {command.sweep_id!r} already exists ({sweep.state})")


def _sweep_exists(command: SweepCommand, sweep: Sweep | None) -> Sweep:
    """Only a sweep the ledger knows can move: a typo must not create one by the back door."""
    if sweep is None:
        raise Refused("sweep-unknown", f"unknown sweep {command.sweep_id!r}: create it first")
    return sweep


def _sweep_can_move(command: SweepCommand, sweep: Sweep) -> None:
    """A sweep moves only along the contract's edges (a cancelled sweep never runs again)."""
    if not can_move(sweep, command.event):
        raise Refused("sweep-cannot-move", f"cannot {command.verb} sweep {command.sweep_id!r}: it is {sweep.state}")


def _run_exists(run_id: str, run: Run | None) -> Run:
    """A command on a run the ledger never saw is a typo: refused, nothing appended."""
    if run is None:
        raise Refused("run-unknown", f"unknown run {run_id!r}")
    return run


def _run_not_ended(run: Run) -> None:
    """A finished or failed run has no process left to kill; killing it would rewrite its outcome."""
    if run.state in TERMINAL:
        raise Refused("run-terminal", f"run {run.run_id!r} is {run.state}: nothing to kill")


def _run_in_queue(run: Run) -> None:
    """Only a preempted run waits in its sweep's queue: another agent may have claimed it meanwhile."""
    if run.state != "preempted":
        raise Refused("run-not-queued", f"run {run.run_id!r} is {run.state}: not in its sweep's queue")


# --------------------------------------------------------------------------- decide

def decide_sweep(command: SweepCommand, sweep: Sweep | None) -> list[AnyEvent]:
    """The sweep event a sweep verb appends: none if the sweep is already so, or Refused."""
    if isinstance(command, CreateSweep):
        _sweep_is_new(command, sweep)
    else:
        sweep = _sweep_exists(command, sweep)
        if sweep.state == command.target:
            return []  # already so: nothing to append
        _sweep_can_move(command, sweep)
    return [command.event(id=command.id, at=command.at, sweep_id=command.sweep_id,  # type: ignore[list-item]
                          reason=command.reason)]


def decide_kill(command: KillRun, run: Run | None) -> list[AnyEvent]:
    """``run.killed`` for the run's current attempt: none if it is killed already, or Refused."""
    run = _run_exists(command.run_id, run)
    if run.state == "killed":
        return []
    _run_not_ended(run)
    return [RunKilled(id=command.id, at=command.at, run_id=run.run_id, attempt=run.attempt,
                      reason=command.reason or "killed by user")]


def decide_claim(command: ClaimRun, run: Run | None) -> list[AnyEvent]:
    """``run.initializing`` for a run still preempted (claimed from its sweep's queue), or Refused."""
    run = _run_exists(command.run_id, run)
    _run_in_queue(run)
    return [RunInitializing(id=command.id, at=command.at, run_id=run.run_id, attempt=run.attempt)]


def decide(command: AnyCommand, run: Run | None = None, sweep: Sweep | None = None) -> list[AnyEvent]:
    """The events ``command`` appends given the run and sweep it concerns as folded from the stream.

    An empty list: the outcome already holds. Refused (or StartRefused for a
    start): the command breaks a rule, nothing is appended.
    """
    match command:
        case CreateSweep() | PauseSweep() | ResumeSweep() | StopSweep() | CancelSweep():
            return decide_sweep(command, sweep)
        case KillRun():
            return decide_kill(command, run)
        case ClaimRun():
            return decide_claim(command, run)
        case QueueRun():
            decide_queue(run, command.run_id, sweep)
            return [RunQueued(id=command.id, at=command.at, run_id=command.run_id, attempt=1,
                              sweep_id=command.sweep_id, config=command.config,
                              reproduced_from=command.reproduced_from)]
        case StartRun():
            attempt = decide_start(run, command.run_id, command.mode, sweep=sweep, now=command.at,
                                   fresh_within=command.fresh_within, force=command.force, attempt=command.attempt)
            return [RunStarted(id=command.id, at=command.at, run_id=command.run_id, attempt=attempt,
                               sweep_id=command.sweep_id, resume=command.mode, host=command.host, pid=command.pid,
                               command=command.command, config=command.config, scheduler=command.scheduler)]
        case _:
            assert_never(command)
