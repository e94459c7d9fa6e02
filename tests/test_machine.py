"""The run and sweep state machines against CONTRACT section 2 (rules 1-10).

The two tables below are written from the contract, not from the code's output:
each cell is the state a run (or sweep) in the row's state reaches on the
column's event, and each test id reads ``state-event->expected``. Where the
contract does not name the source states of a rule, the cells follow what it
implies elsewhere:

- ``finished``, ``failed`` and ``killed`` are terminal "until a resume starts a
  new attempt", so only ``run.started`` leaves them (rule 7 keeps the exit of a
  killed run, rule 3 counts a heartbeat there as late).
- A ``preempted`` run waits in its sweep's queue until "it starts again or is
  killed": ``run.started`` and ``run.killed`` move it, and so does
  ``run.initializing``, the first step of starting again, which ``ledger sweep
  next`` appends to claim the run for an agent (VESSL's initializing phase).
- ``run.queued`` and ``run.initializing`` (rule 1) bring a run into being; they
  never send a run back once it is past them (``run.queued`` moves nothing but
  a pending run, ``run.initializing`` nothing but a pending or preempted one).
- ``run.stopping`` / ``run.idle`` (rule 6) apply from every other state.
- Sweeps: pause only a running sweep, resume only a paused one, stop a running
  or paused one; cancel / finish / fail / crash end any sweep not yet ended;
  ``sweep.created`` only creates; an ended sweep never moves again.
- Attempts: a start naming attempt N starts attempt N unless the run already
  started N or a later one (a run that never started has used no attempt; one
  that ended without starting, killed while pending, has used its first);
  within an attempt, a heartbeat not later than ``last_heartbeat_at`` is ``late``.
  The canonical runs below are at attempt 1, heartbeat last at T2 once started.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from msgspec.structs import replace

from ledger.core.events import (
    RUN_EVENT_TYPES,
    SWEEP_EVENT_TYPES,
    AnyRunEvent,
    AnySweepEvent,
    RunCrashed,
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
from ledger.core.machine import (
    RUN_STATES,
    SWEEP_STATES,
    TERMINAL,
    Run,
    Sweep,
    effect,
    evolve,
    evolve_sweep,
    new_run,
    new_sweep,
    reason_of,
    step,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
"""Created."""
T1 = T0 + timedelta(minutes=1)
"""Started."""
T2 = T0 + timedelta(minutes=2)
"""Last heartbeat of the canonical runs."""
T3 = T0 + timedelta(minutes=3)
"""Ended (for the runs that ended)."""
T4 = T0 + timedelta(minutes=4)
"""When the event under test happened."""


def run_event(cls: type, **fields: Any) -> AnyRunEvent:
    """A run event of run ``r1`` at T4 with the given fields."""
    fields = {"id": "ev-1", "at": T4, "run_id": "r1", **fields}
    return cls(**fields)  # type: ignore[no-any-return]


def sweep_event(cls: type, **fields: Any) -> AnySweepEvent:
    """A sweep event of sweep ``s1`` at T4 with the given fields."""
    fields = {"id": "ev-1", "at": T4, "sweep_id": "s1", **fields}
    return cls(**fields)  # type: ignore[no-any-return]


def run_in(state: str, **changes: Any) -> Run:
    """A run of attempt 1 as it looks after reaching ``state`` the usual way."""
    base = Run(run_id="r1", created_at=T0)
    started = replace(base, started_at=T1, last_heartbeat_at=T2)
    ended = replace(started, ended_at=T3)
    runs = {
        "pending": base,
        "initializing": replace(base, state="initializing"),
        "running": replace(started, state="running"),
        "stopping": replace(started, state="stopping"),
        "idle": replace(started, state="idle"),
        "finished": replace(ended, state="finished", exit_code=0),
        "failed": replace(ended, state="failed", exit_code=1),
        "crashed": replace(ended, state="crashed"),
        "killed": replace(ended, state="killed"),
        "preempted": replace(ended, state="preempted", exit_code=143, signal=15, preempting=True),
    }
    return replace(runs[state], **changes)


# Columns: one representative event per run event type (and per kind of exit).
RUN_EVENTS: dict[str, AnyRunEvent] = {
    "queued": run_event(RunQueued),
    "initializing": run_event(RunInitializing),
    "started": run_event(RunStarted),
    "heartbeat": run_event(RunHeartbeat, step=7),
    "signalled": run_event(RunSignalled, signal=10, name="SIGUSR1"),
    "preempting": run_event(RunPreempting),
    "stopping": run_event(RunStopping),
    "idle": run_event(RunIdle),
    "exited(0)": run_event(RunExited, exit_code=0),
    "exited(1)": run_event(RunExited, exit_code=1),
    "exited(sig9)": run_event(RunExited, exit_code=137, signal=9),
    "exited(sig9,oom)": run_event(RunExited, exit_code=137, signal=9, reason="oom"),
    "killed": run_event(RunKilled, reason="user"),
    "crashed": run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2),
}

RUN_TABLE = """
              queued        initializing  started  heartbeat  signalled     preempting    stopping   idle       exited(0)  exited(1)  exited(sig9)  exited(sig9,oom)  killed    crashed
