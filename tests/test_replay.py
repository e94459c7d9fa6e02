"""Rebuilding the views from the stream: rebuild, replay with an atomic swap under a serving
API and projector, verify, export/import round trips, and as-of answers against a replay."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ledger.core import events as ev
from ledger.core.events import encode_event, subject_of
from ledger.nats.archive import ArchiveError, export_stream, import_stream
from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import (
    STREAM,
    connect,
    ensure_stream,
    read_range,
    recorded_at_of,
)
from projections.audit.compare import verify
from projections.audit.rebuild import rebuild
from projections.audit.timeline import AsOf, run_as_of, sweep_as_of
from projections.http.api import ApiState, api_server
from projections.projector.projector import Projector, SeqNotifier
from projections.views import queries
from projections.views.schema import run_from_row
from projections.views.store import open_db
from tests.factory import (
    dump_views,
    exited,
    heartbeat,
    killed,
    preempting,
    started,
    sweep,
)

LEDGER = [sys.executable, "-m", "ledger.cli"]


def ledger(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEDGER, *args], env=env, capture_output=True, text=True, timeout=timeout)


async def project(js: JetStreamContext, db_path: Path) -> int:
    return await Projector(js, db_path, idle_poll=0.2).run(until_idle=True)


async def late_duplicate(js: JetStreamContext, event: ev.AnyEvent) -> int:
    """The same event again without Nats-Msg-Id: what JetStream stores for a duplicate beyond its 2-minute window."""
    return int((await js.publish(subject_of(event), encode_event(event))).seq)


async def publish_history(publisher: Publisher, js: JetStreamContext, runs: int = 30) -> int:
    """A mixed history: sweeps, lifecycles, preemption, resume, a late duplicate, stale events, bad payloads."""
    await publisher.publish(sweep(ev.SweepCreated, "s1"))
    first = None
    for i in range(runs):
        run = f"r{i:03d}"
        start = started(run, t=i, sweep_id="s1" if i % 2 else None, attempt=1)
        first = first or start
        await publisher.publish(start)
        await publisher.publish(heartbeat(run, t=i + 1, step=i, attempt=1))
        if i % 5 == 0:
            await publisher.publish(preempting(run, t=i + 2, attempt=1))
            await publisher.publish(exited(run, 143, t=i + 3, signal=15, attempt=1))
        elif i % 7 == 0:
            await publisher.publish(killed(run, t=i + 3, reason="user"))
        elif i % 3 == 0:
            await publisher.publish(exited(run, 1, t=i + 3, attempt=1))
            await publisher.publish(heartbeat(run, t=i + 4, attempt=1))  # late
        else:
            await publisher.publish(exited(run, 0, t=i + 3, attempt=1))
            await publisher.publish(heartbeat(run, t=i + 4, attempt=2))  # stale: fenced
    await publisher.publish(started("r005", t=100, attempt=2, resume="allow"))
    await publisher.publish(sweep(ev.SweepPaused, "s1", t=50, reason="quota"))
    assert first is not None
    await late_duplicate(js, first)
    await js.publish("ledger.run.r001.started", b"\xff\xfe not utf-8")
    await js.publish("ledger.run.r002.exited", b'{"type":"run.exited"}')
    return int((await js.publish("ledger.sweep.s1.stopped", b"not json")).seq)


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A second nats-server: the target of imports ("another server")."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats-other"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def other_nc(other_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await connect(other_server.url)
    js = conn.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    yield conn
    await conn.close()


async def export_to_lines(js: JetStreamContext, **kw: Any) -> list[bytes]:
    out = io.BytesIO()
    await export_stream(js, out, **kw)
    return out.getvalue().splitlines(keepends=True)


async def stream_messages(js: JetStreamContext) -> list[tuple[int, str, bytes, datetime]]:
    found = []
    async for batch in read_range(js):
        found += [(m.seq, m.subject, bytes(m.data), recorded_at_of(m)) for m in batch]
    return found


class TestRebuild:
    async def test_rebuild_equals_the_projector(self, js: JetStreamContext, publisher: Publisher,
                                                tmp_path: Path) -> None:
        """A rebuild from the stream writes exactly the projector's rows, table by table."""
        last = await publish_history(publisher, js)
        assert last == await project(js, tmp_path / "live.db")
        result = await rebuild(js, tmp_path / "rebuilt.db", cache_size=3)  # a tiny cache: rows are read back
        assert (last, last) == (result.last_seq, result.messages)
        assert 3 == result.outcomes["quarantined"] and result.outcomes["duplicate"] == 1
        assert dump_views(tmp_path / "live.db") == dump_views(tmp_path / "rebuilt.db")

    async def test_rebuild_stops_at_to_seq(self, js: JetStreamContext, publisher: Publisher, tmp_path: Path) -> None:
        """--to-seq N leaves the checkpoint at N and nothing of what came after."""
        await publisher.publish(started("r1"))
        seq = await publisher.publish(heartbeat("r1", step=3))
        await publisher.publish(exited("r1", 0))
        result = await rebuild(js, tmp_path / "v.db", to_seq=seq)
        views = dump_views(tmp_path / "v.db")
        assert ([(1, seq)], "running", seq) == (views["checkpoint"], views["runs"][0][2], result.last_seq)

    async def test_rebuild_of_an_empty_stream(self, js: JetStreamContext, tmp_path: Path) -> None:
        """An empty stream rebuilds into empty views at checkpoint 0."""
        result = await rebuild(js, tmp_path / "v.db")
        assert (0, []) == (result.last_seq, dump_views(tmp_path / "v.db")["runs"])


