"""Cost over time (CONTRACT section 9): views that grow with state changes and not
with heartbeats, yet catch a heartbeat delivered again however late (projector
and rebuild, real SQLite)."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.core.events import AnyEvent, RunHeartbeat, encode_event, subject_of
from ledger.nats.stream import StreamMessage
from projections.rebuild import _Builder
from tests.factory import dump_views, exited, heartbeat, started
from tests.test_properties import EPOCH, heartbeat_rich_lists
from projections.store import Folded, commit_batch, decode_batch, fold, open_db
from projections.views import BatchKeys, ViewCache, read_views
from tests.test_store import project_plainly


def message(seq: int, event: AnyEvent) -> StreamMessage:
    return StreamMessage(seq, EPOCH + timedelta(seconds=seq), subject_of(event), encode_event(event), None, 0)


async def project_pipelined(path: Path, msgs: list[StreamMessage], size: int) -> None:
    """What the projector does (as ``tests.test_store``), on sequences with gaps: batch N+1 read and
    folded through a read-only connection and a ViewCache of two batches before batch N commits."""
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


def rebuild_file(path: Path, msgs: list[StreamMessage], size: int) -> None:
    """What ``ledger replay`` does with the messages: batches folded into a fresh file."""
    builder = _Builder(path, 2)
    for i in range(0, len(msgs), size):
        builder.apply(msgs[i:i + size])
    builder.finish()


def without_checkpoint(views: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    return {table: rows for table, rows in views.items() if table != "checkpoint"}


class TestRedeliveredHeartbeatViews:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events=heartbeat_rich_lists, data=st.data(), size=st.integers(1, 6))
    def test_redelivered_heartbeats_change_no_table(self, events: list[AnyEvent], data: st.DataObject,
                                                     size: int) -> None:
        """Heartbeats of a stream stored again at any later points leave every view table as it was,
        through the projector (pipelined or one by one) and through a rebuild."""
        plain = [message(100 * (i + 1), e) for i, e in enumerate(events)]
        beats = [i for i, e in enumerate(events) if type(e) is RunHeartbeat]
        if not beats:
            return
        copies: dict[int, list[AnyEvent]] = {}
        for _ in range(data.draw(st.integers(1, 4), label="re-deliveries")):
            original = data.draw(st.sampled_from(beats), label="heartbeat")
            later = data.draw(st.integers(original + 1, len(events)), label="delivered again before")
            copies.setdefault(later, []).append(events[original])
        with_copies: list[StreamMessage] = []
        for i in range(len(events) + 1):
            with_copies += [message(100 * i + j + 1, e) for j, e in enumerate(copies.get(i, []))]
            with_copies += plain[i:i + 1]
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp) / name for name in ("plain.db", "piped.db", "one.db", "rebuilt.db")]
            asyncio.run(project_plainly(paths[0], plain))
            asyncio.run(project_pipelined(paths[1], with_copies, size))
            asyncio.run(project_plainly(paths[2], with_copies))
            rebuild_file(paths[3], with_copies, size)
            expected = without_checkpoint(dump_views(paths[0]))
            assert [expected] * 3 == [without_checkpoint(dump_views(p)) for p in paths[1:]]


class TestViewsGrowWithStateChanges:
    async def test_heartbeats_leave_no_seen_row(self, tmp_path: Path) -> None:
        """A run's 1,000 heartbeats add no row to any view: seen keeps the start and the exit only."""
        events: list[AnyEvent] = [started("r1", attempt=1)]
        events += [heartbeat("r1", t=1 + i / 1000, step=i, attempt=1) for i in range(1000)]
        events.append(exited("r1", 0, t=5, attempt=1))
        path = tmp_path / "views.db"
        await project_plainly(path, [message(i + 1, e) for i, e in enumerate(events)])
        views = dump_views(path)
        assert ([events[0].id, events[-1].id], 2, 999) == (
            sorted(row[0] for row in views["seen"]), len(views["history"]), views["runs"][0][8])