pending       pending       initializing  running  running    pending       pending       stopping   idle       finished   failed     killed        failed            killed    pending
initializing  initializing  initializing  running  running    initializing  initializing  stopping   idle       finished   failed     killed        failed            killed    crashed
running       running       running       running  running    running       running       stopping   idle       finished   failed     killed        failed            killed    crashed
stopping      stopping      stopping      running  stopping   stopping      stopping      stopping   idle       finished   failed     killed        failed            killed    crashed
idle          idle          idle          running  idle       idle          idle          stopping   idle       finished   failed     killed        failed            killed    idle
finished      finished      finished      running  finished   finished      finished      finished   finished   finished   finished   finished      finished          finished  finished
failed        failed        failed        running  failed     failed        failed        failed     failed     failed     failed     failed        failed            failed    failed
crashed       crashed       crashed       running  running    crashed       crashed       stopping   idle       finished   failed     killed        failed            killed    crashed
killed        killed        killed        running  killed     killed        killed        killed     killed     killed     killed     killed        killed            killed    killed
preempted     preempted     initializing  running  preempted  preempted     preempted     preempted  preempted  preempted  preempted  preempted     preempted         killed    preempted
"""
"""Rows: the run's state; columns: the event; cells: the state after it."""

SWEEP_EVENTS: dict[str, AnySweepEvent] = {
    "created": sweep_event(SweepCreated),
    "paused": sweep_event(SweepPaused),
    "resumed": sweep_event(SweepResumed),
    "stopped": sweep_event(SweepStopped),
    "cancelled": sweep_event(SweepCancelled),
    "finished": sweep_event(SweepFinished),
    "failed": sweep_event(SweepFailed),
    "crashed": sweep_event(SweepCrashed),
}

SWEEP_TABLE = """
           created    paused     resumed    stopped    cancelled  finished   failed     crashed
running    running    paused     running    stopped    cancelled  finished   failed     crashed
paused     paused     paused     running    stopped    cancelled  finished   failed     crashed
stopped    stopped    stopped    stopped    stopped    cancelled  finished   failed     crashed
cancelled  cancelled  cancelled  cancelled  cancelled  cancelled  cancelled  cancelled  cancelled
finished   finished   finished   finished   finished   finished   finished   finished   finished
failed     failed     failed     failed     failed     failed     failed     failed     failed
crashed    crashed    crashed    crashed    crashed    crashed    crashed    crashed    crashed
"""
"""Rows: the sweep's state; columns: the event; cells: the state after it."""


def parse_table(table: str) -> dict[tuple[str, str], str]:
    """``{(state, column): expected}`` from a whitespace-aligned table."""
    header, *rows = [line.split() for line in table.strip().splitlines()]
    cells = {}
    for state, *expected in rows:
        assert len(header) == len(expected), f"row {state!r} has {len(expected)} cells"
        cells.update({(state, column): after for column, after in zip(header, expected)})
    return cells


RUN_CELLS = parse_table(RUN_TABLE)
SWEEP_CELLS = parse_table(SWEEP_TABLE)


def cases(cells: dict[tuple[str, str], str], kind: str) -> list[Any]:
    """Parametrize one test case per cell, with an id like ``running-run.exited(0)->finished``."""
    return [
        pytest.param(state, column, expected, id=f"{state}-{kind}.{column}->{expected}")
        for (state, column), expected in cells.items()
    ]