class TestArchive:
    async def test_export_import_replay_gives_identical_views(
        self, js: JetStreamContext, publisher: Publisher, other_nc: NATS, tmp_path: Path,
    ) -> None:
        """Export, import into a fresh stream on another server, replay: the same views, row for row."""
        last = await publish_history(publisher, js)
        await project(js, tmp_path / "original.db")
        lines = await export_to_lines(js)
        assert last == len(lines)
        result = await import_stream(other_nc, lines)
        assert (last, last, 0, 0) == (result.read, result.imported, result.skipped, result.duplicates)
        other_js = other_nc.jetstream()
        assert await stream_messages(js) == await stream_messages(other_js)  # seqs, bytes and recorded times
        await rebuild(other_js, tmp_path / "copy.db")
        assert dump_views(tmp_path / "original.db") == dump_views(tmp_path / "copy.db")

    async def test_import_resumes_and_is_idempotent(
        self, js: JetStreamContext, publisher: Publisher, other_nc: NATS, tmp_path: Path,
    ) -> None:
        """An interrupted import goes on where it stopped; importing the same file again adds nothing."""
        last = await publish_history(publisher, js, runs=10)
        lines = await export_to_lines(js)
        first = await import_stream(other_nc, lines[:17])  # as if stopped after 17 messages
        second = await import_stream(other_nc, lines)
        third = await import_stream(other_nc, lines)
        assert (17, 17, last - 17, 0) == (first.imported, second.skipped, second.imported, third.imported)
        assert (last, 17) == (third.skipped, second.resumed_after)
        assert await stream_messages(js) == await stream_messages(other_nc.jetstream())

    async def test_import_refuses_another_file_and_a_foreign_stream(
        self, js: JetStreamContext, publisher: Publisher, other_nc: NATS,
    ) -> None:
        """A resumed import checks it is the same export; a stream not made by import needs --append."""
        for i in range(3):
            await publisher.publish(started(f"a{i}"))
        lines = await export_to_lines(js)
        await import_stream(other_nc, lines)
        changed = [lines[0], lines[1], lines[2].replace(b"a2", b"b2")]
        with pytest.raises(ArchiveError, match="not the same export"):
            await import_stream(other_nc, changed)
        other_js = other_nc.jetstream()
        await other_js.delete_stream(STREAM)
        await ensure_stream(other_js)
        await other_js.publish("ledger.run.x.started", b"{}")
        with pytest.raises(ArchiveError, match="--append"):
            await import_stream(other_nc, lines)
        appended = await import_stream(other_nc, lines, append=True)
        assert (3, 4) == (appended.imported, appended.stream_last_seq)

    async def test_append_resumes_after_foreign_messages(
        self, js: JetStreamContext, publisher: Publisher, other_nc: NATS,
    ) -> None:
        """--append after an interrupted import and new live messages resumes after the last imported one."""
        for i in range(6):
            await publisher.publish(started(f"a{i}"))
        lines = await export_to_lines(js)
        await import_stream(other_nc, lines[:4])
        other_js = other_nc.jetstream()
        await other_js.publish("ledger.run.live.started", b"{}")
        with pytest.raises(ArchiveError, match="--append"):
            await import_stream(other_nc, lines)
        resumed = await import_stream(other_nc, lines, append=True)
        assert (4, 4, 2, 7) == (resumed.resumed_after, resumed.skipped, resumed.imported, resumed.stream_last_seq)

    async def test_bad_export_line_is_a_clear_error(self, other_nc: NATS) -> None:
        """A line that is not an export record names the file and the line."""
        with pytest.raises(ArchiveError, match="dump.jsonl line 2: not an export record"):
            await import_stream(other_nc, [b'{"seq":1,"subject":"ledger.run.a.started","time":"t","data":"{}"}\n',
                                           b"garbage\n"], name="dump.jsonl")


