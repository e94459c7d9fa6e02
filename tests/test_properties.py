"""Properties of the pure core over generated events (STYLE: property tests).

Hypothesis ignores ``msgspec.Meta`` constraints, so events are generated from
msgspec's own type information (``msgspec.inspect``), with strategies
registered below for the constrained types: ids of ``[A-Za-z0-9_-]`` and
timezone-aware datetimes. Streams draw run ids, sweep ids and times from small
pools so that events of one run meet and heartbeats and crashes name the same
instants; event ids come from a wide range, so that they collide now and then.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from ledger.core.events import (
    RUN_EVENT_TYPES,
    SWEEP_EVENT_TYPES,
    AnyEvent,
    RunCrashed,
    RunEvent,
    RunExited,
    RunHeartbeat,
    RunPreempting,
    RunQueued,
    RunStarted,
    decode_event,
    encode_event,
    subject_of,
)
from ledger.core.fold import Entry, Recorded, Views
from ledger.core.machine import (
    SWEEP_TERMINAL,
    TERMINAL,
    Run,
    Sweep,
    effect,
    evolve,
    evolve_sweep,
    used_attempt,
)
from projections.views.lookups import BatchKeys

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
EVENT_ID_PATTERN = mi.type_info(RunStarted).fields[0].type.pattern  # type: ignore[attr-defined]
ENTITY_ID_PATTERN = mi.type_info(RunStarted).fields[3].type.pattern  # type: ignore[attr-defined]
INT64 = (-(2**63), 2**63 - 1)
EPOCH = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda minutes: timezone(timedelta(minutes=minutes)))
aware_datetimes = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets | st.just(UTC)
)
"""RFC 3339 times: any instant, with a UTC offset in whole minutes."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(*INT64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)

CONSTRAINED: dict[str, st.SearchStrategy[Any]] = {
    EVENT_ID_PATTERN: st.text(ID_CHARS, min_size=1, max_size=64),
    ENTITY_ID_PATTERN: st.text(ID_CHARS, min_size=1, max_size=128),
}
"""Strategies for the constrained string types, by their msgspec pattern."""


Pools = dict[str, st.SearchStrategy[Any]]
"""Strategies by field name that override the type's, so that generated events meet each other."""


def from_type_info(t: mi.Type, field: str = "", pools: Pools | None = None) -> st.SearchStrategy[Any]:
    """A strategy for values of a msgspec type that honours its constraints."""
    if pools and field in pools and not isinstance(t, (mi.UnionType, mi.NoneType)):
        return pools[field]
    match t:
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType(ge=ge, le=le):
            return st.integers(INT64[0] if ge is None else ge, INT64[1] if le is None else le)
        case mi.FloatType(ge=ge, le=le):
            return st.floats(ge, le, allow_nan=False, allow_infinity=False)
        case mi.StrType(pattern=None):
            return st.text(max_size=12)
        case mi.StrType(pattern=pattern):
            return CONSTRAINED[pattern]  # a new constrained type needs a strategy here
        case mi.DateTimeType():
            return aware_datetimes
        case mi.LiteralType(values=values):
            return st.sampled_from(values)
        case mi.UnionType(types=types):
            return st.one_of(*(from_type_info(member, field, pools) for member in types))
        case mi.ListType(item_type=item):
            return st.lists(from_type_info(item), max_size=3)
        case mi.DictType(key_type=key, value_type=value):
            return st.dictionaries(from_type_info(key), from_type_info(value), max_size=3)
        case mi.AnyType():
            return json_values
        case mi.StructType(cls=cls, fields=fields):
            return st.builds(cls, **{f.name: from_type_info(f.type, f.name, pools) for f in fields})
    raise NotImplementedError(f"no strategy for {t!r}")


def structs(cls: type, pools: Pools | None = None) -> st.SearchStrategy[Any]:
    """Instances of a msgspec struct, every field drawn within its constraints."""
    return from_type_info(mi.type_info(cls), pools=pools)