class TestRunTable:
    def test_table_covers_every_state_and_event_type(self) -> None:
        """The table has a row per run state and a column for every run event type."""
        assert set(RUN_STATES) == {state for state, _ in RUN_CELLS}
        assert set(RUN_EVENT_TYPES) == {type(event) for event in RUN_EVENTS.values()}
        assert set(RUN_EVENTS) == {column for _, column in RUN_CELLS}

    @pytest.mark.parametrize(("state", "column", "expected"), cases(RUN_CELLS, "run"))
    def test_transition(self, state: str, column: str, expected: str) -> None:
        """The event moves a run in this state to the state the contract gives."""
        assert expected == evolve(run_in(state), RUN_EVENTS[column]).state

    @pytest.mark.parametrize(("state", "column", "expected"), cases(RUN_CELLS, "run"))
    def test_transition_keeps_identity(self, state: str, column: str, expected: str) -> None:
        """No transition changes the run's id or creation time."""
        run = run_in(state)
        after = evolve(run, RUN_EVENTS[column])
        assert (run.run_id, run.created_at) == (after.run_id, after.created_at)

    @pytest.mark.parametrize(
        ("state", "column", "expected"),
        [case for case in cases(RUN_CELLS, "run") if case.values[0] != case.values[2] or case.values[1] == "started"],
    )
    def test_state_change_is_applied(self, state: str, column: str, expected: str) -> None:
        """Every cell that changes the state (or starts an attempt) has the effect ``applied``."""
        assert "applied" == effect(run_in(state), RUN_EVENTS[column])


START_EVENTS: dict[str, AnyRunEvent] = {
    "started": run_event(RunStarted),
    "started@1": run_event(RunStarted, attempt=1),
    "started@2": run_event(RunStarted, attempt=2),
    "started@5": run_event(RunStarted, attempt=5),
}

ATTEMPT_TABLE = """
              started  started@1  started@2  started@5
pending       1        1          2          5
initializing  1        1          2          5
running       2        stale      2          5
stopping      2        stale      2          5
idle          2        stale      2          5
finished      2        stale      2          5
failed        2        stale      2          5
crashed       2        stale      2          5
killed        2        stale      2          5
preempted     2        stale      2          5
"""
"""Rows: the run's state (attempt 1); columns: a start without or with an attempt; cells: the attempt
the run is in after it, or ``stale`` (changes nothing)."""

HEARTBEAT_EVENTS: dict[str, AnyRunEvent] = {
    "older": run_event(RunHeartbeat, at=T1, step=7),
    "same-instant": run_event(RunHeartbeat, at=T2, step=7),
    "newer": run_event(RunHeartbeat, at=T4, step=7),
}

HEARTBEAT_TABLE = """
              older    same-instant  newer
pending       applied  applied       applied
initializing  applied  applied       applied
running       late     late          applied
stopping      late     late          applied
idle          late     late          applied
finished      late     late          late
failed        late     late          late
crashed       late     late          applied
killed        late     late          late
preempted     late     late          late
"""
"""Rows: the run's state (pending and initializing have no heartbeat yet, the others last at T2);
columns: a heartbeat (step 7) at T1, at T2, at T4; cells: its effect."""

ATTEMPT_CELLS = parse_table(ATTEMPT_TABLE)
HEARTBEAT_CELLS = parse_table(HEARTBEAT_TABLE)


class TestAttemptTable:
    def test_table_covers_every_state(self) -> None:
        """The attempt table has a row per run state and a column per kind of start."""
        assert (set(RUN_STATES), set(START_EVENTS)) == ({s for s, _ in ATTEMPT_CELLS}, {c for _, c in ATTEMPT_CELLS})

    @pytest.mark.parametrize(("state", "column", "expected"), cases(ATTEMPT_CELLS, "run"))
    def test_start(self, state: str, column: str, expected: str) -> None:
        """A start moves the run to the attempt the contract gives, or is stale and changes nothing."""
        run = run_in(state)
        result, after = step(run, START_EVENTS[column])
        if expected == "stale":
            assert ("stale", run, run) == (result, after, evolve(run, START_EVENTS[column]))
        else:
            assert ("applied", "running", int(expected)) == (result, after.state, after.attempt)


class TestHeartbeatTable:
    def test_table_covers_every_state(self) -> None:
        """The heartbeat table has a row per run state."""
        assert set(RUN_STATES) == {state for state, _ in HEARTBEAT_CELLS}

    @pytest.mark.parametrize(("state", "column", "expected"), cases(HEARTBEAT_CELLS, "run"))
    def test_heartbeat(self, state: str, column: str, expected: str) -> None:
        """A heartbeat applies, or is late and leaves the run exactly as it was."""
        run = run_in(state)
        result, after = step(run, HEARTBEAT_EVENTS[column])
        assert expected == result
        if expected == "late":
            assert (run, run) == (after, evolve(run, HEARTBEAT_EVENTS[column]))
        else:
            assert (7, HEARTBEAT_EVENTS[column].at) == (after.step, after.last_heartbeat_at)


