"""The log on a 3-node JetStream cluster with read nodes (contract section 6): real nats-server
processes clustered on loopback, real `ledger up` read nodes with their own data dirs, a real
`ledger run` job; the stream leader SIGKILLed under load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sqlite3
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.errors import StreamUnavailable
from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import PullReader, connect, stream_last_seq
from tests.cluster import LocalCluster, stream_leader
from tests.jobs import LEDGER, Up, async_wait_until, ledger, run_events

DEADLINE_S = 120.0
"""Generous: a Raft election takes seconds, and the machine is busy."""

JOB = "import pathlib, sys, time\nwhile not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
"""A job that runs until the test lets it end (by creating the file it names), then exits 0."""


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "nats")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


class ReadNode:
    """One `ledger up --nats-url <cluster>` with its own data dir and HTTP port."""

    def __init__(self, name: str, url: str, tmp: Path, *extra: str, heartbeat_timeout: float = 300.0) -> None:
        self.name = name
        self.data_dir = tmp / name
        self.http = f"127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.env.update({"LEDGER_NATS_URL": url, "LEDGER_DATA_DIR": str(self.data_dir), "LEDGER_HTTP": self.http,
                         "LEDGER_HEARTBEAT_TIMEOUT": str(heartbeat_timeout), "PYTHONUNBUFFERED": "1"})
        self.extra = list(extra)
        self.up: Up | None = None

    def start(self) -> ReadNode:
        self.up = Up(self.extra, self.env)
        return self

    def kill(self) -> None:
        up, self.up = self.up, None
        if up is None:
            return
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait(30)
        for stream in (up.proc.stdout, up.proc.stderr):
            if stream:
                stream.close()

    def stop(self) -> None:
        up, self.up = self.up, None
        if up is not None and up.proc.poll() is None:
            assert 0 == up.stop()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
        except (urllib.error.URLError, OSError):
            return 0, None

    def health(self) -> dict[str, Any]:
        return self.get("/health")[1] or {}

    def views(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the view tables, in key order (read beside the running projector: WAL)."""
        with sqlite3.connect(self.data_dir / "views.db") as con:
            return {table: con.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                    for table in ("runs", "sweeps", "history", "seen", "quarantine", "checkpoint")}


