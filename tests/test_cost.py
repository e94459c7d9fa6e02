"""Cost over time (CONTRACT section 9): views that grow with state changes and not
with heartbeats, yet catch a heartbeat delivered again however late (projector
and rebuild, real SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.events import AnyEvent, RunHeartbeat, encode_event, subject_of
from ledger.core.fold import Recorded, Views
from ledger.jobs.client import AsyncLedger
from ledger.jobs.sync_client import Ledger
from ledger.nats.publisher import Publisher
from ledger.nats.server import free_port
from ledger.nats.stream import StreamMessage, read_range
from projections.audit.rebuild import _Builder, rebuild
from projections.projector.projector import Projector
from projections.workers.compaction import removable
from tests.factory import (
    at,
    dump_views,
    exited,
    heartbeat,
    killed,
    preempting,
    run_row,
    started,
)
from tests.jobs import async_wait_until, run_events, types
from tests.test_operations import DEADLINE_S, LedgerUp, user_env
from tests.test_properties import EPOCH, RUN_IDS, heartbeat_rich_lists, record, spaced
from tests.test_store import project_pipelined, project_plainly


def message(seq: int, event: AnyEvent) -> StreamMessage:
    return StreamMessage(seq, EPOCH + timedelta(seconds=seq), subject_of(event), encode_event(event), None, 0)


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


# --------------------------------------------------------------------------- client-side coalescing


async def project(js: JetStreamContext, db_path: Path) -> None:
    await Projector(js, db_path, idle_poll=0.2).run(until_idle=True)


def beats(events: list[AnyEvent]) -> list[RunHeartbeat]:
    return [e for e in events if type(e) is RunHeartbeat]


class TestCoalescing:
    async def test_sync_loop_of_1000_heartbeats_sends_a_handful(self, nats_url: str, js: JetStreamContext,
                                                                 tmp_path: Path) -> None:
        """A sync job calling run.heartbeat(step=i) 1,000 times sends a handful of heartbeats, and the
        views hold step 999 once it has finished."""
        def job() -> float:
            ledger = Ledger.connect(nats_url, spool=tmp_path / "spool.db")
            with ledger.run("loop", heartbeat=None) as run:
                began = time.monotonic()
                for i in range(1000):
                    run.heartbeat(step=i, progress=i / 1000)
                took = time.monotonic() - began
            ledger.close()
            return took

        took = await asyncio.to_thread(job)
        sent = beats(await run_events(js, "loop"))
        await project(js, tmp_path / "views.db")
        row = run_row(tmp_path / "views.db", "loop")
        assert row is not None
        assert (True, "finished", 999, 0.999) == (len(sent) <= took + 2, row["state"], row["step"], row["progress"])

    async def test_async_loop_of_1000_heartbeats_sends_a_handful(self, nats_url: str, js: JetStreamContext,
                                                                  tmp_path: Path) -> None:
        """The same with the async client: at most one heartbeat a second, the last step in the views."""
        ledger = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db")
        try:
            async with ledger.run("aloop", heartbeat=None) as run:
                began = time.monotonic()
                for i in range(1000):
                    await run.heartbeat(step=i)
                took = time.monotonic() - began
        finally:
            await ledger.close()
        sent = beats(await run_events(js, "aloop"))
        await project(js, tmp_path / "views.db")
        row = run_row(tmp_path / "views.db", "aloop")
        assert row is not None
        assert (True, 999, "finished") == (len(sent) <= took + 2, row["step"], row["state"])

    async def test_pending_heartbeat_goes_out_when_due(self, nats_url: str, js: JetStreamContext,
                                                       tmp_path: Path) -> None:
        """A heartbeat held back by the interval goes out by itself once the interval is up, fields
        merged (the latest progress, the step given before it)."""
        ledger = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db", heartbeat_min_interval=0.3)
        try:
            run = await ledger.start_run("due", heartbeat=None)
            await run.heartbeat(step=1)
            await run.heartbeat(step=2)
            await run.heartbeat(progress=0.5)
            await async_wait_until(lambda: _count_beats(js, "due", 2), what="the pending heartbeat")
            sent = beats(await run_events(js, "due"))
            assert [(1, None), (2, 0.5)] == [(b.step, b.progress) for b in sent]
            assert sent[1].at - sent[0].at < timedelta(seconds=0.3)  # its time is the last call's
        finally:
            await ledger.close()

    async def test_interval_zero_sends_every_heartbeat(self, nats_url: str, js: JetStreamContext,
                                                       tmp_path: Path) -> None:
        """heartbeat_min_interval=0 turns coalescing off: every call is one event."""
        ledger = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db", heartbeat_min_interval=0)
        try:
            async with ledger.run("every", heartbeat=None) as run:
                for i in range(20):
                    await run.heartbeat(step=i)
        finally:
            await ledger.close()
        assert list(range(20)) == [b.step for b in beats(await run_events(js, "every"))]

    async def test_background_heartbeats_keep_their_interval(self, nats_url: str, js: JetStreamContext,
                                                             tmp_path: Path) -> None:
        """The background heartbeat (ledger run --heartbeat) is not held to the one-a-second bound."""
        ledger = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db", heartbeat_min_interval=5)
        try:
            async with ledger.run("bg", heartbeat=0.05):
                await async_wait_until(lambda: _count_beats(js, "bg", 3), what="three background heartbeats")
        finally:
            await ledger.close()


async def _count_beats(js: JetStreamContext, run_id: str, at_least: int) -> bool:
    return len(beats(await run_events(js, run_id))) >= at_least


# --------------------------------------------------------------------------- ledger compact


def messages_of(stream: list[Recorded]) -> list[StreamMessage]:
    return [StreamMessage(r.seq, r.recorded_at, subject_of(r.event), encode_event(r.event), None, 0) for r in stream]


class TestRemovable:
    @settings(max_examples=400)
    @given(events=heartbeat_rich_lists, data=st.data())
    def test_removing_what_compact_chooses_changes_no_view(self, events: list[AnyEvent],
                                                          data: st.DataObject) -> None:
        """For any stream, removing the heartbeats compact picks for a run leaves every run, sweep,
        history entry and seen id of the final views as they were."""
        stream = spaced(events)
        whole = Views().fold(stream)
        run_id = data.draw(st.sampled_from(RUN_IDS), label="run")
        first_seen: dict[str, int] = {}
        for event_id, seq in whole.new_ids:
            first_seen.setdefault(event_id, seq)
        own = [m for m in messages_of(stream) if m.subject.startswith(f"ledger.run.{run_id}.")]
        removed = set(removable(run_id, own, first_seen))
        kept = Views().fold(rec for rec in stream if rec.seq not in removed)
        assert (whole.runs, whole.sweeps, whole.history, whole.seen) == (kept.runs, kept.sweeps, kept.history,
                                                                         kept.seen)
        assert all(type(rec.event) is RunHeartbeat for rec in stream if rec.seq in removed)

    def test_a_finished_run_keeps_its_last_heartbeat(self) -> None:
        """Of a run started, heartbeating 100 times and finished, only the last heartbeat stays."""
        events: list[AnyEvent] = [started("c1", attempt=1)]
        events += [heartbeat("c1", t=1 + i / 100, step=i, attempt=1) for i in range(100)]
        events.append(exited("c1", 0, t=3, attempt=1))
        msgs = messages_of(record(events))
        removed = removable("c1", msgs, {events[0].id: 1, events[-1].id: len(events)})
        assert [m.seq for m in msgs[1:-2]] == removed


def ledger_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


async def subjects_of(js: JetStreamContext, run_id: str) -> list[str]:
    """The subject of every message on the run's subjects, bad input included."""
    out: list[str] = []
    async with contextlib.aclosing(read_range(js, subject=f"ledger.run.{run_id}.>")) as batches:
        async for batch in batches:
            out += [m.subject for m in batch]
    return out