class TestSweepTable:
    def test_table_covers_every_state_and_event_type(self) -> None:
        """The table has a row per sweep state and a column for every sweep event type."""
        assert set(SWEEP_STATES) == {state for state, _ in SWEEP_CELLS}
        assert set(SWEEP_EVENT_TYPES) == {type(event) for event in SWEEP_EVENTS.values()}

    @pytest.mark.parametrize(("state", "column", "expected"), cases(SWEEP_CELLS, "sweep"))
    def test_transition(self, state: str, column: str, expected: str) -> None:
        """The event moves a sweep in this state to the state the contract implies."""
        sweep = Sweep(sweep_id="s1", state=state, created_at=T0, updated_at=T1)  # type: ignore[arg-type]
        assert expected == evolve_sweep(sweep, SWEEP_EVENTS[column]).state

    @pytest.mark.parametrize(("state", "column", "expected"), cases(SWEEP_CELLS, "sweep"))
    def test_updated_at_follows_state(self, state: str, column: str, expected: str) -> None:
        """``updated_at`` becomes the event's time exactly when the state changes."""
        sweep = Sweep(sweep_id="s1", state=state, created_at=T0, updated_at=T1)  # type: ignore[arg-type]
        assert (T4 if expected != state else T1) == evolve_sweep(sweep, SWEEP_EVENTS[column]).updated_at


class TestNewEntities:
    def test_unknown_run_is_created_pending(self) -> None:
        """An event of a run never seen creates it as pending at the event's time."""
        assert Run(run_id="r1", state="pending", created_at=T4) == new_run(RUN_EVENTS["heartbeat"])

    def test_unknown_sweep_is_created_running(self) -> None:
        """An event of a sweep never seen creates it as running at the event's time."""
        expected = Sweep(sweep_id="s1", state="running", created_at=T4, updated_at=T4)
        assert expected == new_sweep(SWEEP_EVENTS["paused"])

    def test_sweep_created_does_not_reopen_a_sweep(self) -> None:
        """``sweep.created`` on a sweep that exists changes nothing."""
        sweep = Sweep(sweep_id="s1", state="cancelled", created_at=T0, updated_at=T1)
        assert sweep == evolve_sweep(sweep, SWEEP_EVENTS["created"])

    def test_queued_records_sweep_and_origin(self) -> None:
        """``run.queued`` on a pending run records its sweep and the run it reproduces."""
        event = run_event(RunQueued, sweep_id="s1", reproduced_from="r0")
        after = evolve(run_in("pending"), event)
        assert ("pending", "s1", "r0") == (after.state, after.sweep_id, after.reproduced_from)