RUN_IDS = ("r1", "r2")
SWEEP_IDS = ("s1", "s2")
TIMES = (
    EPOCH,
    EPOCH + timedelta(seconds=30),
    (EPOCH + timedelta(seconds=30)).astimezone(timezone(timedelta(hours=-5))),  # the same instant
    EPOCH + timedelta(minutes=5),
    EPOCH - timedelta(minutes=5),
    (EPOCH + timedelta(hours=1)).astimezone(timezone(timedelta(hours=5, minutes=30))),
)
POOLS: Pools = {
    "id": st.integers(0, 10**6).map(lambda n: f"e{n}"),
    "cause": st.integers(0, 10**6).map(lambda n: f"e{n}"),
    "run_id": st.sampled_from(RUN_IDS),
    "reproduced_from": st.sampled_from(RUN_IDS),
    "sweep_id": st.sampled_from(SWEEP_IDS),
    "at": st.sampled_from(TIMES),
    "last_heartbeat_at": st.sampled_from(TIMES),
    "created_at": st.sampled_from(TIMES),
    "started_at": st.sampled_from(TIMES),
    "ended_at": st.sampled_from(TIMES),
    "updated_at": st.sampled_from(TIMES),
    "attempt": st.sampled_from([1, 1, 2, 3]),
    "exit_code": st.sampled_from([0, 1, 137, 143]),
    "signal": st.sampled_from([2, 9, 15]),
    "config": st.just({"lr": 0.1}),
    "command": st.just(["python", "train.py"]),
}

any_event = st.one_of(*(structs(cls) for cls in RUN_EVENT_TYPES + SWEEP_EVENT_TYPES))
"""Any valid event, with unconstrained ids and times."""
run_events = st.one_of(*(structs(cls, POOLS) for cls in RUN_EVENT_TYPES))
lifecycle_events = st.one_of(
    *(structs(cls, POOLS) for cls in (RunStarted, RunHeartbeat, RunPreempting, RunExited, RunCrashed))
)
"""The run events that move runs the most, drawn more often so streams reach every state."""
sweep_events = st.one_of(*(structs(cls, POOLS) for cls in SWEEP_EVENT_TYPES))
pooled_events = st.one_of(run_events, lifecycle_events, lifecycle_events, sweep_events)
"""Events of two runs and two sweeps."""
event_lists = st.lists(pooled_events, max_size=8) | st.lists(pooled_events, min_size=20, max_size=60)
"""Short streams, and long ones where runs live through several attempts."""
runs = structs(Run, POOLS)
sweeps = structs(Sweep, POOLS)


def record(events: list[AnyEvent], seq_of: Callable[[int], int] = lambda i: i + 1) -> list[Recorded]:
    """The events as a stream records them: increasing seq, the stream's clock from the seq."""
    return [Recorded(seq_of(i), EPOCH + timedelta(seconds=seq_of(i)), event) for i, event in enumerate(events)]


def fold_all(stream: list[Recorded]) -> Views:
    """One Views folding the whole stream."""
    return Views().fold(stream)


def state(views: Views) -> tuple[dict[str, Run], dict[str, Sweep], list[tuple[str, str, Entry]]]:
    """What a fold produced: runs, sweeps and history."""
    return views.runs, views.sweeps, views.history