@pytest.fixture
def read_nodes(nats_cluster: LocalCluster, tmp_path: Path) -> Iterator[list[ReadNode]]:
    """Two read nodes on the cluster; the first creates the stream with 3 replicas."""
    nodes = [ReadNode("a", nats_cluster.url, tmp_path, "--replicas", "3"), ReadNode("b", nats_cluster.url, tmp_path)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
async def cluster_js(nats_cluster: LocalCluster) -> AsyncIterator[JetStreamContext]:
    nc = await connect(nats_cluster.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def load_events(runs: int, heartbeats: int) -> list[ev.AnyEvent]:
    """Runs that start, heartbeat and finish: ``runs * (heartbeats + 2)`` events."""
    now = datetime.now(timezone.utc)
    out: list[ev.AnyEvent] = []
    for r in range(runs):
        run_id = f"load-{r:03d}"
        out.append(ev.RunStarted(id=f"{run_id}-s", at=now, run_id=run_id, attempt=1, host="h", pid=1, command=["x"]))
        out += [ev.RunHeartbeat(id=f"{run_id}-h{i}", at=now, run_id=run_id, attempt=1, step=i)
                for i in range(heartbeats)]
        out.append(ev.RunExited(id=f"{run_id}-x", at=now, run_id=run_id, attempt=1, exit_code=0))
    return out


async def publish_all(publisher: Publisher, events: list[ev.AnyEvent], *, chunk: int = 50,
                      on_acked: Callable[[int], Any] | None = None) -> dict[str, int]:
    """Publish in pipelined chunks, each retried (same event ids) until acknowledged: id -> stream sequence.

    ``on_acked(count)`` runs after each chunk (the test kills and restarts nodes from it).
    """
    acked: dict[str, int] = {}
    for start in range(0, len(events), chunk):
        todo = events[start:start + chunk]
        async with asyncio.timeout(DEADLINE_S):
            while todo:
                futures = []
                for event in todo:
                    try:
                        futures.append(await publisher.submit(event))
                    except StreamUnavailable:
                        futures.append(None)
                sent = [f for f in futures if f is not None]
                if sent:
                    await asyncio.wait(sent, timeout=publisher.timeout)  # one deadline for the whole chunk
                publisher.forget([f for f in sent if not f.done()])
                retry = []
                for event, future in zip(todo, futures):
                    if future is not None and future.done() and future.exception() is None:
                        acked[event.id] = future.result()
                    else:
                        retry.append(event)
                todo = retry
                if todo:
                    await asyncio.sleep(0.2)  # back off before a retry, as a real publisher would
        if on_acked is not None:
            result = on_acked(len(acked))
            if asyncio.iscoroutine(result):
                await result
    return acked


async def stream_ids(js: JetStreamContext) -> Counter[str]:
    """How many times each event id is in the stream."""
    last = await stream_last_seq(js)
    reader = PullReader(js, 1)
    await reader.start()
    seen: Counter[str] = Counter()
    try:
        got = 0
        async with asyncio.timeout(DEADLINE_S):
            while got < last:
                for msg in await reader.next_batch(5000, 10.0):
                    seen[ev.decode_event(msg.subject, msg.data).id] += 1
                    got = msg.seq
    finally:
        await reader.stop()
    return seen


async def caught_up(nodes: list[ReadNode], js: JetStreamContext) -> int:
    """Wait until every read node's views hold the whole stream; its last sequence."""
    last = 0

    async def all_there() -> bool:
        nonlocal last
        last = await stream_last_seq(js)
        return all(node.health().get("last_seq") == last for node in nodes)

    await async_wait_until(all_there, DEADLINE_S, "the read nodes to catch up with the stream")
    return last


def verify(node: ReadNode) -> None:
    result = ledger("verify", "--data-dir", str(node.data_dir), env=node.env)
    assert 0 == result.returncode, result.stdout + result.stderr


class TestConnect:
    def test_a_url_list_fails_over_to_a_live_server(self, nats_server: EmbeddedNats) -> None:
        """A comma-separated --nats-url whose first server is down still connects (to the next one)."""

        async def go() -> bool:
            nc = await connect(f"nats://127.0.0.1:{free_port()}, {nats_server.url}")
            try:
                return bool(nc.is_connected)
            finally:
                await nc.close()

        assert asyncio.run(go())

    def test_a_url_list_with_no_server_up_is_one_line(self, tmp_path: Path) -> None:
        """`ledger events tail` against a list of dead servers exits 1 with one line naming them."""
        urls = f"nats://127.0.0.1:{free_port()},nats://127.0.0.1:{free_port()}"
        result = ledger("events", "tail", "--nats-url", urls, env=dict(os.environ))
        assert (1, 1) == (result.returncode, len(result.stderr.strip().splitlines()))
        assert "invalid connect url" not in result.stderr and urls in result.stderr


class TestFailover:
    async def test_killing_the_stream_leader_under_load_loses_and_doubles_nothing(
            self, nats_cluster: LocalCluster, read_nodes: list[ReadNode], cluster_js: JetStreamContext,
            tmp_path: Path) -> None:
        """With the R3 stream's leader SIGKILLed mid-load and started again: every acknowledged event is in
        the stream once, the job exits 0 and ends finished on both read nodes, whose views are equal and verified."""
        js = cluster_js
        assert 3 == (await js.stream_info("LEDGER")).config.num_replicas
        done = tmp_path / "job-may-end"
        env = {**read_nodes[0].env, "LEDGER_SPOOL": str(tmp_path / "spool.db")}
        job = await asyncio.create_subprocess_exec(
            *LEDGER, "run", "--run-id", "the-job", "--heartbeat", "0.1", "--", sys.executable, "-c", JOB, str(done),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            nc = await connect(nats_cluster.url, name="load")
            publisher = Publisher(nc, timeout=5.0)
            events = load_events(runs=30, heartbeats=98)
            killed: list[str] = []

            async def chaos(count: int) -> None:
                if count >= len(events) // 3 and not killed:
                    killed.append(await stream_leader(js))
                    nats_cluster.kill(killed[0])
                elif count >= 2 * len(events) // 3 and len(killed) == 1:
                    await asyncio.to_thread(nats_cluster.start_node, killed[0])
                    killed.append("restarted")

            try:
                acked = await publish_all(publisher, events, on_acked=chaos)
            finally:
                await publisher.close()
                await nc.close()
            assert ["restarted"] == killed[1:]
            await async_wait_until(lambda: read_nodes[0].get("/runs/the-job")[0] == 200,
                                   DEADLINE_S, "the job's run in the views")
            done.touch()
            async with asyncio.timeout(DEADLINE_S):
                _, err = await job.communicate()
            assert 0 == job.returncode, err.decode()
        finally:
            if job.returncode is None:
                job.kill()
                await job.wait()

        in_stream = await stream_ids(js)
        assert len(events) == len(acked)
        assert [] == [i for i in acked if in_stream[i] != 1]  # every acknowledged event once
        assert [] == [i for i, n in in_stream.items() if n != 1]  # and nothing doubled
        last = await caught_up(read_nodes, js)
        for node in read_nodes:
            assert ("finished", 0) == (lambda r: (r["state"], r["exit_code"]))(node.get("/runs/the-job")[1])
            assert last == node.health()["last_seq"]
        assert read_nodes[0].views() == read_nodes[1].views()
        for node in read_nodes:
            verify(node)
        names = {n.name for n in nats_cluster.nodes}
        cluster = read_nodes[0].health()["cluster"]  # /health's extra key: the same picture as `ledger status`
        assert (3, True) == (len(cluster["stream"]["peers"]), cluster["stream"]["leader"] in names)
        status = json.loads(ledger("status", "--json", env=read_nodes[1].env).stdout)
        assert (3, 0, 3) == (status["stream"]["replicas"], status["projection"]["lag"], len(status["stream"]["peers"]))
        assert status["stream"]["leader"] in names


class TestReadNodes:
    async def test_two_monitors_record_a_crash_once_and_a_restarted_read_node_catches_up(
            self, nats_cluster: LocalCluster, tmp_path: Path, cluster_js: JetStreamContext) -> None:
        """Two read nodes' monitors crash a silent run once between them (and a repeat past the duplicate
        window changes no view); a read node SIGKILLed while events flow catches up, its views equal to the other's."""
        js = cluster_js
        nodes = [ReadNode(n, nats_cluster.url, tmp_path, heartbeat_timeout=1.0) for n in ("a", "b")]
        nc = await connect(nats_cluster.url, name="test")
        publisher = Publisher(nc)
        try:
            for node in nodes:
                node.start()
            now = datetime.now(timezone.utc)
            await publisher.publish(ev.RunStarted(id="silent-s", at=now, run_id="silent", attempt=1, host="h", pid=1,
                                                  command=["x"]))
            await async_wait_until(lambda: all((n.get("/runs/silent")[1] or {}).get("state") == "crashed"
                                               for n in nodes), DEADLINE_S, "the silent run crashed on both")
            crash = [e for e in await run_events(js, "silent") if isinstance(e, ev.RunCrashed)]
            assert 1 == len(crash)
            # the same fact recorded again past JetStream's 2-minute duplicate window (another Nats-Msg-Id):
            # the views' seen ids ignore it
            await publisher.wait(await publisher.submit(crash[0], {"Nats-Msg-Id": "past-the-window"}))
            nodes[1].kill()
            await publish_all(publisher, load_events(runs=10, heartbeats=50))
            nodes[1].start()
            await caught_up(nodes, js)
            assert 2 == await count_type(js, "run.crashed")  # the monitors' once, and the late repeat
            assert nodes[0].views() == nodes[1].views()
            for node in nodes:
                history = node.get("/runs/silent/history")[1]["history"]
                assert ["running", "crashed"] == [h["state"] for h in history]
        finally:
            await publisher.close()
            await nc.close()
            for node in nodes:
                node.kill()

    async def test_a_whole_cluster_restart_loses_nothing(
            self, nats_cluster: LocalCluster, read_nodes: list[ReadNode], cluster_js: JetStreamContext) -> None:
        """Every node of the cluster SIGKILLed and started again: every acknowledged event is still there,
        and the read nodes (running all along) go on and hold them all."""
        nc = await connect(nats_cluster.url, name="test")
        publisher = Publisher(nc)
        try:
            acked = await publish_all(publisher, load_events(runs=10, heartbeats=48))
        finally:
            await publisher.close()
            await nc.close()
        for node in nats_cluster.nodes:
            nats_cluster.kill(node.name)
        await asyncio.to_thread(nats_cluster.start)
        nc = await connect(nats_cluster.url, name="after")
        try:
            js = nc.jetstream()
            await async_wait_until(lambda: _stream_answers(js), DEADLINE_S, "the stream back after the restart")
            in_stream = await stream_ids(js)
            assert [] == [i for i in acked if in_stream[i] != 1]
            last = await caught_up(read_nodes, js)
            await async_wait_until(lambda: all("ok" == n.health().get("status") for n in read_nodes), DEADLINE_S,
                                   "both read nodes healthy again")
            assert last >= len(acked)
        finally:
            await nc.close()


class TestReplicasGuard:
    async def test_replicas_are_raised_on_request_and_never_lowered(
            self, nats_cluster: LocalCluster, tmp_path: Path, cluster_js: JetStreamContext) -> None:
        """`ledger up --replicas 3` raises an R1 stream to R3 and says so; `ledger up --replicas 1` then leaves
        it at R3 and says so."""
        seen: list[tuple[int, str]] = []
        for name, replicas in (("a", "1"), ("b", "3"), ("c", "1")):
            node = ReadNode(name, nats_cluster.url, tmp_path, "--replicas", replicas)
            try:
                node.start()
                assert node.up is not None
                proc, node.up = node.up.proc, None
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=60)
                assert 0 == proc.returncode, err
            finally:
                node.kill()
            info = await cluster_js.stream_info("LEDGER")
            said = [line for line in err.splitlines() if "replicas" in line]
            seen.append((info.config.num_replicas, said[0] if said else ""))
        assert [(1, ""), (3, "ledger up: stream LEDGER raised from 1 to 3 replicas"),
                (3, "ledger up: stream LEDGER keeps its 3 replicas (asked for 1: replicas are never lowered)")] == seen


class TestDeploy:
    def test_the_three_node_configs_are_valid_and_route_to_each_other(self) -> None:
        """deploy/cluster's three nats-server configs pass `nats-server -t`, have distinct server names and
        each routes to the other two."""
        from ledger.nats.server import nats_server_binary

        root = Path(__file__).resolve().parent.parent / "deploy" / "cluster"
        names, routes = [], []
        for i in (1, 2, 3):
            conf = root / f"nats-{i}.conf"
            check = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True)
            assert 0 == check.returncode, check.stderr
            text = conf.read_text()
            names.append(re.search(r"server_name: (\S+)", text).group(1))  # type: ignore[union-attr]
            routes.append(sorted(re.findall(r"nats-route://ledger-(\d)", text)))
        assert ["ledger-1", "ledger-2", "ledger-3"] == names
        assert [["2", "3"], ["1", "3"], ["1", "2"]] == routes


async def _stream_answers(js: JetStreamContext) -> bool:
    try:
        await js.stream_info("LEDGER")
        return True
    except Exception:  # an election under way: not yet
        return False


async def count_type(js: JetStreamContext, event_type: str) -> int:
    """How many events of this type the stream holds."""
    last = await stream_last_seq(js)
    reader = PullReader(js, 1)
    await reader.start()
    n = got = 0
    try:
        async with asyncio.timeout(DEADLINE_S):
            while got < last:
                for msg in await reader.next_batch(5000, 10.0):
                    n += ev.tag_of(ev.decode_event(msg.subject, msg.data)) == event_type
                    got = msg.seq
    finally:
        await reader.stop()
    return n