class TestStart:
    @pytest.mark.parametrize("state", ["pending", "initializing"])
    def test_first_start_is_attempt_one(self, state: str) -> None:
        """Rule 2: the first start of a run keeps attempt 1 and records when it started."""
        after = evolve(run_in(state), RUN_EVENTS["started"])
        assert ("running", 1, T4) == (after.state, after.attempt, after.started_at)

    @pytest.mark.parametrize(
        "state", ["running", "stopping", "idle", "finished", "failed", "crashed", "killed", "preempted"]
    )
    def test_start_after_start_is_a_resume(self, state: str) -> None:
        """Rule 2: a start of a run that started before increments the attempt."""
        after = evolve(run_in(state, attempt=3), RUN_EVENTS["started"])
        assert ("running", 4) == (after.state, after.attempt)

    def test_resume_clears_preempting(self) -> None:
        """Rule 2: a resume clears the preempting mark of the previous attempt."""
        after = evolve(run_in("preempted"), RUN_EVENTS["started"])
        assert (2, False) == (after.attempt, after.preempting)

    def test_resume_clears_preempting_of_a_live_attempt(self) -> None:
        """Rule 2: a resume of a run still marked preempting starts unmarked."""
        after = evolve(run_in("running", preempting=True), RUN_EVENTS["started"])
        assert ("running", 2, False) == (after.state, after.attempt, after.preempting)

    def test_resume_forgets_the_previous_end(self) -> None:
        """A resumed run is running again: no end time, exit code or signal of the last attempt."""
        after = evolve(run_in("preempted"), RUN_EVENTS["started"])
        assert (T4, None, None, None) == (after.started_at, after.ended_at, after.exit_code, after.signal)

    def test_start_with_a_higher_attempt_starts_that_attempt(self) -> None:
        """Attempts: a start naming attempt 7 on a preempted run of attempt 1 starts attempt 7."""
        after = evolve(run_in("preempted"), run_event(RunStarted, attempt=7))
        assert ("running", 7) == (after.state, after.attempt)

    def test_start_with_an_attempt_on_a_new_run(self) -> None:
        """Attempts: a new run's first event, a start of attempt 3, puts it at attempt 3, and its
        attempt-3 events then apply instead of being fenced as a zombie's."""
        first = run_event(RunStarted, at=T1, attempt=3)
        run = evolve(new_run(first), first)
        beat = run_event(RunHeartbeat, id="ev-2", at=T2, attempt=3, step=5)
        assert ((3, "running"), "applied") == ((run.attempt, run.state), effect(run, beat))
        assert 5 == evolve(run, beat).step

    @pytest.mark.parametrize("attempt", [1, 2])
    def test_start_of_an_attempt_already_started_is_stale(self, attempt: int) -> None:
        """Attempts: a start naming the run's attempt (2) or an earlier one changes nothing and is stale."""
        run = run_in("running", attempt=2, step=40)
        event = run_event(RunStarted, attempt=attempt)
        assert (run, "stale") == (evolve(run, event), effect(run, event))

    def test_stale_start_does_not_resume_a_finished_run(self) -> None:
        """Attempts: a late start of the attempt that finished leaves the run finished."""
        after = evolve(run_in("finished"), run_event(RunStarted, attempt=1))
        assert ("finished", 1, 0) == (after.state, after.attempt, after.exit_code)

    def test_start_of_a_run_killed_while_pending_needs_a_new_attempt(self) -> None:
        """Attempts: a run killed before it started has used attempt 1; a start naming 1 is stale."""
        run = evolve(run_in("pending"), RUN_EVENTS["killed"])
        assert ("stale", "applied") == (effect(run, run_event(RunStarted, attempt=1)),
                                        effect(run, run_event(RunStarted, attempt=2)))

    def test_resume_clears_the_last_heartbeat(self) -> None:
        """Attempts: a new attempt keeps its own heartbeat clock: the previous attempt's last heartbeat goes."""
        after = evolve(run_in("preempted", last_heartbeat_at=T3), RUN_EVENTS["started"])
        assert (2, None) == (after.attempt, after.last_heartbeat_at)

    def test_first_start_keeps_the_attempts_heartbeat(self) -> None:
        """Attempts: the first start of the attempt a heartbeat already revived keeps that heartbeat."""
        run = evolve(run_in("pending"), run_event(RunHeartbeat, at=T2))
        after = evolve(run, run_event(RunStarted, id="ev-2", at=T3))
        assert (1, T2) == (after.attempt, after.last_heartbeat_at)

    def test_start_joins_the_given_sweep(self) -> None:
        """A start naming a sweep records it on the run."""
        assert "s9" == evolve(run_in("pending"), run_event(RunStarted, sweep_id="s9")).sweep_id