class TestFold:
    @settings(max_examples=300)
    @given(events=event_lists, cuts=st.lists(st.integers(0, 60), max_size=8))
    def test_batches_fold_like_one_by_one(self, events: list[AnyEvent], cuts: list[int]) -> None:
        """Folding in batches, carrying only what a projector stores between them, equals one fold."""
        stream = record(events)
        bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
        runs: dict[str, Run] = {}
        sweeps: dict[str, Sweep] = {}
        seen: set[str] = set()
        history: list[tuple[str, str, Entry]] = []
        for lo, hi in itertools.pairwise(bounds):
            views = Views(runs=dict(runs), sweeps=dict(sweeps), seen=set(seen)).fold(stream[lo:hi])
            runs.update({run_id: views.runs[run_id] for run_id in views.dirty_runs})
            sweeps.update({sweep_id: views.sweeps[sweep_id] for sweep_id in views.dirty_sweeps})
            seen.update(event_id for event_id, _ in views.new_ids)
            history.extend(views.history)
        assert state(fold_all(stream)) == (runs, sweeps, history)

    @settings(max_examples=300)
    @given(events=event_lists, data=st.data())
    def test_duplicates_change_nothing(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """An event id seen before, inserted anywhere later at a later seq, changes nothing: with any
        content when the views remember the id, as the very same event when it is a forgotten heartbeat."""
        if not events:
            return
        remembered = {event_id for event_id, _ in fold_all(record(events)).new_ids}
        inserted: dict[int, list[AnyEvent]] = {}
        for _ in range(data.draw(st.integers(0, 8), label="duplicates")):
            original = data.draw(st.integers(0, len(events) - 1), label="original")
            before = data.draw(st.integers(original + 1, len(events)), label="inserted before")
            if events[original].id in remembered:
                copy = data.draw(st.sampled_from(events) | pooled_events, label="same id, any content")
            else:
                copy = events[original]  # a heartbeat delivered again: the same event
            inserted.setdefault(before, []).append(replace(copy, id=events[original].id))
        plain = [Recorded(100 * (i + 1), EPOCH + timedelta(seconds=100 * (i + 1)), e) for i, e in enumerate(events)]
        with_duplicates: list[Recorded] = []
        for i in range(len(events) + 1):
            for j, dup in enumerate(inserted.get(i, [])):
                seq = 100 * i + j + 1
                with_duplicates.append(Recorded(seq, EPOCH + timedelta(seconds=seq), dup))
            with_duplicates.extend(plain[i : i + 1])
        assert state(fold_all(plain)) == state(fold_all(with_duplicates))

    @settings(max_examples=100)
    @given(events=event_lists)
    def test_apply_reports_duplicates(self, events: list[AnyEvent]) -> None:
        """Applying a stream a second time changes nothing: ``duplicate`` for every event the views
        remember, ``late`` or ``stale`` for a heartbeat they do not."""
        stream = record(events)
        views = fold_all(stream)
        remembered = set(views.seen)
        before = (dict(views.runs), dict(views.sweeps), list(views.history))
        second = [views.apply(rec) for rec in record(events, lambda i: 1000 + i)]
        expected = [("duplicate",) if e.id in remembered else ("late", "stale") for e in events]
        assert ([True] * len(events), before) == ([o in e for o, e in zip(second, expected)], state(views))

    @settings(max_examples=100)
    @given(events=event_lists)
    def test_history_ends_in_current_state(self, events: list[AnyEvent]) -> None:
        """Rule 11: each run's and sweep's last history entry holds its current state."""
        views = fold_all(record(events))
        last = {(kind, key): entry.state for kind, key, entry in views.history}
        current = {("run", k): r.state for k, r in views.runs.items()}
        current.update({("sweep", k): s.state for k, s in views.sweeps.items()})
        assert current == last

    @settings(max_examples=100)
    @given(events=event_lists)
    def test_history_entries_are_changes(self, events: list[AnyEvent]) -> None:
        """Rule 11: consecutive entries of a run change its state or start an attempt; of a sweep, its state."""
        views = fold_all(record(events))
        previous: dict[tuple[str, str], Entry] = {}
        for kind, key, entry in views.history:
            before = previous.get((kind, key))
            if before is not None:
                assert before.seq < entry.seq
                assert entry.state != before.state or entry.event_type == "run.started"
            previous[(kind, key)] = entry

    @settings(max_examples=100)
    @given(events=event_lists)
    def test_seq_is_an_event_of_the_run(self, events: list[AnyEvent]) -> None:
        """A run's ``seq`` is the seq of one of its events, no earlier than its last history entry."""
        stream = record(events)
        views = fold_all(stream)
        last_entry = {key: entry.seq for kind, key, entry in views.history if kind == "run"}
        for run_id, run in views.runs.items():
            own = {rec.seq for rec in stream if isinstance(rec.event, RunEvent) and rec.event.run_id == run_id}
            assert (True, True) == (run.seq in own, run.seq >= last_entry[run_id])


def views_at_every_point(stream: list[Recorded]) -> list[tuple[Any, ...]]:
    """The runs, sweeps and history after each event of the stream, folded one by one."""
    views = Views()
    points = []
    for rec in stream:
        views.apply(rec)
        points.append((dict(views.runs), dict(views.sweeps), list(views.history)))
    return points


def inserted(stream: list[Recorded], at: int, events: list[AnyEvent]) -> list[Recorded]:
    """``stream`` (seqs 100, 200, ...) with ``events`` recorded between its ``at``-th and next event."""
    extra = [Recorded(100 * at + j + 1, EPOCH + timedelta(seconds=100 * at + j + 1), e) for j, e in enumerate(events)]
    return [*stream[:at], *extra, *stream[at:]]


def spaced(events: list[AnyEvent]) -> list[Recorded]:
    """The events recorded at seqs 100, 200, ... (room to insert events between them)."""
    return record(events, lambda i: 100 * (i + 1))


class TestAttempts:
    @settings(max_examples=300)
    @given(events=event_lists, data=st.data())
    def test_late_heartbeat_changes_no_view(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """A heartbeat older than the last one applied in the run's attempt changes no view at any point."""
        stream = spaced(events)
        at = data.draw(st.integers(0, len(stream)), label="inserted after")
        before = Views().fold(stream[:at])
        candidates = [r for r in before.runs.values() if r.last_heartbeat_at is not None]
        if not candidates:
            return
        run = data.draw(st.sampled_from(candidates), label="run")
        beat = RunHeartbeat(id=f"late-{at}", run_id=run.run_id,
                            at=run.last_heartbeat_at - data.draw(st.sampled_from([timedelta(microseconds=1),
                                                                                 timedelta(hours=1)])),
                            attempt=data.draw(st.sampled_from([None, run.attempt]), label="attempt"),
                            step=data.draw(st.none() | st.integers(0, 100), label="step"),
                            progress=data.draw(st.none() | st.floats(0, 1), label="progress"))
        plain = views_at_every_point(stream)
        with_late = views_at_every_point(inserted(stream, at, [beat]))
        assert plain == with_late[:at] + with_late[at + 1:]
        assert "late" == Views(runs=dict(before.runs)).apply(Recorded(1, EPOCH, beat))

    @settings(max_examples=300)
    @given(events=event_lists, data=st.data())
    def test_stale_start_changes_no_view(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """A start naming an attempt its run already started changes no view at any point, and implies no sweep."""
        stream = spaced(events)
        at = data.draw(st.integers(0, len(stream)), label="inserted after")
        before = Views().fold(stream[:at])
        candidates = [r for r in before.runs.values() if used_attempt(r) > 0]
        if not candidates:
            return
        run = data.draw(st.sampled_from(candidates), label="run")
        start = RunStarted(id=f"stale-{at}", run_id=run.run_id, at=data.draw(st.sampled_from(TIMES), label="at"),
                           attempt=data.draw(st.integers(1, used_attempt(run)), label="attempt"),
                           sweep_id=data.draw(st.sampled_from([None, "s1", "s-new"]), label="sweep"))
        plain = views_at_every_point(stream)
        with_stale = views_at_every_point(inserted(stream, at, [start]))
        assert plain == with_stale[:at] + with_stale[at + 1:]

    @settings(max_examples=300)
    @given(events=event_lists, data=st.data())
    def test_start_with_attempt_then_its_events_apply(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """After any history, a start naming a new attempt N starts N, and N's heartbeat and exit apply."""
        views = Views().fold(spaced(events))
        run_id = data.draw(st.sampled_from(RUN_IDS), label="run")
        used = used_attempt(views.runs[run_id]) if run_id in views.runs else 0
        n = used + data.draw(st.integers(1, 3), label="attempts skipped + 1")
        late = max(t.astimezone(UTC) for t in TIMES) + timedelta(hours=1)
        steps = [
            RunStarted(id="n-start", run_id=run_id, at=late, attempt=n),
            RunHeartbeat(id="n-beat", run_id=run_id, at=late + timedelta(seconds=1), attempt=n, step=9),
            RunExited(id="n-exit", run_id=run_id, at=late + timedelta(seconds=2), attempt=n, exit_code=0),
        ]
        effects = [views.apply(rec) for rec in record(steps, lambda i: 10_000 + i)]
        run = views.runs[run_id]
        assert (["applied"] * 3, "finished", n, 9) == (effects, run.state, run.attempt, run.step)

    @settings(max_examples=300)
    @given(events=event_lists)
    def test_attempt_never_goes_down_and_heartbeats_never_go_back(self, events: list[AnyEvent]) -> None:
        """Along any stream a run's attempt never decreases, and within an attempt neither does its last heartbeat."""
        views = Views()
        for rec in record(events):
            before = views.runs.get(getattr(rec.event, "run_id", ""))
            views.apply(rec)
            after = views.runs.get(getattr(rec.event, "run_id", ""))
            if before is not None and after is not None:
                assert before.attempt <= after.attempt
                if before.attempt == after.attempt and before.last_heartbeat_at is not None:
                    assert after.last_heartbeat_at is not None and before.last_heartbeat_at <= after.last_heartbeat_at


heartbeat_rich_lists = st.lists(st.one_of(pooled_events, structs(RunHeartbeat, POOLS)), min_size=1, max_size=40)
"""Streams where half the events are heartbeats (of two runs, with or without an attempt)."""


def points(stream: list[Recorded]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The outcome of each event, and the runs, sweeps, history and seen ids after it, folded one by one."""
    views = Views()
    outcomes, after = [], []
    for rec in stream:
        outcomes.append(views.apply(rec))
        after.append((dict(views.runs), dict(views.sweeps), list(views.history), set(views.seen)))
    return outcomes, after


class TestRedeliveredHeartbeats:
    """CONTRACT sections 1 and 9: the views keep no id per heartbeat, yet a heartbeat delivered
    again, however late, changes nothing."""

    @settings(max_examples=500)
    @given(events=heartbeat_rich_lists, data=st.data())
    def test_redelivered_heartbeat_changes_no_view(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """Any heartbeat of a stream delivered again at any later points changes no run, sweep, history
        entry or seen id at any point, and answers late, stale or duplicate."""
        stream = spaced(events)
        beats = [i for i, rec in enumerate(stream) if type(rec.event) is RunHeartbeat]
        if not beats:
            return
        copies: dict[int, list[AnyEvent]] = {}
        for _ in range(data.draw(st.integers(1, 4), label="re-deliveries")):
            original = data.draw(st.sampled_from(beats), label="heartbeat")
            later = data.draw(st.integers(original + 1, len(stream)), label="delivered again before")
            copies.setdefault(later, []).append(stream[original].event)
        with_copies: list[Recorded] = []
        originals: list[int] = []
        for i in range(len(stream) + 1):
            with_copies += [Recorded(100 * i + j + 1, EPOCH + timedelta(seconds=100 * i + j + 1), e)
                            for j, e in enumerate(copies.get(i, []))]
            if i < len(stream):
                originals.append(len(with_copies))
                with_copies.append(stream[i])
        plain_outcomes, plain = points(stream)
        outcomes, after = points(with_copies)
        assert plain == [after[k] for k in originals]
        assert plain_outcomes == [outcomes[k] for k in originals]
        assert {"late", "stale", "duplicate"} >= {o for k, o in enumerate(outcomes) if k not in set(originals)}

    @settings(max_examples=300)
    @given(events=heartbeat_rich_lists)
    def test_seen_grows_with_state_changes_not_heartbeats(self, events: list[AnyEvent]) -> None:
        """A heartbeat naming an attempt the run already has leaves no seen id; every other event leaves one."""
        views = Views()
        for rec in record(events):
            event = rec.event
            run = views.runs.get(getattr(event, "run_id", ""))
            before = len(views.new_ids)
            outcome = views.apply(rec)
            named = type(event) is RunHeartbeat and event.attempt is not None \
                and event.attempt <= (run.attempt if run else 1)  # type: ignore[union-attr]
            assert (0 if named or outcome == "duplicate" else 1) == len(views.new_ids) - before


class TestImpliedSweeps:
    @settings(max_examples=300)
    @given(events=event_lists)
    def test_a_run_never_points_at_an_unknown_sweep(self, events: list[AnyEvent]) -> None:
        """Every sweep a run names exists in the same views, with a history entry."""
        views = fold_all(record(events))
        with_history = {key for kind, key, _ in views.history if kind == "sweep"}
        named = {run.sweep_id for run in views.runs.values() if run.sweep_id is not None}
        assert (named, named) == (named & set(views.sweeps), named & with_history)

    @settings(max_examples=300)
    @given(events=event_lists, cuts=st.lists(st.integers(0, 60), max_size=8))
    def test_batches_onto_their_keys_fold_like_one_fold(self, events: list[AnyEvent], cuts: list[int]) -> None:
        """Folding each batch onto only the rows its keys name (as the projector and rebuild load them)
        equals one fold of the whole stream: a batch never takes a known sweep for a new one."""
        stream = record(events)
        bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
        runs: dict[str, Run] = {}
        sweeps: dict[str, Sweep] = {}
        seen: set[str] = set()
        history: list[tuple[str, str, Entry]] = []
        for lo, hi in itertools.pairwise(bounds):
            keys = BatchKeys.of(stream[lo:hi])
            views = Views(runs={k: runs[k] for k in keys.run_ids if k in runs},
                          sweeps={k: sweeps[k] for k in keys.sweep_ids if k in sweeps},
                          seen=seen & keys.event_ids).fold(stream[lo:hi])
            runs.update({run_id: views.runs[run_id] for run_id in views.dirty_runs})
            sweeps.update({sweep_id: views.sweeps[sweep_id] for sweep_id in views.dirty_sweeps})
            seen.update(event_id for event_id, _ in views.new_ids)
            history.extend(views.history)
        assert state(fold_all(stream)) == (runs, sweeps, history)

    @settings(max_examples=200)
    @given(events=event_lists, data=st.data())
    def test_first_naming_event_creates_the_sweep(self, events: list[AnyEvent], data: st.DataObject) -> None:
        """A queued or started event naming a sweep never seen, on a new run, makes it running at its time."""
        views = Views().fold(record(events))
        kind = data.draw(st.sampled_from([RunQueued, RunStarted]), label="kind")
        when = data.draw(st.sampled_from(TIMES), label="at")
        views.apply(Recorded(999, EPOCH, kind(id="names-it", run_id="r-new", at=when, sweep_id="s-new")))
        sweep = views.sweeps["s-new"]
        entry = [e for k, key, e in views.history if (k, key) == ("sweep", "s-new")]
        assert (("running", when, when, 999), ["running"]) == (
            (sweep.state, sweep.created_at, sweep.updated_at, sweep.seq), [e.state for e in entry])


class TestTotality:
    @settings(max_examples=300)
    @given(run=runs, event=run_events)
    def test_evolve_never_raises(self, run: Run, event: RunEvent) -> None:
        """``evolve`` and ``effect`` take any run and any run event."""
        assert isinstance(evolve(run, event), Run)  # type: ignore[arg-type]
        assert effect(run, event) in {"applied", "unchanged", "late", "stale"}  # type: ignore[arg-type]

    @settings(max_examples=200)
    @given(sweep=sweeps, event=sweep_events)
    def test_evolve_sweep_never_raises(self, sweep: Sweep, event: Any) -> None:
        """``evolve_sweep`` takes any sweep and any sweep event."""
        assert isinstance(evolve_sweep(sweep, event), Sweep)

    @settings(max_examples=150)
    @given(known=st.lists(runs, max_size=3), known_sweeps=st.lists(sweeps, max_size=2), events=event_lists)
    def test_apply_never_raises(self, known: list[Run], known_sweeps: list[Sweep], events: list[AnyEvent]) -> None:
        """``Views.apply`` takes any event on top of any runs and sweeps."""
        views = Views(runs={r.run_id: r for r in known}, sweeps={s.sweep_id: s for s in known_sweeps})
        results = {views.apply(rec) for rec in record(events)}
        assert results <= {"applied", "unchanged", "late", "stale", "duplicate"}


class TestTerminal:
    @settings(max_examples=300)
    @given(run=runs.filter(lambda r: r.state in TERMINAL), event=run_events)
    def test_terminal_run_leaves_only_by_resume(self, run: Run, event: RunEvent) -> None:
        """A finished, failed or killed run changes state only on ``run.started``."""
        after = evolve(run, event)  # type: ignore[arg-type]
        assert after.state == run.state or isinstance(event, RunStarted)

    @settings(max_examples=150)
    @given(events=event_lists)
    def test_terminal_run_leaves_only_by_resume_in_a_stream(self, events: list[AnyEvent]) -> None:
        """In any stream, a history entry after a terminal one comes from ``run.started``."""
        previous: dict[str, str] = {}
        for kind, key, entry in fold_all(record(events)).history:
            if kind == "run" and previous.get(key) in TERMINAL:
                assert "run.started" == entry.event_type
            previous[key] = entry.state

    @settings(max_examples=200)
    @given(sweep=sweeps.filter(lambda s: s.state in SWEEP_TERMINAL), event=sweep_events)
    def test_ended_sweep_never_moves(self, sweep: Sweep, event: Any) -> None:
        """A cancelled, finished, failed or crashed sweep ignores every sweep event."""
        assert sweep == evolve_sweep(sweep, event)


class TestEncoding:
    @settings(max_examples=500)
    @given(event=any_event)
    def test_round_trip(self, event: AnyEvent) -> None:
        """An encoded event decodes to itself on its subject."""
        assert event == decode_event(subject_of(event), encode_event(event))

    @settings(max_examples=200)
    @given(event=any_event)
    def test_payload_is_a_json_object_with_type(self, event: AnyEvent) -> None:
        """The payload is a JSON object whose ``type`` is the subject's kind and name."""
        _, kind, _, name = subject_of(event).split(".")
        assert f"{kind}.{name}" == msgspec.json.decode(encode_event(event))["type"]