class TestCompact:
    async def _history(self, publisher: Publisher, js: JetStreamContext) -> None:
        """Runs that end in every way, heartbeating with and without attempts, a crash revived, a
        resume, bad input and a late duplicate on their subjects, and one run still running."""
        await publisher.publish(started("done", attempt=1))
        for i in range(200):
            await publisher.publish(heartbeat("done", t=1 + i / 1000, step=i, progress=i / 200, attempt=1))
        await publisher.publish(exited("done", 0, t=2, attempt=1))
        await js.publish("ledger.run.done.heartbeat", b"not json")  # quarantined: a view holds it
        await publisher.publish(started("again", attempt=1))
        for i in range(30):
            await publisher.publish(heartbeat("again", t=1 + i / 100, step=i, attempt=1))
        await publisher.publish(ev.RunCrashed(id="crash-1", at=at(1.5), run_id="again", attempt=1,
                                              reason="heartbeat-timeout", last_heartbeat_at=at(1.29)))
        for i in range(30, 60):  # the first revives the run: it stays
            await publisher.publish(heartbeat("again", t=1.3 + i / 100, progress=i / 100, attempt=1))
        await publisher.publish(preempting("again", t=2.0, attempt=1))
        await publisher.publish(exited("again", 143, t=2.1, attempt=1))
        await publisher.publish(started("again", t=3, attempt=2, resume="allow"))
        for i in range(30):
            await publisher.publish(heartbeat("again", t=4 + i / 100, message=f"m{i}", attempt=2))
        await publisher.publish(killed("again", t=5, attempt=2, reason="user"))
        await publisher.publish(started("anon"))
        for i in range(20):  # no attempt named: the views remember these, they stay
            await publisher.publish(heartbeat("anon", t=1 + i / 100, step=i))
        await publisher.publish(exited("anon", 1, t=2))
        late = heartbeat("done", t=1.05, step=3, attempt=1)
        await js.publish(subject_of(late), encode_event(late))  # a heartbeat of a finished run: late
        await publisher.publish(started("live", attempt=1))
        for i in range(50):
            await publisher.publish(heartbeat("live", t=1 + i / 100, step=i, attempt=1))

    async def test_compact_then_verify(self, js: JetStreamContext, publisher: Publisher, tmp_path: Path,
                                       cli_env: dict[str, str]) -> None:
        """After `ledger compact --older-than 0s`, ledger verify holds, a rebuild gives the very same
        views, most heartbeats of the ended runs are gone, and the running run lost none."""
        await self._history(publisher, js)
        data_dir = tmp_path / "data"
        await Projector(js, data_dir / "views.db", idle_poll=0.2).run(until_idle=True)
        before = dump_views(data_dir / "views.db")
        live_before = types(await run_events(js, "live"))
        total_before = (await js.stream_info("LEDGER")).state.messages
        env = {**cli_env, "LEDGER_DATA_DIR": str(data_dir)}

        dry = ledger_cli("compact", "--older-than", "0s", "--dry-run", "--json", env=env)
        assert 0 == dry.returncode, dry.stderr
        assert total_before == (await js.stream_info("LEDGER")).state.messages

        done = ledger_cli("compact", "--older-than", "0s", "--json", env=env)
        assert 0 == done.returncode, done.stderr
        summary = json.loads(done.stdout)
        assert json.loads(dry.stdout)["messages_removed"] == summary["messages_removed"], dry.stdout + done.stdout

        verify = ledger_cli("verify", env=env)
        assert (0, "views equal the stream") == (verify.returncode, verify.stdout[:22]), verify.stdout
        rebuilt = tmp_path / "rebuilt.db"
        await rebuild(js, rebuilt)
        assert before == dump_views(rebuilt)
        assert before == dump_views(data_dir / "views.db")
        left = (await subjects_of(js, "done")).count("ledger.run.done.heartbeat") - 2  # bad input, late copy
        total_after = (await js.stream_info("LEDGER")).state.messages
        assert (1, live_before, total_before - summary["messages_removed"]) == (
            left, types(await run_events(js, "live")), total_after)
        assert summary["messages_removed"] >= 199 + 50
        assert 20 == types(await run_events(js, "anon")).count("run.heartbeat")

        again = ledger_cli("compact", "--older-than", "0s", "--json", env=env)
        assert (0, 0) == (again.returncode, json.loads(again.stdout)["runs_examined"])

    async def test_horizon_keeps_recent_runs(self, js: JetStreamContext, publisher: Publisher, tmp_path: Path,
                                             cli_env: dict[str, str]) -> None:
        """Runs that ended within --older-than keep every message; a bad duration is one line, exit 2."""
        await self._history(publisher, js)
        data_dir = tmp_path / "data"
        await Projector(js, data_dir / "views.db", idle_poll=0.2).run(until_idle=True)
        env = {**cli_env, "LEDGER_DATA_DIR": str(data_dir)}
        total = (await js.stream_info("LEDGER")).state.messages
        done = ledger_cli("compact", "--older-than", "1h", "--json", env=env)
        assert (0, 0, total) == (done.returncode, json.loads(done.stdout)["messages_removed"],
                                 (await js.stream_info("LEDGER")).state.messages)
        bad = ledger_cli("compact", "--older-than", "7 days", env=env)
        assert (2, True) == (bad.returncode, "not a duration" in bad.stderr)


