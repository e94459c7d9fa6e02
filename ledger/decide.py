"""Decisions of the ledger's own publishers: may this run start, and as which attempt?

Pure: the run and sweep as folded from the stream, the time, the options in;
an attempt number out, or ResumeRefused carrying the rule that refused.
The atomicity against concurrent starts comes from the caller's
expected-sequence append, not from here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ledger.errors import ResumeRefused
from ledger.events import ResumeMode
from ledger.machine import SWEEP_CLOSED, Run, Sweep, starts_new_attempt


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


def _no_twin_processes(run: Run | None, now: datetime, fresh_within: timedelta, force: bool) -> None:
    """Two processes must not share one run id by accident: a live run is taken.

    ``initializing`` is not taken: it is how a claimed run from a sweep's queue waits for its agent.
    """
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


def _attempt_not_stale(run: Run | None, attempt: int | None) -> None:
    """A scheduler's attempt not higher than one the run already started comes from an old
    incarnation of the job (a zombie): it would change nothing, so it must not run CMD."""
    if run is not None and attempt is not None and run.started_at is not None and attempt <= run.attempt:
        raise StartRefused("attempt-stale", f"run {run.run_id!r} already started attempt {run.attempt}; "
                                            f"attempt {attempt} is stale")


def decide_start(run: Run | None, run_id: str, mode: ResumeMode, *, sweep: Sweep | None = None,
                 now: datetime, fresh_within: timedelta, force: bool = False, attempt: int | None = None) -> int:
    """The attempt a start of ``run_id`` gets under ``mode``, or StartRefused.

    ``run`` is the run as folded from the stream (None: the id was never used).
    ``attempt`` is the attempt a scheduler asked for (e.g. Slurm's restart count + 1).
    """
    _never_reuses_an_id(run, mode)
    _must_find_the_run(run, run_id, mode)
    # a scheduler's higher attempt proves the old one is over (its process may have died unrecorded)
    newer = attempt is not None and run is not None and attempt > run.attempt
    _no_twin_processes(run, now, fresh_within, force or newer)
    _sweep_takes_new_runs(run, sweep)
    _attempt_not_stale(run, attempt)
    if attempt is not None:
        return attempt  # until the fold honours a start's own attempt, it equals the one below for Slurm
    if run is None:
        return 1
    return run.attempt + 1 if starts_new_attempt(run) else run.attempt


def decide_queue(run: Run | None, run_id: str, sweep: Sweep | None) -> None:
    """``run.queued`` creates a run: refused for an existing id or into a closed sweep."""
    if run is not None:
        raise StartRefused("queued-exists", f"run {run_id!r} already exists (state {run.state})")
    _sweep_takes_new_runs(None, sweep)