class TestHeartbeat:
    def test_heartbeat_records_progress(self) -> None:
        """Rule 3: a heartbeat updates last_heartbeat_at, step and progress."""
        after = evolve(run_in("running"), run_event(RunHeartbeat, step=12, progress=0.5))
        assert (T4, 12, 0.5) == (after.last_heartbeat_at, after.step, after.progress)

    def test_heartbeat_without_progress_keeps_it(self) -> None:
        """Rule 3: a bare heartbeat keeps the step and progress already known."""
        after = evolve(run_in("running", step=3, progress=0.25), run_event(RunHeartbeat))
        assert (T4, 3, 0.25) == (after.last_heartbeat_at, after.step, after.progress)

    def test_heartbeat_revives_crashed(self) -> None:
        """Rule 3: a crashed run that heartbeats again is running, with no end time."""
        after = evolve(run_in("crashed"), RUN_EVENTS["heartbeat"])
        assert ("running", T4, None) == (after.state, after.last_heartbeat_at, after.ended_at)

    def test_older_heartbeat_does_not_move_the_run_back(self) -> None:
        """Attempts: after a heartbeat at step 10, an older one at step 3 changes nothing and is late."""
        run = evolve(run_in("running"), run_event(RunHeartbeat, at=T4, step=10, progress=0.5))
        older = run_event(RunHeartbeat, id="ev-2", at=T3, step=3, progress=0.1)
        assert (run, "late") == (evolve(run, older), effect(run, older))
        assert (T4, 10, 0.5) == (run.last_heartbeat_at, run.step, run.progress)

    def test_same_instant_heartbeat_is_late(self) -> None:
        """Attempts: a heartbeat at the instant of the last one applied (it may be that one again) is late."""
        run = evolve(run_in("running"), run_event(RunHeartbeat, at=T4, step=10))
        again = run_event(RunHeartbeat, id="ev-2", at=T4.astimezone(timezone(timedelta(hours=2))), step=3)
        assert (run, "late") == (evolve(run, again), effect(run, again))

    def test_heartbeat_of_the_crash_evidence_does_not_revive(self) -> None:
        """Rules 3 and 9: only a heartbeat later than the crash's evidence revives the run."""
        crashed = evolve(run_in("running"), run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2))
        assert ("crashed", "running") == (evolve(crashed, run_event(RunHeartbeat, at=T2)).state,
                                          evolve(crashed, run_event(RunHeartbeat, at=T3)).state)

    def test_older_heartbeat_does_not_revive_a_crashed_run(self) -> None:
        """Attempts and rule 9: a heartbeat older than the crashed run's last one is no sign of life."""
        assert "crashed" == evolve(run_in("crashed"), run_event(RunHeartbeat, at=T1)).state

    def test_new_attempt_heartbeat_older_than_the_previous_attempt_applies(self) -> None:
        """Attempts: the comparison restarts with each attempt (another host keeps another clock)."""
        resumed = evolve(run_in("preempted", last_heartbeat_at=T3, step=50), RUN_EVENTS["started"])
        after = evolve(resumed, run_event(RunHeartbeat, id="ev-2", at=T2, attempt=2, step=20))
        assert ("running", 2, T2, 20) == (after.state, after.attempt, after.last_heartbeat_at, after.step)

    def test_heartbeat_compares_instants_not_offsets(self) -> None:
        """Attempts: a heartbeat written with another offset but at a later instant applies."""
        later = (T2 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-5)))
        assert "applied" == effect(run_in("running"), run_event(RunHeartbeat, at=later, step=8))

    @pytest.mark.parametrize("state", sorted(TERMINAL | {"preempted"}))
    def test_late_heartbeat_changes_nothing(self, state: str) -> None:
        """Rule 3: a heartbeat of a terminal or preempted run changes nothing."""
        run = run_in(state)
        assert run == evolve(run, RUN_EVENTS["heartbeat"])

    @pytest.mark.parametrize("state", sorted(TERMINAL | {"preempted"}))
    def test_late_heartbeat_is_counted_late(self, state: str) -> None:
        """Rule 3: a heartbeat of a terminal or preempted run has the effect ``late``."""
        assert "late" == effect(run_in(state), RUN_EVENTS["heartbeat"])


class TestSignal:
    def test_signal_is_recorded_without_state_change(self) -> None:
        """Rule 4: a signal is recorded and the run keeps its state."""
        after = evolve(run_in("running"), RUN_EVENTS["signalled"])
        assert ("running", 10) == (after.state, after.signal)


class TestPreemption:
    def test_preempting_marks_the_attempt(self) -> None:
        """Rule 5: ``run.preempting`` marks the current attempt and keeps the state."""
        after = evolve(run_in("running"), RUN_EVENTS["preempting"])
        assert ("running", True) == (after.state, after.preempting)

    def test_preempting_then_nonzero_exit_is_preempted(self) -> None:
        """Rule 7: a preempting attempt that exits non-zero is preempted."""
        after = evolve(run_in("running", preempting=True), RUN_EVENTS["exited(1)"])
        assert ("preempted", 1, T4) == (after.state, after.exit_code, after.ended_at)

    def test_preempting_then_exit_by_signal_is_preempted(self) -> None:
        """Rule 7: a preempting attempt ended by a signal is preempted, not killed."""
        after = evolve(run_in("running", preempting=True), RUN_EVENTS["exited(sig9)"])
        assert ("preempted", 137, 9) == (after.state, after.exit_code, after.signal)

    def test_preempting_then_exit_zero_is_finished(self) -> None:
        """Rule 7: a preempting attempt that exits 0 finished its work."""
        after = evolve(run_in("running", preempting=True), RUN_EVENTS["exited(0)"])
        assert ("finished", 0) == (after.state, after.exit_code)

    def test_preempting_while_stopping_then_nonzero_exit_is_preempted(self) -> None:
        """Rule 7: the preempting mark survives ``run.stopping``."""
        run = evolve(evolve(run_in("running"), RUN_EVENTS["preempting"]), RUN_EVENTS["stopping"])
        assert "preempted" == evolve(run, RUN_EVENTS["exited(1)"]).state