class TestCompactAfter:
    async def test_up_compacts_by_itself(self, nats_url: str, js: JetStreamContext, publisher: Publisher,
                                         tmp_path: Path) -> None:
        """`ledger up --compact-after 0s` removes a finished run's heartbeats but its last, says so on stderr,
        and its views stay equal to the stream."""
        await publisher.publish(started("up1", attempt=1))
        for i in range(100):
            await publisher.publish(heartbeat("up1", t=1 + i / 1000, step=i, attempt=1))
        await publisher.publish(exited("up1", 0, t=2, attempt=1))
        data = tmp_path / "data"
        up = LedgerUp(["--nats-url", nats_url, "--data-dir", str(data), "--http", f"127.0.0.1:{free_port()}",
                       "--compact-after", "0s"], user_env())
        try:
            try:
                await async_wait_until(lambda: _stream_messages(js, 3), timeout=DEADLINE_S,
                                       what="compaction down to start, last heartbeat and exit")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; ledger up said: {up.read_stderr()}") from None
            await async_wait_until(lambda: "compacted 1 run(s): 99 heartbeat(s)" in up.read_stderr(),
                                   timeout=DEADLINE_S, what="ledger up saying what it compacted")
            assert 0 == up.stop()
        finally:
            up.kill()
        verify = ledger_cli("verify", "--data-dir", str(data), env={**user_env(), "LEDGER_NATS_URL": nats_url})
        assert 0 == verify.returncode, verify.stdout + verify.stderr
        assert [99] == [row[8] for row in dump_views(data / "views.db")["runs"]]


async def _stream_messages(js: JetStreamContext, expected: int) -> bool:
    return int((await js.stream_info("LEDGER")).state.messages) == expected
