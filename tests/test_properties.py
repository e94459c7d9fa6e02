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

from ledger.events import (
    RUN_EVENT_TYPES,
    SWEEP_EVENT_TYPES,
    AnyEvent,
    RunCrashed,
    RunEvent,
    RunExited,
    RunHeartbeat,
    RunPreempting,
    RunStarted,
    decode_event,
    encode_event,
    subject_of,
)
from ledger.fold import Entry, Recorded, Views
from ledger.machine import (
    SWEEP_TERMINAL,
    TERMINAL,
    Run,
    Sweep,
    effect,
    evolve,
    evolve_sweep,
)

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
        """An event id seen before, inserted anywhere later at a later seq, changes nothing."""
        if not events:
            return
        inserted: dict[int, list[AnyEvent]] = {}
        for _ in range(data.draw(st.integers(0, 8), label="duplicates")):
            original = data.draw(st.integers(0, len(events) - 1), label="original")
            before = data.draw(st.integers(original + 1, len(events)), label="inserted before")
            copy = data.draw(st.sampled_from(events) | pooled_events, label="same id, any content")
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
        """Applying a stream a second time answers ``duplicate`` for every event and changes nothing."""
        stream = record(events)
        views = fold_all(stream)
        before = (dict(views.runs), dict(views.sweeps), list(views.history))
        second = [views.apply(rec) for rec in record(events, lambda i: 1000 + i)]
        assert (["duplicate"] * len(events), before) == (second, state(views))

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
