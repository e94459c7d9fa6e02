"""A run's audit trail and as-of answers, from the stream: the timeline, the HTTP endpoints,
and the ``ledger events|audit|replay|verify`` commands as a user runs them."""

from __future__ import annotations

import gzip
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.events import encode_event, subject_of
from ledger.nats.publisher import Publisher
from ledger.nats.server import free_port
from projections.audit.timeline import run_timeline
from projections.projector.projector import Projector
from tests.conftest import kill_tree
from tests.factory import (
    at,
    dump_views,
    eid,
    exited,
    heartbeat,
    preempting,
    run_row,
    started,
    sweep,
)
from tests.test_api import get_json
from tests.test_replay import other_nc, other_server  # noqa: F401  (fixtures)

LEDGER = [sys.executable, "-m", "ledger.cli"]


def ledger(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEDGER, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


async def story(publisher: Publisher, js: JetStreamContext) -> dict[str, int]:
    """One run's life with everything that changes nothing: late, duplicate, stale, stale crash, no-op, bad input."""
    seqs = {}
    first = started("r1", sweep_id="s1", attempt=1)
    seqs["started"] = await publisher.publish(first)
    seqs["heartbeat"] = await publisher.publish(heartbeat("r1", t=10, step=5, attempt=1))
    await publisher.publish(started("other", t=11))  # another run: not in r1's trail
    seqs["duplicate"] = int((await js.publish(subject_of(first), encode_event(first))).seq)  # beyond the window
    seqs["stale"] = await publisher.publish(heartbeat("r1", t=12, attempt=4))
    seqs["stale_crash"] = await publisher.publish(ev.RunCrashed(  # decided on the heartbeat of t=0, one came at t=10
        id=eid(), at=at(12.5), run_id="r1", reason="heartbeat-timeout", last_heartbeat_at=at(0)))
    seqs["preempting"] = await publisher.publish(preempting("r1", t=13, attempt=1))
    seqs["exited"] = await publisher.publish(exited("r1", 143, t=14, signal=15, attempt=1))
    seqs["late"] = await publisher.publish(heartbeat("r1", t=15, attempt=1))
    seqs["noop"] = await publisher.publish(ev.RunStopping(id=eid(), at=at(16), run_id="r1"))
    seqs["bad"] = int((await js.publish("ledger.run.r1.exited", b'{"type":"run.exited"}')).seq)
    seqs["resumed"] = await publisher.publish(started("r1", t=20, attempt=2, resume="must"))
    return seqs


class TestTimeline:
    async def test_every_message_with_its_effect_and_why(self, js: JetStreamContext, publisher: Publisher,
                                                         tmp_path: Path) -> None:
        """The audit trail lists the run's messages in stream order, marks what changed nothing, and says why."""
        seqs = await story(publisher, js)
        found = await run_timeline(js, "r1")
        marks = [(e.seq, e.effect, e.state) for e in found.events]
        assert [
            (seqs["started"], "applied", "running"), (seqs["heartbeat"], "applied", "running"),
            (seqs["duplicate"], "duplicate", "running"), (seqs["stale"], "stale", "running"),
            (seqs["stale_crash"], "unchanged", "running"), (seqs["preempting"], "applied", "running"),
            (seqs["exited"], "applied", "preempted"), (seqs["late"], "late", "preempted"),
            (seqs["noop"], "unchanged", "preempted"), (seqs["bad"], "quarantined", "preempted"),
            (seqs["resumed"], "applied", "running"),
        ] == marks
        why = {e.seq: e.why for e in found.events}
        assert f"first recorded at seq {seqs['started']}" in why[seqs["duplicate"]]
        assert "attempt 4 is not the run's attempt 1" in why[seqs["stale"]]
        assert why[seqs["stale_crash"]].startswith("stale crash: a heartbeat at")
        assert "late heartbeat: the run is preempted" in why[seqs["late"]]
        assert why[seqs["noop"]] == "no-op: run.stopping changes nothing on a preempted run"
        assert why[seqs["bad"]].startswith("quarantined: invalid event")
        assert "preempted -> running (attempt 2)" == why[seqs["resumed"]]
        exited_entry = next(e for e in found.events if e.seq == seqs["exited"])
        assert (["running", "preempted"], True) == (exited_entry.changes["state"], exited_entry.history)
        assert {"applied": 5, "duplicate": 1, "stale": 1, "unchanged": 2, "late": 1, "quarantined": 1} == found.summary
        await Projector(js, tmp_path / "v.db").run(until_idle=True)
        assert run_row(tmp_path / "v.db", "r1")["attempt"] == found.run.attempt == 2  # type: ignore[index,union-attr]

    async def test_unknown_run_has_an_empty_trail(self, js: JetStreamContext) -> None:
        """A run with no message has no events (the endpoint and the command answer 404 / an error)."""
        assert [] == (await run_timeline(js, "ghost")).events


class TestHttp:
    async def test_events_endpoint_serves_the_trail(self, api: httpx.AsyncClient, js: JetStreamContext,
                                                    publisher: Publisher) -> None:
        """GET /runs/{id}/events returns the audit trail as JSON; an unknown run is 404."""
        seqs = await story(publisher, js)
        body = await get_json(api, "/runs/r1/events")
        assert ("r1", len(seqs)) == (body["run_id"], len(body["events"]))
        assert {"seq", "recorded_at", "subject", "event_id", "event_type", "at", "attempt", "effect", "why",
                "changes", "history", "state", "run"} == set(body["events"][0])
        assert "running" == body["run"]["state"]
        assert "ghost" in (await get_json(api, "/runs/ghost/events", status=404))["error"]
        await get_json(api, "/runs/a.b/events", status=400)

    async def test_run_as_of_seq_and_time(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """?as_of_seq=N and ?as_of=TIME answer the run as it was then; before it existed, 404."""
        await publisher.publish(started("r0"))
        s1 = await publisher.publish(started("r1", sweep_id="s1"))
        s2 = await publisher.publish(heartbeat("r1", step=7))
        s3 = await publisher.publish(exited("r1", 1))
        now = await get_json(api, "/runs/r1", min_seq=s3)
        assert "failed" == now["state"]
        then = await get_json(api, "/runs/r1", as_of_seq=s2)
        assert ("running", 7, s2) == (then["state"], then["step"], then["seq"])
        history = (await get_json(api, "/runs/r1/history"))["history"]
        at_start = await get_json(api, "/runs/r1", as_of=history[0]["recorded_at"])
        assert ("running", None, s1) == (at_start["state"], at_start["step"], at_start["seq"])
        assert now == await get_json(api, "/runs/r1", as_of="2100-01-01T00:00:00+01:00")
        await get_json(api, "/runs/r1", status=404, as_of_seq=s1 - 1)
        await get_json(api, "/runs/r1", status=404, as_of="2000-01-01T00:00:00Z")

    @pytest.mark.parametrize("params", [
        {"as_of": "yesterday"}, {"as_of": "2026-11-25T03:12:00"}, {"as_of_seq": "-1"}, {"as_of_seq": "x"},
        {"as_of": "2026-11-25T03:12:00Z", "as_of_seq": "3"},
    ], ids=["text", "no-offset", "negative-seq", "text-seq", "both"])
    async def test_bad_as_of_is_400(self, api: httpx.AsyncClient, publisher: Publisher,
                                    params: dict[str, str]) -> None:
        """A bad as_of or as_of_seq answers 400 with an error saying which."""
        await publisher.publish(started("r1"))
        assert "as_of" in (await get_json(api, "/runs/r1", status=400, **params))["error"]
        await get_json(api, "/sweeps/s1", status=400, **params)

    async def test_sweep_as_of(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A sweep as of a seq: its own state and its runs per state and queue as they were then."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        for run in ("r1", "r2"):
            await publisher.publish(started(run, sweep_id="s1"))
        await publisher.publish(preempting("r1"))
        cut = await publisher.publish(exited("r1", 143, signal=15))
        await publisher.publish(sweep(ev.SweepPaused, "s1", t=5))
        await publisher.publish(started("r1", t=6, resume="allow"))
        last = await publisher.publish(exited("r2", 0, t=7))
        now = await get_json(api, "/sweeps/s1", min_seq=last)
        then = await get_json(api, "/sweeps/s1", as_of_seq=cut)
        assert ("paused", 1, 1, []) == (now["state"], now["runs"]["running"], now["runs"]["finished"], now["queue"])
        assert ("running", 1, 1, ["r1"]) == (then["state"], then["runs"]["running"], then["runs"]["preempted"],
                                             then["queue"])
        await get_json(api, "/sweeps/s1", status=404, as_of_seq=0)


# --------------------------------------------------------------------------- the commands

class TestEventsCommands:
    async def test_tail_prints_stream_order_and_filters(self, js: JetStreamContext, publisher: Publisher,
                                                        cli_env: dict[str, str]) -> None:
        """events tail prints seq, time, subject and payload; --run filters; --json is export lines; -n limits."""
        await publisher.publish(started("r1"))
        await publisher.publish(started("r2"))
        await publisher.publish(exited("r1", 0))
        await js.publish("ledger.run.r1.exited", b"\xff")
        out = ledger("events", "tail", env=cli_env)
        lines = out.stdout.splitlines()
        assert (0, 4) == (out.returncode, len(lines))
        assert lines[0].split()[0] == "1" and "ledger.run.r1.started" in lines[0] and '"run_id":"r1"' in lines[0]
        assert "<1 bytes, not UTF-8>" in lines[3]
        mine = [json.loads(line) for line in ledger("events", "tail", "--run", "r1", "--json", env=cli_env).stdout.splitlines()]
        assert [1, 3, 4] == [m["seq"] for m in mine]
        assert {"seq", "subject", "time", "headers", "data"} == set(mine[0]) and "data_b64" in mine[2]
        last = ledger("events", "tail", "-n", "1", "--json", env=cli_env)
        assert [4] == [json.loads(line)["seq"] for line in last.stdout.splitlines()]
        since = ledger("events", "tail", "--since-seq", "2", "--run", "r1", env=cli_env)
        assert ["3", "4"] == [line.split()[0] for line in since.stdout.splitlines()]

    async def test_tail_follow_prints_new_messages(self, js: JetStreamContext, publisher: Publisher,
                                                   cli_env: dict[str, str]) -> None:
        """events tail --follow prints messages as they arrive; Ctrl-C ends it cleanly."""
        await publisher.publish(started("r1"))
        proc = subprocess.Popen([*LEDGER, "events", "tail", "--follow", "--json", "-n", "0", "--run", "r1"],
                                env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            seq = 0
            line = ""
            while time.monotonic() < deadline and not line:
                seq = await publisher.publish(heartbeat("r1", t=time.monotonic(), id=f"hb{time.monotonic_ns()}"))
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)  # the tail may subscribe after a publish
                if ready:
                    line = proc.stdout.readline()
            assert line, "no line from tail --follow"
            record = json.loads(line)
            assert record["subject"] == "ledger.run.r1.heartbeat" and record["seq"] <= seq
            proc.send_signal(signal.SIGINT)
            assert 0 == proc.wait(60)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()

    async def test_export_import_then_replay_equal_views(
        self, js: JetStreamContext, publisher: Publisher, other_server: Any, other_nc: Any,  # noqa: F811
        cli_env: dict[str, str], tmp_path: Path,
    ) -> None:
        """events export -o FILE.gz, events import FILE.gz into another server (twice: idempotent), replay: same views."""
        from tests.test_replay import publish_history

        last = await publish_history(publisher, js, runs=12)
        dump = tmp_path / "dump.jsonl.gz"
        out = ledger("events", "export", "-o", str(dump), env=cli_env)
        assert (0, f"exported {last} messages (seq 1..{last}) to {dump}") == (out.returncode, out.stdout.strip())
        assert last == len(gzip.decompress(dump.read_bytes()).splitlines())
        partial = ledger("events", "export", "--since-seq", "3", "--until-seq", "5", env=cli_env)
        assert [3, 4, 5] == [json.loads(line)["seq"] for line in partial.stdout.splitlines()]
        other_env = {**cli_env, "LEDGER_NATS_URL": other_server.url}
        first = ledger("events", "import", str(dump), "--json", env=other_env)
        assert 0 == first.returncode, first.stderr
        assert (last, 0) == (json.loads(first.stdout)["imported"], json.loads(first.stdout)["skipped"])
        again = ledger("events", "import", str(dump), env=other_env)
        assert f"imported 0 of {last} messages ({last} already there" in again.stdout
        for env, name in ((cli_env, "a"), (other_env, "b")):
            done = ledger("replay", "--data-dir", str(tmp_path / name), env=env)
            assert 0 == done.returncode, done.stderr
            assert f"up to seq {last}" in done.stdout
        assert dump_views(tmp_path / "a" / "views.db") == dump_views(tmp_path / "b" / "views.db")

    def test_import_errors_are_one_line(self, cli_env: dict[str, str], js: JetStreamContext, tmp_path: Path) -> None:
        """A missing or malformed file is one clear error line and exit 1."""
        bad = tmp_path / "bad.jsonl"
        bad.write_text("not json\n")
        for path, needle in ((bad, "line 1: not an export record"), (tmp_path / "nope.jsonl", "cannot read")):
            result = ledger("events", "import", str(path), env=cli_env)
            assert (1, 1) == (result.returncode, len(result.stderr.strip().splitlines())), result.stderr
            assert needle in result.stderr and result.stderr.startswith("error:")


class TestAuditReplayVerifyCommands:
    async def test_audit_table_and_json(self, js: JetStreamContext, publisher: Publisher,
                                        cli_env: dict[str, str]) -> None:
        """ledger audit prints the trail with effects; --json is the same data as GET /runs/{id}/events."""
        seqs = await story(publisher, js)
        table = ledger("audit", "r1", env=cli_env)
        assert 0 == table.returncode, table.stderr
        for word in ("duplicate", "stale", "late", "quarantined", "no-op", "preempted"):
            assert word in table.stdout
        data = json.loads(ledger("audit", "r1", "--json", env=cli_env).stdout)
        assert [seqs[k] for k in seqs] == [e["seq"] for e in data["events"]]
        missing = ledger("audit", "ghost", env=cli_env)
        assert (1, True) == (missing.returncode, "unknown run 'ghost'" in missing.stderr)
        unsafe = ledger("audit", "a.b", env=cli_env)
        assert (1, True) == (unsafe.returncode, unsafe.stderr.startswith("error: unsafe run id"))

    async def test_replay_and_verify(self, js: JetStreamContext, publisher: Publisher, cli_env: dict[str, str],
                                     tmp_path: Path) -> None:
        """replay builds and swaps views; verify passes (exit 0), then reports a tampered row (exit 2)."""
        from tests.test_replay import publish_history

        last = await publish_history(publisher, js, runs=6)
        data = tmp_path / "data"
        done = json.loads(ledger("replay", "--data-dir", str(data), "--json", env=cli_env).stdout)
        assert (last, str(data / "views-1.db"), None) == (done["last_seq"], done["views"], done["previous"])
        ok = ledger("verify", "--data-dir", str(data), env=cli_env)
        assert (0, f"views equal the stream up to seq {last}") == (ok.returncode, ok.stdout.split(" (")[0])
        with sqlite3.connect(data / "views.db") as con:
            con.execute("UPDATE runs SET exit_code = 42 WHERE run_id = 'r003'")
        bad = ledger("verify", "--data-dir", str(data), env=cli_env)
        assert 2 == bad.returncode
        assert "runs: 1 row(s) differ" in bad.stdout and "r003: exit_code live=42 rebuilt=1" in bad.stdout
        report = json.loads(ledger("verify", "--data-dir", str(data), "--json", env=cli_env).stdout)
        assert (False, ["r003"]) == (report["equal"], report["tables"]["runs"]["shown"][0]["key"])
        partial = json.loads(ledger("replay", "--data-dir", str(data), "--to-seq", "3", "--json", env=cli_env).stdout)
        assert (3, str(data / "views-1.db")) == (partial["last_seq"], partial["previous"])
        assert 0 == ledger("verify", "--data-dir", str(data), env=cli_env).returncode
        missing = ledger("verify", "--data-dir", str(tmp_path / "none"), env=cli_env)
        assert (1, True) == (missing.returncode, "no views database" in missing.stderr)

    def test_runs_show_as_of_through_the_api(self, cli_env: dict[str, str], tmp_path: Path, js: JetStreamContext) -> None:
        """ledger runs show --as-of-seq / --as-of and sweeps show --as-of-seq ask the API for the past."""
        from tests.test_cli import Up

        http = f"127.0.0.1:{free_port()}"
        env = {**cli_env, "LEDGER_HTTP": http, "LEDGER_DATA_DIR": str(tmp_path / "data")}
        up = Up([], env)
        try:
            ledger("emit", '{"type":"sweep.created","id":"e0","at":"2026-11-25T11:00:00Z","sweep_id":"s1"}', env=env)
            ledger("emit", '{"type":"run.started","id":"e1","at":"2026-11-25T12:00:00Z","run_id":"r1","sweep_id":"s1"}',
                   env=env)
            ledger("emit", '{"type":"run.exited","id":"e2","at":"2026-11-25T12:01:00Z","run_id":"r1","exit_code":0}',
                   env=env)
            then = json.loads(ledger("runs", "show", "r1", "--as-of-seq", "2", "--json", env=env).stdout)
            assert ("running", 2) == (then["state"], then["seq"])
            swept = json.loads(ledger("sweeps", "show", "s1", "--as-of-seq", "1", "--json", env=env).stdout)
            assert ("running", 0) == (swept["state"], sum(swept["runs"].values()))
            early = ledger("runs", "show", "r1", "--as-of", "2000-01-01T00:00:00Z", env=env)
            assert (1, True) == (early.returncode, "unknown at" in early.stderr)
            both = ledger("runs", "show", "r1", "--as-of", "x", "--as-of-seq", "1", env=env)
            assert 2 == both.returncode and "not both" in both.stderr
            table = ledger("runs", "show", "r1", "--as-of-seq", "2", env=env)
            assert 0 == table.returncode and "running" in table.stdout
        finally:
            assert 0 == up.stop()


class TestHelp:
    @pytest.mark.parametrize("verb", [["events"], ["events", "tail"], ["events", "export"], ["events", "import"],
                                      ["audit"], ["replay"], ["verify"]], ids=lambda v: " ".join(v))
    def test_every_new_command_has_help(self, verb: list[str]) -> None:
        """Every audit and replay command answers --help."""
        result = ledger(*verb, "--help", env=dict(os.environ))
        assert 0 == result.returncode and "Usage:" in result.stdout

    def test_replay_help_says_what_the_projector_does_after_to_seq(self) -> None:
        """replay --help says a running projector continues from N after --to-seq N."""
        text = " ".join(ledger("replay", "--help", env=dict(os.environ)).stdout.split())
        assert "continues from N" in text
