"""CONTRACT section 2, clarified, through the real projector, API and CLI on a real nats-server:
a start's own attempt is honoured, a late (older) heartbeat never moves a run back, and a sweep
exists from the first run event that names it (listed, shown, queued, as of, replayed, verified)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ledger.core import events as ev
from ledger.core.events import encode_event, subject_of
from ledger.errors import CommandRefused
from ledger.nats.control import change_sweep
from ledger.nats.entity import implied_by
from ledger.nats.publisher import Publisher
from ledger.nats.server import free_port
from ledger.nats.stream import STREAM, connect, ensure_stream, stream_last_seq
from projections.audit.compare import verify
from projections.audit.rebuild import rebuild
from projections.audit.timeline import AsOf, sweep_as_of
from projections.projector.projector import Projector
from projections.views import queries
from projections.views.store import apply_batch, open_db
from tests.factory import at, dump_views, exited, heartbeat, preempting, started, sweep
from tests.jobs import Up, ledger, ledger_run, wait_until


async def get_json(client: httpx.AsyncClient, path: str, status: int = 200, **params: Any) -> Any:
    resp = await client.get(path, params=params)
    assert status == resp.status_code, resp.text
    return resp.json()


class TestAttemptsThroughTheApi:
    async def test_start_with_attempt_3_on_a_new_run(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A new run whose start says attempt 3 is at attempt 3, and its attempt-3 heartbeats apply."""
        await publisher.publish(started("r1", attempt=3))
        last = await publisher.publish(heartbeat("r1", t=5, attempt=3, step=42, progress=0.5))
        run = await get_json(api, "/runs/r1", min_seq=last)
        assert (3, "running", 42, 0.5) == (run["attempt"], run["state"], run["step"], run["progress"])
        audit = await get_json(api, "/runs/r1/events")
        assert ["applied", "applied"] == [e["effect"] for e in audit["events"]]

    async def test_stale_start_changes_nothing(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A start of attempt 2 after the run started attempt 3 changes nothing and is marked stale."""
        await publisher.publish(started("r1", attempt=3))
        await publisher.publish(heartbeat("r1", t=5, attempt=3, step=7))
        last = await publisher.publish(started("r1", t=6, attempt=2, sweep_id="s-other"))
        run = await get_json(api, "/runs/r1", min_seq=last)
        assert (3, None, 7) == (run["attempt"], run["sweep_id"], run["step"])
        audit = await get_json(api, "/runs/r1/events")
        assert ("stale", True) == (audit["events"][-1]["effect"], "stale start" in audit["events"][-1]["why"])
        await get_json(api, "/sweeps/s-other", status=404)

    async def test_late_heartbeat_does_not_move_the_run_back(self, api: httpx.AsyncClient,
                                                             publisher: Publisher) -> None:
        """After a heartbeat at step 10, an older one at step 3 changes nothing: audit says late."""
        await publisher.publish(started("r1"))
        await publisher.publish(heartbeat("r1", t=10, step=10, progress=0.9))
        last = await publisher.publish(heartbeat("r1", t=3, step=3, progress=0.1))
        run = await get_json(api, "/runs/r1", min_seq=last)
        assert (10, 0.9, "2026-11-25T12:00:10Z") == (run["step"], run["progress"], run["last_heartbeat_at"])
        audit = await get_json(api, "/runs/r1/events")
        assert ("late", True) == (audit["events"][-1]["effect"], "older" in audit["events"][-1]["why"])

    async def test_resumed_attempt_heartbeats_on_its_own_clock(self, api: httpx.AsyncClient,
                                                               publisher: Publisher) -> None:
        """A resumed attempt's heartbeat dated before the previous attempt's last one still applies."""
        await publisher.publish(started("r1", attempt=1))
        await publisher.publish(heartbeat("r1", t=100, step=50, attempt=1))
        await publisher.publish(preempting("r1", t=101, attempt=1))
        await publisher.publish(exited("r1", 143, t=102, signal=15, attempt=1))
        await publisher.publish(started("r1", t=90, attempt=2))  # another host, its clock behind
        last = await publisher.publish(heartbeat("r1", t=95, step=20, attempt=2))
        run = await get_json(api, "/runs/r1", min_seq=last)
        assert (2, "running", 20) == (run["attempt"], run["state"], run["step"])


class TestImpliedSweepsThroughTheApi:
    async def test_run_event_makes_its_sweep_exist(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A run started into a sweep nobody created: the sweep is running from the start's time, listed,
        counted, and its history says which run implied it."""
        last = await publisher.publish(started("r1", t=7, sweep_id="s1"))
        shown = await get_json(api, "/sweeps/s1", min_seq=last)
        assert ("running", "2026-11-25T12:00:07Z", 1) == (shown["state"], shown["created_at"],
                                                          shown["runs"]["running"])
        assert ["s1"] == [s["sweep_id"] for s in (await get_json(api, "/sweeps"))["sweeps"]]
        history = (await get_json(api, "/sweeps/s1/history"))["history"]
        assert [("running", "run.started", "implied by run r1", last)] == [
            (e["state"], e["event_type"], e["reason"], e["seq"]) for e in history]

    async def test_queue_of_an_implied_sweep(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A preempted run of an implied sweep waits in that sweep's queue."""
        await publisher.publish(ev.RunQueued(id="q1", at=at(0), run_id="p1", sweep_id="s9"))
        await publisher.publish(started("p1", t=1))
        await publisher.publish(preempting("p1", t=2))
        last = await publisher.publish(exited("p1", 143, t=3, signal=15))
        shown = await get_json(api, "/sweeps/s9", min_seq=last)
        assert (["p1"], "2026-11-25T12:00:00Z") == (shown["queue"], shown["created_at"])

    async def test_sweep_events_move_an_implied_sweep(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """An implied sweep is a sweep like any: created again changes nothing, pause pauses it."""
        await publisher.publish(started("r1", t=1, sweep_id="s1"))
        await publisher.publish(sweep(ev.SweepCreated, "s1", t=2))
        last = await publisher.publish(sweep(ev.SweepPaused, "s1", t=3))
        shown = await get_json(api, "/sweeps/s1", min_seq=last)
        history = (await get_json(api, "/sweeps/s1/history"))["history"]
        assert ("paused", "2026-11-25T12:00:01Z") == (shown["state"], shown["created_at"])
        assert ["run.started", "sweep.paused"] == [e["event_type"] for e in history]

    async def test_sweep_verbs_act_on_an_implied_sweep(self, api: httpx.AsyncClient, js: JetStreamContext,
                                                       publisher: Publisher) -> None:
        """`ledger sweep pause` works on a sweep only a run named; an unnamed sweep is still unknown."""
        await publisher.publish(started("r1", t=1, sweep_id="s1"))
        paused, appended = await change_sweep(js, publisher, "pause", "s1")
        shown = await get_json(api, "/sweeps/s1", min_seq=await stream_last_seq(js))
        assert (("paused", True), ("paused", "2026-11-25T12:00:01Z")) == (
            (paused.state, appended), (shown["state"], shown["created_at"]))
        with pytest.raises(CommandRefused, match="unknown sweep"):
            await change_sweep(js, publisher, "pause", "s-unnamed")

    async def test_as_of_an_implied_sweep(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """As of the run event that implied it the sweep is running; just before, it is unknown."""
        await publisher.publish(started("other", t=0))
        implied = await publisher.publish(started("r1", t=1, sweep_id="s1"))
        paused = await publisher.publish(sweep(ev.SweepPaused, "s1", t=2))
        await get_json(api, "/sweeps/s1", min_seq=paused)
        then = await get_json(api, "/sweeps/s1", as_of_seq=implied)
        later = await get_json(api, "/sweeps/s1", as_of_seq=paused)
        assert (("running", "2026-11-25T12:00:01Z", 1), ("paused", "2026-11-25T12:00:01Z")) == (
            (then["state"], then["created_at"], then["runs"]["running"]), (later["state"], later["created_at"]))
        await get_json(api, "/sweeps/s1", status=404, as_of_seq=implied - 1)

    async def test_as_of_skips_a_stale_start_naming_the_sweep(self, js: JetStreamContext,
                                                              publisher: Publisher) -> None:
        """A stale start naming a sweep does not make it exist; the next start that applies does."""
        await publisher.publish(started("r1", t=0, attempt=2))
        stale = await publisher.publish(started("r1", t=1, attempt=1, sweep_id="s1"))
        real = await publisher.publish(started("r2", t=2, sweep_id="s1"))
        found = await implied_by(js, "s1")
        assert (None, real) == (await sweep_as_of(js, "s1", AsOf(seq=stale)), found.seq if found else None)

    async def test_known_sweep_is_not_created_again_by_a_later_batch(self, js: JetStreamContext,
                                                                     publisher: Publisher, tmp_path: Path) -> None:
        """A sweep created in an earlier batch keeps its creation when a later batch's run names it
        (the batch reads the sweeps its run events name)."""
        await publisher.publish(sweep(ev.SweepCreated, "s1", t=0))
        await publisher.publish(started("r1", t=5, sweep_id="s1"))
        db = await open_db(tmp_path / "views.db")
        try:
            for seq in (1, 2):  # one batch each, nothing carried between them but the database
                batch = [m async for b in _read(js, seq) for m in b]
                await apply_batch(db, batch)
            shown = await queries.get_sweep(db, "s1")
            history = await queries.history(db, "sweep", "s1")
        finally:
            await db.close()
        assert shown is not None
        assert (at(0), ["sweep.created"]) == (shown.created_at, [e.event_type for e in history])


async def _read(js: JetStreamContext, seq: int) -> Any:
    from ledger.nats.stream import read_range

    async for batch in read_range(js, start_seq=seq, stop_seq=seq):
        yield batch


# --------------------------------------------------------------------------- replay equals projection

KINDS = st.sampled_from(["queued", "started", "started@1", "started@3", "heartbeat", "old-heartbeat", "exited",
                         "preempt", "sweep_create", "sweep_pause", "sweep_stop"])


def step_event(kind: str, run: str, sweep_id: str, k: int) -> ev.AnyEvent:
    """One generated step: run events name ``sweep_id``; heartbeats may be older than the last."""
    if kind == "queued":
        return ev.RunQueued(id=f"e{k}", at=at(k), run_id=run, sweep_id=sweep_id)
    if kind.startswith("started"):
        attempt = int(kind[-1]) if "@" in kind else None
        return started(run, t=k, id=f"e{k}", sweep_id=sweep_id, attempt=attempt)
    if kind in ("heartbeat", "old-heartbeat"):
        return heartbeat(run, t=k if kind == "heartbeat" else k - 20, id=f"e{k}", step=k)
    if kind == "exited":
        return exited(run, 0, t=k, id=f"e{k}")
    if kind == "preempt":
        return preempting(run, t=k, id=f"e{k}")
    cls = {"sweep_create": ev.SweepCreated, "sweep_pause": ev.SweepPaused, "sweep_stop": ev.SweepStopped}[kind]
    return sweep(cls, sweep_id, t=k, id=f"e{k}")


steps_strategy = st.lists(st.tuples(KINDS, st.sampled_from(["a", "b"]), st.sampled_from(["s1", "s2"])),
                          min_size=1, max_size=25)


async def check_replay(url: str, steps: list[tuple[str, str, str]], cuts: list[int], work: Path) -> None:
    nc = await connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(STREAM)
        await ensure_stream(js)
        for k, (kind, run, sweep_id) in enumerate(steps):
            event = step_event(kind, run, sweep_id, k)
            await js.publish(subject_of(event), encode_event(event))
        live = work / "live.db"
        await Projector(js, live, batch_size=3, idle_poll=0.2).run(until_idle=True)  # several batches
        full = work / "full.db"
        await rebuild(js, full)
        assert dump_views(live) == dump_views(full)
        assert (await verify(js, live)).equal
        for cut in sorted({min(c, len(steps)) for c in cuts}):
            at_cut = work / f"cut-{cut}.db"
            await rebuild(js, at_cut, to_seq=cut)
            db = await open_db(at_cut)
            try:
                for sweep_id in ("s1", "s2"):
                    want = await queries.get_sweep(db, sweep_id)
                    got = await sweep_as_of(js, sweep_id, AsOf(seq=cut))
                    assert (want is None) == (got is None), (sweep_id, cut)
                    if want is not None and got is not None:
                        assert (want.state, want.created_at, want.updated_at) == (
                            got.state, got.created_at, got.updated_at), (sweep_id, cut)
            finally:
                await db.close()
    finally:
        await nc.close()


class TestReplayOfImpliedSweeps:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps=steps_strategy, cuts=st.lists(st.integers(0, 25), min_size=1, max_size=3))
    def test_replay_equals_projection(self, nats_url: str, steps: list[tuple[str, str, str]],
                                      cuts: list[int]) -> None:
        """Projected in small batches, rebuilt in one, and read as of any seq, implied sweeps agree."""
        with tempfile.TemporaryDirectory() as work:
            asyncio.run(check_replay(nats_url, steps, cuts, Path(work)))


GOLDEN = Path(__file__).parent / "golden"


class TestGoldenReplay:
    async def test_golden_events_project_and_replay_to_the_same_views(self, js: JetStreamContext,
                                                                      tmp_path: Path) -> None:
        """The committed golden payloads, published in index order, project and rebuild to identical views
        (their run names golden-sweep_1 before the sweep's own events, so the sweep is implied)."""
        for name, subject in json.loads((GOLDEN / "index.json").read_text()).items():
            await js.publish(subject, (GOLDEN / name).read_bytes())
        live, full = tmp_path / "live.db", tmp_path / "full.db"
        await Projector(js, live, batch_size=4, idle_poll=0.2).run(until_idle=True)
        await rebuild(js, full)
        views = dump_views(live)
        assert (views, True, []) == (dump_views(full), (await verify(js, live)).equal, views["quarantine"])
        first = [row for row in views["history"] if row[:2] == ("sweep", "golden-sweep_1")][0]
        assert ("running", "run.queued") == (first[3], first[7])


# --------------------------------------------------------------------------- the CLI

HISTORICAL = str(10 * 365 * 86400)


@pytest.fixture
def up(cli_env: dict[str, str], tmp_path: Path, js: object) -> Iterator[dict[str, str]]:
    """``ledger up`` on the test's nats-server (fresh stream); the env a user's shell would have."""
    http = f"127.0.0.1:{free_port()}"
    env = {**cli_env, "LEDGER_HTTP": http, "LEDGER_DATA_DIR": str(tmp_path / "data"),
           "LEDGER_HEARTBEAT_TIMEOUT": HISTORICAL, "LEDGER_SPOOL": str(tmp_path / "spool.db")}
    running = Up([], env)
    try:
        yield env
    finally:
        if running.proc.poll() is None:
            running.stop()


def cli_json(env: dict[str, str], *args: str) -> Any:
    result = ledger(*args, "--json", env=env)
    assert 0 == result.returncode, result.stderr
    return json.loads(result.stdout)


class TestCli:
    def test_run_into_an_uncreated_sweep(self, up: dict[str, str]) -> None:
        """`ledger run --sweep s1 -- true` without `ledger sweep create`: sweeps show and list have s1,
        as of the start too, verify finds the views equal to the stream, and `ledger sweep pause s1`
        pauses it (a new run into it is then refused)."""
        env = up
        proc = ledger_run(["--run-id", "r1", "--sweep", "s1", "--", "true"], env)
        try:
            out = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
        assert 0 == proc.returncode, out
        wait_until(lambda: ledger("sweeps", "show", "s1", "--json", env=env).returncode == 0
                   and cli_json(env, "sweeps", "show", "s1")["runs"]["finished"] == 1, 30, "s1 with r1 finished")
        shown = cli_json(env, "sweeps", "show", "s1")
        assert ("running", []) == (shown["state"], shown["queue"])
        assert ["s1"] == [s["sweep_id"] for s in cli_json(env, "sweeps", "list")["sweeps"]]
        as_of = cli_json(env, "sweeps", "show", "s1", "--as-of-seq", "1")
        assert ("running", 1) == (as_of["state"], as_of["runs"]["running"])
        table = ledger("sweeps", "list", env=env)
        assert 0 == table.returncode and "s1" in table.stdout
        verified = ledger("verify", env=env)
        assert 0 == verified.returncode, verified.stdout + verified.stderr
        assert "paused" == cli_json(env, "sweep", "pause", "s1")["state"]
        refused = ledger_run(["--run-id", "r2", "--sweep", "s1", "--", "true"], env)
        _, err = refused.communicate(timeout=60)
        assert (1, True) == (refused.returncode, "paused" in err)
