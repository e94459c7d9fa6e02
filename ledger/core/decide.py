"""Decisions of the ledger's own publishers: may this run start, and as which attempt?

Pure: the run and sweep as folded from the stream, the time, the options (and
the attempt a scheduler asks for, if any) in; an attempt number out, or
ResumeRefused carrying the rule that refused.
The atomicity against concurrent starts comes from the caller's
expected-sequence append, not from here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ledger.core.events import ResumeMode
from ledger.core.machine import SWEEP_CLOSED, Run, Sweep, attempt_of_start, used_attempt
from ledger.errors import ResumeRefused


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
