"""The projector's writes reach SQLite exactly: every value of a run, sweep and
history entry reads back as it was folded (real SQLite, no NATS needed).

Runs, history and seen ids are written as one JSON parameter per table
(``batch_writes``), so these check that nothing is lost on the way through
JSON: floats to the last bit, 64-bit integers, text with quotes and
non-ASCII, times to the microsecond, nulls.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.core.events import AnyEvent, encode_event, subject_of
from ledger.core.fold import Entry, Views
from ledger.core.machine import RUN_STATES, Run
from ledger.nats.stream import StreamMessage
from projections.views.lookups import BatchKeys, ViewCache, read_views
from projections.views.schema import SCHEMA, entry_from_row, run_from_row
from projections.views.store import (
    CheckpointMoved,
    Folded,
    apply_batch,
    batch_writes,
    commit_batch,
    decode_batch,
    fold,
    open_db,
)
from tests.factory import dump_views, exited, heartbeat, started
from tests.test_properties import EPOCH, event_lists

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


# --------------------------------------------------------------------------- pipelined commits


def as_messages(events: list[AnyEvent]) -> list[StreamMessage]:
    """The events as the reader hands them over: seq 1.., the stream's clock, encoded payloads."""
    return [StreamMessage(i + 1, EPOCH + timedelta(seconds=i + 1), subject_of(e), encode_event(e), None, 0)
            for i, e in enumerate(events)]


async def project_pipelined(path: Path, msgs: list[StreamMessage], size: int) -> None:
    """What the projector does: batch N+1 read and folded (through a read-only connection and a
    ViewCache of two batches) before batch N commits, each commit expecting the checkpoint the one
    before left (sequences may have gaps)."""
    db = await open_db(path)
    lookups = await open_db(path, readonly=True)
    cache = ViewCache(2 * size)
    pending: tuple[Folded, int] | None = None
    last = 0
    try:
        for i in range(0, len(msgs), size):
            batch = msgs[i:i + size]
            good, bad = decode_batch(batch)
            views = await read_views(lookups, BatchKeys.of(good), cache)
            folded = fold(views, good, bad, batch[-1].seq)
            cache.folded(views)
            if pending is not None:
                await commit_batch(db, *pending)
            pending, last = (folded, last), batch[-1].seq
        if pending is not None:
            await commit_batch(db, *pending)
    finally:
        await lookups.close()
        await db.close()


async def project_plainly(path: Path, msgs: list[StreamMessage]) -> None:
    db = await open_db(path)
    try:
        for msg in msgs:
            await apply_batch(db, [msg])
    finally:
        await db.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_lists, size=st.integers(1, 7))
def test_pipelined_commits_equal_one_by_one(events: list[AnyEvent], size: int) -> None:
    """Folding each batch before the previous one commits, with a cache of two batches (evicting as it
    goes), gives the same views as applying event by event: duplicates and rows of runs evicted from
    the cache included."""
    msgs = as_messages(events + events[: len(events) // 2])  # the first half again: duplicates
    with tempfile.TemporaryDirectory() as tmp:
        piped, plain = Path(tmp) / "piped.db", Path(tmp) / "plain.db"
        asyncio.run(project_pipelined(piped, msgs, size))
        asyncio.run(project_plainly(plain, msgs))
        assert dump_views(plain) == dump_views(piped)


class TestCheckpointGuard:
    """A commit lands only on the checkpoint its fold assumed; another writer's move is refused whole."""

    @pytest.mark.parametrize("quarantined", [False, True], ids=["one-statement", "bound-rows"])
    async def test_moved_checkpoint_refuses_the_commit(self, tmp_path: Path, quarantined: bool) -> None:
        path = tmp_path / "v.db"
        msgs = as_messages([started("r1"), heartbeat("r1"), exited("r1", 0)])
        if quarantined:
            msgs.append(StreamMessage(4, EPOCH, "ledger.run.r1.exited", b"not json", None, 0))
        db = await open_db(path)
        try:
            await apply_batch(db, msgs[:1])  # another writer: the checkpoint is now 1
            before = dump_views(path)
            good, bad = decode_batch(msgs)
            folded = fold(await read_views(db, BatchKeys.of(good)), good, bad, msgs[-1].seq)
            with pytest.raises(CheckpointMoved) as caught:
                await commit_batch(db, folded, 0)
            assert 1 == caught.value.found
            assert before == dump_views(path)
            assert not db.in_transaction
        finally:
            await db.close()


class TestBoundedCommit:
    """A commit whose caller is cancelled waits a bounded time for its write, then interrupts it: whole or nothing."""

    @pytest.mark.parametrize("quarantined", [False, True], ids=["one-statement", "bound-rows"])
    async def test_a_cancelled_commit_behind_a_lock_rolls_back_whole(self, tmp_path: Path, quarantined: bool) -> None:
        """Cancelled while another connection holds the write lock, a commit gives up after ``stop_wait``
        (not SQLite's busy timeout, nor forever), writes nothing, and leaves its connection free for the next."""
        path = tmp_path / "v.db"
        msgs = as_messages([started("r1"), heartbeat("r1"), exited("r1", 0)])
        if quarantined:
            msgs.append(StreamMessage(4, EPOCH, "ledger.run.r1.exited", b"not json", None, 0))
        db = await open_db(path)
        await db.execute("PRAGMA busy_timeout=600000")  # SQLite alone would wait ten minutes
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            before = dump_views(path)
            good, bad = decode_batch(msgs)
            folded = fold(await read_views(db, BatchKeys.of(good)), good, bad, msgs[-1].seq)
            locker.execute("BEGIN IMMEDIATE")
            commit = asyncio.create_task(commit_batch(db, folded, 0, stop_wait=0.5))
            await asyncio.sleep(0.2)  # lets the write reach SQLite's busy wait; either way the outcome is the same
            commit.cancel()
            async with asyncio.timeout(60):  # before the interrupt: the busy timeout's ten minutes
                with pytest.raises(asyncio.CancelledError):
                    await commit
            locker.rollback()
            assert before == dump_views(path)
            assert not db.in_transaction
            await commit_batch(db, folded, 0)  # the connection is free: the same batch lands whole
            assert len(msgs) == dump_views(path)["checkpoint"][0][1]
        finally:
            locker.close()
            await db.close()