# --------------------------------------------------------------------------- replay with a swap under readers

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@contextlib.asynccontextmanager
async def serving(js: JetStreamContext, data_dir: Path, *, with_projector: bool) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API (and optionally the projector) over data_dir/views.db, in this process."""
    db_path = data_dir / "views.db"
    notifier = SeqNotifier()
    projector = None
    if with_projector:
        from tests.conftest import Started

        ready = Started()
        projector = asyncio.create_task(Projector(js, db_path, notifier=notifier, idle_poll=0.1).run(task_status=ready))
        await ready.wait()
    port = free_port()
    server = api_server(ApiState(db_path, notifier=notifier if with_projector else None, js=js), "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(60):
        while not server.started:
            await asyncio.sleep(0.01)  # uvicorn exposes readiness only as a flag
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        async with asyncio.timeout(60):
            await task
        if projector is not None:
            from tests.conftest import stop_task

            await stop_task(projector)


async def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(*LEDGER, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


class TestReplaySwap:
    async def test_readers_never_see_a_half_built_view(
        self, js: JetStreamContext, publisher: Publisher, data_dir: Path, cli_env: dict[str, str],
    ) -> None:
        """Hammering GET /runs while `ledger replay --to-seq` swaps: every answer is the old or the new view."""
        for i in range(400):
            await publisher.publish(started(f"r{i:03d}", t=i))
        cut = await publisher.publish(heartbeat("r000", t=500, step=1))
        for i in range(0, 400, 2):
            await publisher.publish(exited(f"r{i:03d}", 0, t=600 + i))
        await project(js, data_dir / "views.db")
        both = [f"r{i:03d}" for i in range(0, 400, 37)]
        async with serving(js, data_dir, with_projector=False) as api:
            old_list = (await api.get("/runs", params={"limit": 1000})).json()
            old_runs = {r: (await api.get(f"/runs/{r}")).json() for r in both}
            replaying = asyncio.create_task(run_cli("replay", "--to-seq", str(cut), "--data-dir", str(data_dir),
                                                    env=cli_env))
            answers: list[tuple[str, int, Any]] = []
            while not replaying.done():
                for path in ["/runs", *(f"/runs/{r}" for r in both[:3])]:
                    resp = await api.get(path, params={"limit": 1000} if path == "/runs" else None)
                    answers.append((path, resp.status_code, resp.json()))
            done = await replaying
            assert 0 == done.returncode, done.stderr
            new_list = (await api.get("/runs", params={"limit": 1000})).json()
            new_runs = {r: (await api.get(f"/runs/{r}")).json() for r in both}
        assert old_list != new_list and all(r["state"] == "running" for r in new_list["runs"])
        lists = [body for path, _, body in answers if path == "/runs"]
        assert len(lists) > 5, "the replay finished before the API was hammered"
        for path, status, body in answers:
            assert 200 == status, (path, body)
            if path == "/runs":
                assert body in (old_list, new_list)
            else:
                run_id = path.rsplit("/", 1)[1]
                assert body in (old_runs[run_id], new_runs[run_id])
        assert old_list == lists[0]
        assert os.readlink(data_dir / "views.db") == "views-1.db"

    async def test_projector_follows_the_swap(
        self, js: JetStreamContext, publisher: Publisher, data_dir: Path, cli_env: dict[str, str],
    ) -> None:
        """After a replay the live projector goes on in the new database: new events show up, verify passes."""
        async with serving(js, data_dir, with_projector=True) as api:
            await publisher.publish(started("r1"))
            seq = await publisher.publish(heartbeat("r1", step=1))
            assert 200 == (await api.get("/runs/r1", params={"min_seq": seq})).status_code
            done = await run_cli("replay", "--data-dir", str(data_dir), "--json", env=cli_env)
            assert 0 == done.returncode, done.stderr
            assert seq == json.loads(done.stdout)["last_seq"]
            seq = await publisher.publish(exited("r1", 0))
            await publisher.publish(started("r2"))
            body = (await api.get("/runs/r1", params={"min_seq": seq + 1})).json()
            assert ("finished", seq) == (body["state"], body["seq"])
            again = await run_cli("replay", "--data-dir", str(data_dir), env=cli_env)  # a second swap
            assert 0 == again.returncode, again.stderr
            seq = await publisher.publish(exited("r2", 3))
            assert "failed" == (await api.get("/runs/r2", params={"min_seq": seq})).json()["state"]
            checked = await run_cli("verify", "--data-dir", str(data_dir), env=cli_env)
        assert (0, "views equal the stream") == (checked.returncode, checked.stdout[:22])
        assert "views-2.db" == os.readlink(data_dir / "views.db")
        assert {"views-1.db", "views-2.db", "views-0.db"} >= {p.name for p in data_dir.glob("views-*.db")}

    async def test_to_seq_under_a_running_projector_catches_up(
        self, js: JetStreamContext, publisher: Publisher, data_dir: Path, cli_env: dict[str, str],
    ) -> None:
        """replay --to-seq N with a live projector: the views restart at N and the projector brings them back."""
        async with serving(js, data_dir, with_projector=True) as api:
            cut = await publisher.publish(started("r1"))
            last = await publisher.publish(exited("r1", 0))
            assert 200 == (await api.get("/runs/r1", params={"min_seq": last})).status_code
            done = await run_cli("replay", "--to-seq", str(cut), "--data-dir", str(data_dir), env=cli_env)
            assert 0 == done.returncode, done.stderr
            seq = await publisher.publish(started("r2"))
            body = (await api.get("/runs/r1", params={"min_seq": seq})).json()
            health = (await api.get("/health")).json()
        assert ("finished", seq) == (body["state"], health["last_seq"])


class TestVerify:
    async def test_verify_passes_then_finds_a_row_changed_behind_its_back(
        self, js: JetStreamContext, publisher: Publisher, tmp_path: Path,
    ) -> None:
        """verify is equal on untouched views and names the table, key and columns of a tampered row."""
        await publish_history(publisher, js, runs=8)
        live = tmp_path / "views.db"
        await project(js, live)
        assert (await verify(js, live)).equal
        with sqlite3.connect(live) as con:
            con.execute("UPDATE runs SET state = 'failed', step = 99 WHERE run_id = 'r004'")
            con.execute("DELETE FROM seen WHERE event_id = (SELECT min(event_id) FROM seen)")
            con.execute("INSERT INTO quarantine VALUES (999, 'ledger.run.x.y', 'made up', x'00', 'now')")
        report = await verify(js, live)
        assert not report.equal
        runs = report.tables["runs"]
        assert (1, ["r004"], "changed") == (runs.differences, runs.shown[0].key, runs.shown[0].kind)
        assert {"state", "step"} == set(runs.shown[0].columns)
        assert ["missing-in-live"] == [d.kind for d in report.tables["seen"].shown]
        assert [([999], "extra-in-live")] == [(d.key, d.kind) for d in report.tables["quarantine"].shown]
        assert 0 == report.tables["history"].differences

    async def test_verify_compares_at_the_live_checkpoint(
        self, js: JetStreamContext, publisher: Publisher, tmp_path: Path,
    ) -> None:
        """Events the projector has not applied yet are not differences: the rebuild stops at the checkpoint."""
        await publisher.publish(started("r1"))
        live = tmp_path / "views.db"
        await project(js, live)
        await publisher.publish(exited("r1", 0))
        report = await verify(js, live)
        assert (True, 1) == (report.equal, report.checkpoint)


# --------------------------------------------------------------------------- as of == a replay stopped there

RUNS = ("a", "b", "c")
event_kinds = st.sampled_from(["queued", "started", "heartbeat", "exited0", "exited1", "preempting", "signalled",
                               "killed", "crashed", "stale", "duplicate", "sweep_pause", "sweep_resume",
                               "sweep_stop", "bad"])


def build(kind: str, run: str, k: int, attempt: int) -> tuple[str, bytes, bool]:
    """(subject, payload, with Nats-Msg-Id) for one generated step."""
    t = float(k)
    sweep_of = "s1" if run != "c" else None
    made: ev.AnyEvent
    if kind == "queued":
        made = ev.RunQueued(id=f"q{k}", at=_at(t), run_id=run, sweep_id=sweep_of)
    elif kind == "started":
        made = started(run, t=t, id=f"e{k}", sweep_id=sweep_of, attempt=attempt)
    elif kind == "heartbeat":
        made = heartbeat(run, t=t, id=f"e{k}", step=k, attempt=attempt)
    elif kind in ("exited0", "exited1"):
        made = exited(run, int(kind[-1]), t=t, id=f"e{k}", attempt=attempt)
    elif kind == "preempting":
        made = preempting(run, t=t, id=f"e{k}", attempt=attempt)
    elif kind == "signalled":
        made = ev.RunSignalled(id=f"e{k}", at=_at(t), run_id=run, signal=15, attempt=attempt)
    elif kind == "killed":
        made = killed(run, t=t, id=f"e{k}", reason="user")
    elif kind == "crashed":
        made = ev.RunCrashed(id=f"e{k}", at=_at(t), run_id=run, reason="heartbeat-timeout", last_heartbeat_at=_at(t - 2))
    elif kind == "stale":
        made = heartbeat(run, t=t, id=f"e{k}", attempt=attempt + 3)
    elif kind == "duplicate":  # the run's own repeated id (ids are unique across runs: see projections.audit.timeline)
        made = heartbeat(run, t=t, id=f"dup-{run}", attempt=attempt)
        return subject_of(made), encode_event(made), False  # beyond the dedup window: stored again
    elif kind == "bad":
        return f"ledger.run.{run}.exited", b'{"type": "run.exited", "id": "x"', False
    else:
        cls = {"sweep_pause": ev.SweepPaused, "sweep_resume": ev.SweepResumed, "sweep_stop": ev.SweepStopped}[kind]
        made = sweep(cls, "s1", t=t, id=f"e{k}")
    return subject_of(made), encode_event(made), True


def _at(t: float) -> datetime:
    from tests.factory import at

    return at(t)


histories = st.lists(st.tuples(event_kinds, st.sampled_from(RUNS), st.integers(1, 2)), min_size=1, max_size=30)


async def check_as_of(url: str, steps: list[tuple[str, str, int]], cuts: list[int], work: Path) -> None:
    nc = await connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(STREAM)
        await ensure_stream(js)
        await js.publish("ledger.sweep.s1.created", encode_event(sweep(ev.SweepCreated, "s1", id="s1-created")))
        for run in ("a", "b"):  # runs count in the sweep they name now: name it from their first event on
            await js.publish(f"ledger.run.{run}.queued", encode_event(ev.RunQueued(
                id=f"q-{run}", at=_at(0), run_id=run, sweep_id="s1")))
        for k, (kind, run, attempt) in enumerate(steps):
            subject, payload, with_id = build(kind, run, k, attempt)
            await js.publish(subject, payload, headers={"Nats-Msg-Id": f"m{k}"} if with_id else None)
        messages = await stream_messages(js)
        full = work / "full.db"
        await rebuild(js, full)
        db = await open_db(full)
        try:
            for cut in sorted({min(c, len(messages)) for c in cuts}):
                at_cut = work / f"cut-{cut}.db"
                await rebuild(js, at_cut, to_seq=cut)
                cut_db = await open_db(at_cut)
                try:
                    for run in RUNS:
                        expected = await queries.get_run(cut_db, run)
                        assert expected == await run_as_of(js, run, AsOf(seq=cut)), (run, cut)
                        if cut:  # the time of message N: everything recorded up to then (N, or a later tie)
                            when = messages[cut - 1][3]
                            last_by_then = max(m[0] for m in messages if m[3] <= when)
                            assert await run_as_of(js, run, AsOf(seq=last_by_then)) == \
                                await run_as_of(js, run, AsOf(time=when)), (run, cut)
                    want = await queries.get_sweep(cut_db, "s1")
                    got = await sweep_as_of(js, "s1", AsOf(seq=cut))
                    if want is None:
                        assert got is None
                    else:
                        assert got is not None
                        counts, queue = await queries.sweep_runs_as_of(db, "s1", seq=cut)
                        assert want == queries.sweep_view(got, counts, queue)
                finally:
                    await cut_db.close()
        finally:
            await db.close()
    finally:
        await nc.close()


class TestAsOf:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps=histories, cuts=st.lists(st.integers(0, 32), min_size=1, max_size=4))
    def test_as_of_matches_a_replay_stopped_there(self, nats_url: str, steps: list[tuple[str, str, int]],
                                                  cuts: list[int]) -> None:
        """A run or sweep as of seq N (or the time of seq N) is what a replay stopped at N holds."""
        with tempfile.TemporaryDirectory() as work:
            asyncio.run(check_as_of(nats_url, steps, cuts, Path(work)))

    async def test_as_of_reads_only_the_runs_subjects(self, js: JetStreamContext, publisher: Publisher) -> None:
        """An as-of read of one run among many reads that run's messages only (a filtered consumer)."""
        for i in range(300):
            await publisher.publish(started(f"other{i}"))
        seq = await publisher.publish(started("r1"))
        await publisher.publish(exited("r1", 0))
        run = await run_as_of(js, "r1", AsOf(seq=seq))
        assert run is not None and ("running", seq) == (run.state, run.seq)
        assert await run_as_of(js, "r1", AsOf(seq=seq - 1)) is None


def test_replay_json_row_shape_is_the_runs_row() -> None:
    """The schema's row codecs round-trip (the rebuild writes through them)."""
    from ledger.core.machine import Run
    from projections.views.schema import run_row
    from tests.factory import T0

    run = Run(run_id="r1", created_at=T0, preempting=True, step=3)
    assert run == run_from_row(run_row(run))