class TestExit:
    @pytest.mark.parametrize(
        ("column", "state", "code", "signal"),
        [
            ("exited(0)", "finished", 0, None),
            ("exited(1)", "failed", 1, None),
            ("exited(sig9)", "killed", 137, 9),
        ],
    )
    def test_exit_records_code_signal_and_end(
        self, column: str, state: str, code: int, signal: int | None
    ) -> None:
        """Rule 7: an exit ends the run with its exit code and signal at the event's time."""
        after = evolve(run_in("running"), RUN_EVENTS[column])
        assert (state, code, signal, T4) == (after.state, after.exit_code, after.signal, after.ended_at)

    def test_exit_zero_by_signal_is_killed(self) -> None:
        """Rule 7: an exit by signal is killed even when its exit code is 0."""
        assert "killed" == evolve(run_in("running"), run_event(RunExited, exit_code=0, signal=15)).state

    @pytest.mark.parametrize(
        ("reason", "state"),
        [("time-limit", "failed"), ("oom", "failed"), ("scancel", "killed"), (None, "killed")],
    )
    def test_exit_by_signal_with_a_failure_reason_is_failed(self, reason: str | None, state: str) -> None:
        """Rule 7: an exit by signal whose reason names a broken limit (time-limit, oom) is failed, not killed."""
        after = evolve(run_in("running"), run_event(RunExited, exit_code=143, signal=15, reason=reason))
        assert (state, 143, 15) == (after.state, after.exit_code, after.signal)

    def test_preempting_wins_over_a_failure_reason(self) -> None:
        """Rule 7: a preempting attempt ends preempted whatever reason its exit gives."""
        event = run_event(RunExited, exit_code=143, signal=15, reason="time-limit")
        assert "preempted" == evolve(run_in("running", preempting=True), event).state

    def test_failure_reason_without_signal_keeps_the_exit_code_rule(self) -> None:
        """Rule 7: a reason changes nothing for an exit by code: 0 finished, else failed."""
        assert "finished" == evolve(run_in("running"), run_event(RunExited, exit_code=0, reason="oom")).state

    def test_killed_run_records_exit_and_stays_killed(self) -> None:
        """Rule 7: the exit of a killed run is recorded and the run stays killed."""
        after = evolve(run_in("killed"), RUN_EVENTS["exited(sig9)"])
        assert ("killed", 137, 9) == (after.state, after.exit_code, after.signal)

    @pytest.mark.parametrize("state", ["finished", "failed"])
    def test_second_exit_changes_nothing(self, state: str) -> None:
        """A finished or failed run keeps its exit when another exit arrives."""
        run = run_in(state)
        assert run == evolve(run, RUN_EVENTS["exited(sig9)"])


class TestKill:
    @pytest.mark.parametrize("state", ["pending", "initializing", "running", "stopping", "idle", "crashed", "preempted"])
    def test_kill_ends_a_non_terminal_run(self, state: str) -> None:
        """Rule 8: ``run.killed`` ends every non-terminal run at the event's time."""
        after = evolve(run_in(state), RUN_EVENTS["killed"])
        assert ("killed", T4) == (after.state, after.ended_at)

    @pytest.mark.parametrize("state", sorted(TERMINAL))
    def test_kill_of_terminal_run_changes_nothing(self, state: str) -> None:
        """Rule 8: a terminal run ignores ``run.killed`` entirely."""
        run = run_in(state)
        assert run == evolve(run, RUN_EVENTS["killed"])


class TestCrash:
    def test_crash_after_last_heartbeat(self) -> None:
        """Rule 9: a crash naming the run's last heartbeat crashes it at the event's time."""
        after = evolve(run_in("running"), run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2))
        assert ("crashed", T4) == (after.state, after.ended_at)

    def test_crash_ignored_after_newer_heartbeat(self) -> None:
        """Rule 9: a heartbeat after the crash's last_heartbeat_at keeps the run alive."""
        run = run_in("running", last_heartbeat_at=T3)
        event = run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2)
        assert (run, "unchanged") == (evolve(run, event), effect(run, event))

    def test_crash_ignored_after_heartbeat_in_the_stream(self) -> None:
        """Rule 9: stream order decides: a heartbeat recorded before the crash wins over it."""
        run = evolve(run_in("running"), run_event(RunHeartbeat, at=T3))
        event = run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2)
        assert "running" == evolve(run, event).state

    def test_crash_of_run_that_never_heartbeat(self) -> None:
        """Rule 9: a run with no heartbeat at all crashes on a crash that saw none."""
        event = run_event(RunCrashed, reason="heartbeat-timeout")
        assert "crashed" == evolve(run_in("initializing"), event).state

    def test_crash_compares_instants_not_offsets(self) -> None:
        """Rule 9: the same instant written with another offset is not a newer heartbeat."""
        same_instant = T2.astimezone(timezone(timedelta(hours=-5)))
        event = run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=same_instant)
        assert "crashed" == evolve(run_in("running"), event).state

    def test_crash_applies_after_an_older_heartbeat(self) -> None:
        """Rule 9 and Attempts: an older heartbeat between the last one and the crash saves nothing."""
        run = evolve(run_in("running"), run_event(RunHeartbeat, at=T1))
        assert "crashed" == evolve(run, run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2)).state

    def test_crash_seeing_no_heartbeat_of_a_resumed_attempt_applies(self) -> None:
        """Rule 9 and Attempts: a resumed attempt with no heartbeat yet crashes on a crash that saw none."""
        resumed = evolve(run_in("preempted"), RUN_EVENTS["started"])
        crash = run_event(RunCrashed, id="ev-2", reason="heartbeat-timeout", attempt=2)
        assert "crashed" == evolve(resumed, crash).state

    def test_crash_then_heartbeat_is_running(self) -> None:
        """Rules 3 and 9: a run wrongly found dead comes back with its next heartbeat."""
        crashed = evolve(run_in("running"), run_event(RunCrashed, reason="heartbeat-timeout", last_heartbeat_at=T2))
        assert "running" == evolve(crashed, run_event(RunHeartbeat, id="ev-2", at=T4 + timedelta(seconds=1))).state


