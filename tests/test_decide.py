"""The Decider: the start decision of the ledger's publishers (``decide_start``), with and without a
requested attempt (CONTRACT section 2, "Attempts" and the resume table), and every command x state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from msgspec.structs import replace

from ledger.core.decide import (
    SWEEP_COMMANDS,
    ClaimRun,
    KillRun,
    QueueRun,
    Refused,
    StartRefused,
    StartRun,
    decide_start,
)
from ledger.core.decide import decide as decide_command
from ledger.core.events import RunStarted, tag_of
from ledger.core.machine import Run, Sweep, evolve, evolve_sweep, new_sweep

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


# --------------------------------------------------------------------------- the command table

SWEEP_STATES = ("running", "paused", "stopped", "cancelled", "finished", "failed", "crashed")
RUN_STATES = ("pending", "initializing", "running", "stopping", "idle",
              "finished", "failed", "crashed", "killed", "preempted")

SWEEP_MOVES = {
    "create": {},
    "pause": {"running": "sweep.paused"},
    "resume": {"paused": "sweep.resumed"},
    "stop": {"running": "sweep.stopped", "paused": "sweep.stopped"},
    "cancel": {"running": "sweep.cancelled", "paused": "sweep.cancelled", "stopped": "sweep.cancelled"},
}
"""For each verb, the states it moves a sweep from and the event it appends (CONTRACT sections 2 and 3)."""
SWEEP_ALREADY = {"create": None, "pause": "paused", "resume": "running", "stop": "stopped", "cancel": "cancelled"}
"""The state in which a verb's outcome already holds: it appends nothing."""


def _sweep_outcome(verb: str, state: str | None) -> str:
    """What ``ledger sweep VERB s1`` does on a sweep in ``state`` (None: no such sweep), in one line."""
    if verb == "create":
        return "sweep.created" if state is None else f"refused sweep-exists: sweep 's1' already exists ({state})"
    if state is None:
        return "refused sweep-unknown: unknown sweep 's1': create it first"
    if state == SWEEP_ALREADY[verb]:
        return "nothing"
    if state in SWEEP_MOVES[verb]:
        return SWEEP_MOVES[verb][state]
    return f"refused sweep-cannot-move: cannot {verb} sweep 's1': it is {state}"


def _run_outcome(command: str, state: str | None) -> str:
    """What ``ledger runs kill r1`` / a claim from the queue does on a run in ``state``, in one line."""
    if state is None:
        return "refused run-unknown: unknown run 'r1'"
    if command == "kill":
        if state == "killed":
            return "nothing"
        if state in ("finished", "failed"):
            return f"refused run-terminal: run 'r1' is {state}: nothing to kill"
        return "run.killed"
    if state == "preempted":
        return "run.initializing"
    return f"refused run-not-queued: run 'r1' is {state}: not in its sweep's queue"


SWEEP_CASES = [(verb, state, _sweep_outcome(verb, state)) for verb in SWEEP_COMMANDS for state in (None, *SWEEP_STATES)]
RUN_CASES = [(cmd, state, _run_outcome(cmd, state)) for cmd in ("kill", "claim") for state in (None, *RUN_STATES)]


def _outcome(command: object, run: Run | None = None, sweep: Sweep | None = None) -> str:
    try:
        events = decide_command(command, run, sweep)  # type: ignore[arg-type]
    except Refused as refused:
        return f"refused {refused.rule}: {refused}"
    assert len(events) <= 1
    return tag_of(events[0]) if events else "nothing"


def _case_id(case: tuple[str, str | None, str]) -> str:
    command, state, outcome = case
    return f"{command}-{state or 'unknown'}->{outcome.split(':')[0]}"


