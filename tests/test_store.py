"""The projector's writes reach SQLite exactly: every value of a run, sweep and
history entry reads back as it was folded (real SQLite, no NATS needed).

Runs, history and seen ids are written as one JSON parameter per table
(``batch_writes``), so these check that nothing is lost on the way through
JSON: floats to the last bit, 64-bit integers, text with quotes and
non-ASCII, times to the microsecond, nulls.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.fold import Entry, Views
from ledger.machine import RUN_STATES, Run
from projections.schema import SCHEMA, entry_from_row, run_from_row
from projections.store import batch_writes

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
times = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC))
int64 = st.integers(min_value=0, max_value=2**63 - 1)

runs = st.builds(
    Run,
    run_id=ids,
    sweep_id=st.none() | ids,
    state=st.sampled_from(RUN_STATES),
    attempt=st.integers(min_value=1, max_value=2**63 - 1),
    created_at=st.none() | times,
    started_at=st.none() | times,
    ended_at=st.none() | times,
    last_heartbeat_at=st.none() | times,
    step=st.none() | int64,
    progress=st.none() | st.floats(min_value=0.0, max_value=1.0),
    exit_code=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    signal=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    preempting=st.booleans(),
    reproduced_from=st.none() | ids,
    seq=int64,
)
entries = st.builds(
    Entry, state=st.sampled_from(RUN_STATES), at=times, recorded_at=times, seq=int64, event_id=ids,
    event_type=st.just("run.exited"), reason=st.none() | texts,
)


@pytest.fixture(scope="module")
def con() -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(SCHEMA)
    yield db
    db.close()


def write(con: sqlite3.Connection, views: Views) -> None:
    con.execute("BEGIN")
    for w in batch_writes(views, [], 1):
        (con.executemany if w.many else con.execute)(w.sql, w.params)
    con.execute("COMMIT")


def bits(x: float | None) -> bytes | None:
    return None if x is None else struct.pack("<d", x)


@settings(max_examples=300, deadline=None)
@given(run=runs)
def test_run_reads_back_exactly(con: sqlite3.Connection, run: Run) -> None:
    """A run written through the JSON upsert reads back equal, its progress to the last bit."""
    views = Views({run.run_id: run})
    views.dirty_runs.add(run.run_id)
    write(con, views)
    got = run_from_row(con.execute("SELECT * FROM runs WHERE run_id = ?", (run.run_id,)).fetchone())
    assert run == got
    assert bits(run.progress) == bits(got.progress)


@settings(max_examples=200, deadline=None)
@given(entry=entries, entity=ids)
def test_history_entry_reads_back_exactly(con: sqlite3.Connection, entry: Entry, entity: str) -> None:
    """History entries keep their reason text (quotes, non-ASCII, empty) and times as written."""
    views = Views()
    views.history.append(("run", entity, entry))
    views.new_ids.append((entry.event_id, entry.seq))
    write(con, views)
    row = con.execute("SELECT state, at, recorded_at, seq, event_id, event_type, reason FROM history "
                      "WHERE kind = 'run' AND entity_id = ? AND seq = ?", (entity, entry.seq)).fetchone()
    assert entry == entry_from_row(row)
    assert con.execute("SELECT 1 FROM seen WHERE event_id = ?", (entry.event_id,)).fetchone() is not None