class TestFencing:
    @pytest.mark.parametrize(
        "column", [column for column, event in RUN_EVENTS.items() if not isinstance(event, RunStarted)]
    )
    def test_other_attempt_changes_nothing(self, column: str) -> None:
        """Rule 10: an event of another attempt changes nothing and is ``stale``."""
        run = run_in("running", attempt=2)
        event = replace(RUN_EVENTS[column], attempt=1)
        assert (run, "stale") == (evolve(run, event), effect(run, event))

    @pytest.mark.parametrize("column", ["exited(1)", "killed", "crashed", "heartbeat", "stopping"])
    def test_current_attempt_applies(self, column: str) -> None:
        """Rule 10: an event carrying the run's current attempt applies as usual."""
        run = run_in("running", attempt=2)
        assert "applied" == effect(run, replace(RUN_EVENTS[column], attempt=2))

    def test_zombie_exit_after_resume_is_stale(self) -> None:
        """Rule 10: the old attempt's exit after a resume cannot end the new attempt."""
        resumed = evolve(run_in("preempted"), RUN_EVENTS["started"])
        zombie = run_event(RunExited, id="ev-2", exit_code=143, signal=15, attempt=1)
        assert (resumed, "stale") == (evolve(resumed, zombie), effect(resumed, zombie))


class TestEffect:
    def test_applied(self) -> None:
        """An event that changes the run has the effect ``applied``."""
        assert "applied" == effect(run_in("running"), RUN_EVENTS["exited(0)"])

    def test_unchanged(self) -> None:
        """An event that changes nothing, for no special reason, is ``unchanged``."""
        assert "unchanged" == effect(run_in("pending"), RUN_EVENTS["crashed"])

    def test_stale_wins_over_late(self) -> None:
        """A heartbeat of another attempt is ``stale`` even on a finished run."""
        assert "stale" == effect(run_in("finished"), replace(RUN_EVENTS["heartbeat"], attempt=2))


class TestReasonOf:
    @pytest.mark.parametrize(
        ("event", "expected"),
        [
            pytest.param(RUN_EVENTS["exited(1)"], "exit code 1", id="exit-code"),
            pytest.param(RUN_EVENTS["exited(0)"], "exit code 0", id="exit-zero"),
            pytest.param(RUN_EVENTS["exited(sig9)"], "signal 9", id="signal"),
            pytest.param(RUN_EVENTS["exited(sig9,oom)"], "oom", id="exit-reason"),
            pytest.param(run_event(RunKilled, reason="sweep-cancelled", cause="c-1"), "sweep-cancelled", id="killed"),
            pytest.param(RUN_EVENTS["crashed"], "heartbeat-timeout", id="crashed"),
            pytest.param(run_event(RunIdle, reason="protected"), "protected", id="idle"),
            pytest.param(sweep_event(SweepStopped, reason="budget spent"), "budget spent", id="sweep"),
            pytest.param(RUN_EVENTS["queued"], None, id="queued"),
        ],
    )
    def test_reason(self, event: AnyRunEvent | AnySweepEvent, expected: str | None) -> None:
        """A history entry's reason says why: exit code, signal or the stated reason."""
        assert expected == reason_of(event)

    @pytest.mark.parametrize("event", [*RUN_EVENTS.values(), *SWEEP_EVENTS.values()], ids=lambda e: type(e).__name__)
    def test_every_event_type_has_a_reason_or_none(self, event: AnyRunEvent | AnySweepEvent) -> None:
        """``reason_of`` answers for every event type (its match is exhaustive)."""
        assert reason_of(event) is None or isinstance(reason_of(event), str)