class TestDecideTable:
    @pytest.mark.parametrize("case", SWEEP_CASES, ids=[_case_id(c) for c in SWEEP_CASES])
    def test_sweep_verb(self, case: tuple[str, str | None, str]) -> None:
        """Each sweep verb on each sweep state appends its event, nothing (already so), or refuses with the rule."""
        verb, state, expected = case
        sweep = Sweep(sweep_id="s1", state=state) if state is not None else None  # type: ignore[arg-type]
        command = SWEEP_COMMANDS[verb](id="e1", at=NOW, sweep_id="s1", reason="why")
        assert expected == _outcome(command, sweep=sweep)

    @pytest.mark.parametrize("case", RUN_CASES, ids=[_case_id(c) for c in RUN_CASES])
    def test_run_command(self, case: tuple[str, str | None, str]) -> None:
        """Kill and claim on each run state append their event, nothing (already so), or refuse with the rule."""
        name, state, expected = case
        run = run_in(state, attempt=3) if state is not None else None
        command = (KillRun(id="e1", at=NOW, run_id="r1") if name == "kill"
                   else ClaimRun(id="e1", at=NOW, run_id="r1"))
        assert expected == _outcome(command, run)

    @pytest.mark.parametrize("case", SWEEP_CASES + RUN_CASES, ids=[_case_id(c) for c in SWEEP_CASES + RUN_CASES])
    def test_decided_events_move_the_state(self, case: tuple[str, str | None, str]) -> None:
        """What decide appends, folded, moves the run or sweep (a command never appends a no-op), and
        deciding again on the result appends nothing or is refused (idempotent)."""
        command_name, state, expected = case
        if expected == "nothing" or expected.startswith("refused"):
            return
        if command_name in SWEEP_COMMANDS:
            sweep = Sweep(sweep_id="s1", state=state) if state is not None else None  # type: ignore[arg-type]
            command = SWEEP_COMMANDS[command_name](id="e1", at=NOW, sweep_id="s1")
            (event,) = decide_command(command, sweep=sweep)
            after = evolve_sweep(sweep or new_sweep(event), event)  # type: ignore[arg-type]
            assert (after.state, "nothing" if command_name != "create" else "refused") == (
                command.target, _outcome(replace(command, id="e2"), sweep=after).split(" ")[0])
        else:
            run = run_in(state, attempt=3)  # type: ignore[arg-type]
            cmd = KillRun(id="e1", at=NOW, run_id="r1") if command_name == "kill" else ClaimRun(id="e1", at=NOW,
                                                                                                run_id="r1")
            (event,) = decide_command(cmd, run)
            after = evolve(run, event)  # type: ignore[arg-type]
            assert (True, 3) == (after != run, event.attempt)

    def test_kill_reason_defaults_to_the_user(self) -> None:
        """A kill without a reason says a user killed the run; the command's id and time are the event's."""
        (event,) = decide_command(KillRun(id="e9", at=NOW, run_id="r1"), run_in("running"))
        assert ("killed by user", "e9", NOW) == (event.reason, event.id, event.at)  # type: ignore[union-attr]

    def test_queue_and_start_through_decide(self) -> None:
        """Queue and start are commands too: a new run is queued or started as attempt 1; a closed sweep refuses."""
        closed = Sweep(sweep_id="s1", state="paused")
        (queued,) = decide_command(QueueRun(id="e1", at=NOW, run_id="r1", sweep_id="s1"), None, Sweep(sweep_id="s1"))
        (start,) = decide_command(StartRun(id="e2", at=NOW, run_id="r1"), None)
        with pytest.raises(StartRefused) as refused:
            decide_command(StartRun(id="e3", at=NOW, run_id="r1", sweep_id="s1"), None, closed)
        assert (("run.queued", "run.started", 1), "sweep-closed") == (
            (tag_of(queued), tag_of(start), start.attempt), refused.value.rule)


class TestCoreMatches:
    def test_every_match_in_the_core_ends_in_assert_never(self) -> None:
        """Every ``match`` in ledger/core ends with ``case _: assert_never(...)``, so a new event or command
        type is a type error where it is not handled."""
        import ast
        from pathlib import Path

        import ledger.core

        found = []
        for path in sorted(Path(ledger.core.__file__).parent.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Match):
                    last = node.cases[-1]
                    call = last.body[-1]
                    ok = (isinstance(last.pattern, ast.MatchAs) and last.pattern.pattern is None
                          and isinstance(call, ast.Expr) and isinstance(call.value, ast.Call)
                          and getattr(call.value.func, "id", None) == "assert_never")
                    found.append((path.name, node.lineno, ok))
        assert [] != found
        assert [] == [f for f in found if not f[2]]
