"""The start decision of the ledger's publishers (``decide_start``), with and without a requested
attempt (CONTRACT section 2, "Attempts" and the resume table)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from msgspec.structs import replace

from ledger.core.decide import StartRefused, decide_start
from ledger.core.events import RunStarted
from ledger.core.machine import Run, evolve

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FRESH = timedelta(seconds=90)
LONG_AGO = NOW - timedelta(hours=1)


def run_in(state: str, attempt: int = 1) -> Run:
    """A run in ``state`` whose last sign of life is an hour old (never a live twin)."""
    started = None if state in ("pending", "initializing") else LONG_AGO
    return Run(run_id="r1", state=state, attempt=attempt, started_at=started, created_at=LONG_AGO)  # type: ignore[arg-type]


def decide(run: Run | None, attempt: int | None, mode: str = "auto") -> int:
    return decide_start(run, "r1", mode, now=NOW, fresh_within=FRESH, attempt=attempt)  # type: ignore[arg-type]


class TestRequestedAttempt:
    def test_new_run_takes_the_requested_attempt(self) -> None:
        """A scheduler's attempt 3 on a run never seen is attempt 3."""
        assert 3 == decide(None, 3)

    def test_without_a_request_the_ledger_counts(self) -> None:
        """With no attempt requested, a new run is attempt 1 and a resume takes the next one."""
        assert (1, 3) == (decide(None, None), decide(run_in("preempted", attempt=2), None))

    @pytest.mark.parametrize("state", ["pending", "initializing"])
    def test_run_not_yet_started_takes_any_attempt(self, state: str) -> None:
        """A queued run that never started takes the requested attempt, 1 included."""
        assert (1, 4) == (decide(run_in(state), 1), decide(run_in(state), 4))

    @pytest.mark.parametrize("state", ["preempted", "crashed", "finished", "failed", "killed"])
    def test_higher_attempt_resumes_as_that_attempt(self, state: str) -> None:
        """A run that ended at attempt 2 resumes as the requested attempt 5."""
        assert 5 == decide(run_in(state, attempt=2), 5)

    @pytest.mark.parametrize("requested", [1, 2])
    def test_attempt_already_started_is_refused(self, requested: int) -> None:
        """A requested attempt not higher than the one the run started is refused as stale, with the rule."""
        with pytest.raises(StartRefused) as refused:
            decide(run_in("preempted", attempt=2), requested)
        assert ("attempt-stale", True) == (refused.value.rule, "attempt 2" in str(refused.value))

    def test_attempt_below_one_is_refused(self) -> None:
        """Attempts count from 1: 0 is refused before anything is appended."""
        with pytest.raises(StartRefused) as refused:
            decide(None, 0)
        assert "attempt-invalid" == refused.value.rule

    def test_resume_modes_still_apply(self) -> None:
        """A requested attempt does not bypass the resume table: never refuses an existing run, must a new one."""
        with pytest.raises(StartRefused) as never:
            decide(run_in("preempted"), 2, mode="never")
        with pytest.raises(StartRefused) as must:
            decide(None, 2, mode="must")
        assert ("resume-never", "resume-must") == (never.value.rule, must.value.rule)

    def test_live_twin_refused_unless_a_higher_attempt(self) -> None:
        """A run running with a fresh heartbeat is taken by a start that names no attempt (unless forced);
        a scheduler's higher attempt means it restarted the job, and takes over."""
        live = replace(run_in("running"), last_heartbeat_at=NOW - timedelta(seconds=5))
        with pytest.raises(StartRefused) as refused:
            decide(live, None)
        forced = decide_start(live, "r1", "auto", now=NOW, fresh_within=FRESH, force=True)
        assert ("run-alive", 2, 3) == (refused.value.rule, forced, decide(live, 3))

    @pytest.mark.parametrize("state", ["pending", "running", "preempted", "killed", "finished"])
    @pytest.mark.parametrize("requested", [None, 1, 2, 3])
    def test_decision_agrees_with_the_fold(self, state: str, requested: int | None) -> None:
        """The attempt decided is the attempt the start then folds to; a refused one would be stale."""
        run = run_in(state, attempt=2 if state not in ("pending",) else 1)
        event = RunStarted(id="e1", at=NOW, run_id="r1", attempt=requested)
        try:
            attempt = decide(run, requested)
        except StartRefused:
            assert run == evolve(run, event)
        else:
            assert attempt == evolve(run, replace(event, attempt=attempt)).attempt
