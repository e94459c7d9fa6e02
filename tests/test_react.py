"""The core's reactions: crash on silence (on the ledger's clock), kill on cancel, finish when done."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.core.events import RunHeartbeat, RunStarted
from ledger.core.fold import Recorded, RecordedRun, Views, as_run
from ledger.core.machine import ALIVE, RUN_STATES, TERMINAL, Run, Sweep, evolve
from ledger.core.react import crash_deadline, crash_on_silence, derived_id, finish_when_done, kill_on_cancel

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=3)


def recorded(seq: int, at_s: float, recorded_s: float, event_kind: type = RunHeartbeat) -> Recorded:
    """An event of run r1 produced at ``at_s`` (producer clock) and recorded at ``recorded_s`` (stream clock)."""
    event = event_kind(id=f"e{seq}", at=T0 + timedelta(seconds=at_s), run_id="r1")
    return Recorded(seq, T0 + timedelta(seconds=recorded_s), event)


class TestCrashOnSilence:
    @settings(max_examples=200, deadline=None)
    @given(
        skew_s=st.floats(-86_400 * 30, 86_400 * 30, allow_nan=False),
        rate=st.floats(0.25, 4.0),
        gaps=st.lists(st.floats(0.001, 2.999), min_size=1, max_size=40),
        probe=st.floats(0.0, 1.0),
    )
    def test_heartbeats_within_the_timeout_are_never_crashed(self, skew_s: float, rate: float, gaps: list[float],
                                                             probe: float) -> None:
        """A run that heartbeats within the timeout on the ledger's clock is never crashed, whatever its
        producer clock (off by up to a month either way, running slow or fast)."""
        views = Views()
        views.apply(recorded(1, skew_s, 0.0, RunStarted))
        now_s = 0.0
        for seq, gap in enumerate(gaps, start=2):
            # any moment of the silence before the next heartbeat lands
            run = views.runs["r1"]
            assert crash_on_silence(run, T0 + timedelta(seconds=now_s + gap * probe), TIMEOUT) is None
            now_s += gap
            views.apply(recorded(seq, skew_s + now_s * rate, now_s))
        assert ("running", None) == (views.runs["r1"].state,
                                     crash_on_silence(views.runs["r1"], T0 + timedelta(seconds=now_s + 2.999), TIMEOUT))

    @settings(max_examples=100, deadline=None)
    @given(skew_s=st.floats(-86_400 * 30, 86_400 * 30, allow_nan=False), silence=st.floats(3.0, 10_000.0))
    def test_silence_past_the_timeout_crashes_and_the_crash_applies(self, skew_s: float, silence: float) -> None:
        """A run silent for the timeout on the ledger's clock gets a crash, whatever its producer clock,
        and that crash moves it to crashed."""
        views = Views()
        views.apply(recorded(1, skew_s, 0.0, RunStarted))
        views.apply(recorded(2, skew_s + 1, 1.0))
        run = views.runs["r1"]
        crash = crash_on_silence(run, T0 + timedelta(seconds=1 + silence), TIMEOUT)
        assert crash is not None
        assert ("crashed", "heartbeat-timeout", run.last_heartbeat_at) == (
            evolve(run, crash).state, crash.reason, crash.last_heartbeat_at)

    def test_crash_id_is_made_of_recorded_facts(self) -> None:
        """Two monitors deciding on the same views at different moments derive the same crash id; a newer
        sign of life gives another id."""
        views = Views().fold([recorded(1, 0, 0, RunStarted), recorded(2, 1, 1)])
        run = views.runs["r1"]
        first, second = (crash_on_silence(run, T0 + timedelta(seconds=s), TIMEOUT) for s in (10, 20))
        views.apply(recorded(3, 2, 2))
        later = crash_on_silence(views.runs["r1"], T0 + timedelta(seconds=30), TIMEOUT)
        assert first is not None and second is not None and later is not None
        assert (True, False) == (first.id == second.id, first.id == later.id)

    @pytest.mark.parametrize("state", RUN_STATES)
    def test_only_alive_runs_are_watched(self, state: str) -> None:
        """Only initializing, running and stopping runs have a crash deadline."""
        run = RecordedRun(run_id="r1", state=state, last_seen_at=T0)  # type: ignore[arg-type]
        expected = T0 + TIMEOUT if state in ALIVE else None
        assert (expected, expected is not None) == (
            crash_deadline(run, TIMEOUT), crash_on_silence(run, T0 + TIMEOUT, TIMEOUT) is not None)


class TestSweepReactions:
    def _runs(self) -> list[Run]:
        return [Run(run_id=f"r-{s}", sweep_id="s1", state=s, attempt=2) for s in RUN_STATES]  # type: ignore[arg-type]

    def test_cancel_kills_every_non_terminal_run_once(self) -> None:
        """A cancelled sweep's non-terminal runs each get run.killed (sweep-cancelled, cause = the cancel),
        with ids that do not depend on when it is decided."""
        sweep = Sweep(sweep_id="s1", state="cancelled")
        kills = kill_on_cancel(sweep, "cancel-1", self._runs(), T0)
        again = kill_on_cancel(sweep, "cancel-1", self._runs(), T0 + timedelta(hours=1))
        assert sorted(f"r-{s}" for s in RUN_STATES if s not in TERMINAL) == sorted(k.run_id for k in kills)
        assert {("sweep-cancelled", "cancel-1", 2)} == {(k.reason, k.cause, k.attempt) for k in kills}
        assert [k.id for k in kills] == [k.id for k in again]

    @pytest.mark.parametrize("state", ["running", "paused", "stopped", "finished"])
    def test_only_a_cancelled_sweep_kills(self, state: str) -> None:
        """A sweep that is not cancelled kills nothing."""
        assert [] == kill_on_cancel(Sweep(sweep_id="s1", state=state), "x", self._runs(), T0)  # type: ignore[arg-type]

    def test_stopped_sweep_finishes_once_its_runs_are_done(self) -> None:
        """A stopped sweep finishes once none of its runs is non-terminal, under one id per stop."""
        sweep = Sweep(sweep_id="s1", state="stopped")
        done = [Run(run_id=f"r-{s}", sweep_id="s1", state=s) for s in sorted(TERMINAL)]  # type: ignore[arg-type]
        finished = finish_when_done(sweep, "stop-1", done, T0)
        assert finished is not None
        assert (None, derived_id("finish", "s1", "stop-1"), "stopped and all runs done") == (
            finish_when_done(sweep, "stop-1", self._runs(), T0), finished.id, finished.reason)


class TestLastSeen:
    def test_only_applied_events_are_signs_of_life(self) -> None:
        """The fold stamps last_seen_at with the stream's clock of each applied event; a late heartbeat or a
        zombie's event of another attempt is no sign of life; readers get the contract's Run without it."""
        views = Views().fold([recorded(1, 100, 0, RunStarted), recorded(2, 105, 5)])
        late = Recorded(3, T0 + timedelta(seconds=9), RunHeartbeat(id="e3", at=T0 + timedelta(seconds=101),
                                                                    run_id="r1"))
        zombie = Recorded(4, T0 + timedelta(seconds=12), RunHeartbeat(id="e4", at=T0 + timedelta(seconds=200),
                                                                      run_id="r1", attempt=7))
        assert ("late", "stale") == (views.apply(late), views.apply(zombie))
        run = views.runs["r1"]
        assert (T0 + timedelta(seconds=5), 2) == (run.last_seen_at, run.seq)  # type: ignore[attr-defined]
        assert ("last_seen_at" in RecordedRun.__struct_fields__, "last_seen_at" in Run.__struct_fields__,
                Run) == (True, False, type(as_run(run)))
