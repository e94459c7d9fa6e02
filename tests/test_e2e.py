"""The seeds' scenarios end to end, as a user runs them: `ledger up`, `ledger run`
wrappers around real processes, `ledger sweep ...`, and the query verbs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.nats.server import free_port
from tests.conftest import DEADLINE_S, kill_tree
from tests.jobs import Up, ledger, ledger_run, wait_until

TIMEOUT_S = 1.5
"""The heartbeat timeout of these tests' `ledger up` (wrappers heartbeat every 0.2 s)."""

TRAIN = """
import pathlib, signal, sys, time
from ledger import current_run

run = current_run()

def on_sigterm(signum, frame):
    run.mark_preempting()
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, on_sigterm)
pathlib.Path(sys.argv[1]).touch()
while True:
    time.sleep(0.01)
"""

WAIT = "import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\nwhile True: time.sleep(0.01)\n"


class Cluster:
    """`ledger up` on the test's nats-server, and the environment a user's shell would have."""

    def __init__(self, env: dict[str, str], up: Up, tmp: Path) -> None:
        self.env, self.up, self.tmp = env, up, tmp
        self.children: list[Any] = []

    def cli(self, *args: str) -> Any:
        result = ledger(*args, env=self.env)
        return result

    def json(self, *args: str) -> Any:
        result = ledger(*args, "--json", env=self.env)
        assert 0 == result.returncode, result.stderr
        return json.loads(result.stdout)

    def run(self, *args: str) -> Any:
        proc = ledger_run(["--heartbeat", "0.2", *args], self.env)
        self.children.append(proc)
        return proc

    def state(self, run_id: str) -> dict[str, Any]:
        return self.json("runs", "show", run_id)  # type: ignore[no-any-return]

    def wait_state(self, run_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        wait_until(lambda: self.cli("runs", "show", run_id, "--json").returncode == 0
                   and self.state(run_id)["state"] == state, timeout, f"run {run_id} {state}")
        return self.state(run_id)


@pytest.fixture
def cluster(cli_env: dict[str, str], tmp_path: Path, js: object) -> Iterator[Cluster]:
    http = f"127.0.0.1:{free_port()}"
    env = {**cli_env, "LEDGER_HTTP": http, "LEDGER_DATA_DIR": str(tmp_path / "data"),
           "LEDGER_HEARTBEAT_TIMEOUT": str(TIMEOUT_S), "LEDGER_SPOOL": str(tmp_path / "spool.db"),
           "PYTHONUNBUFFERED": "1"}
    up = Up([], env)
    c = Cluster(env, up, tmp_path)
    try:
        yield c
    finally:
        for proc in c.children:
            if proc.poll() is None:
                kill_tree(proc)  # its own child too: it holds the pipes open and would outlive the test
            else:
                proc.communicate(timeout=DEADLINE_S)
        up.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TestExits:
    def test_exit_0_finished_exit_1_failed(self, cluster: Cluster) -> None:
        """A process exiting 0 ends finished, one exiting 1 ends failed; the wrapper passes the code on."""
        ok = cluster.run("--run-id", "ok", "--", "true")
        bad = cluster.run("--run-id", "bad", "--", "sh", "-c", "exit 1")
        ok_out, bad_out = ok.communicate(timeout=60), bad.communicate(timeout=60)
        assert (0, 1) == (ok.returncode, bad.returncode), (ok_out, bad_out)
        assert (0, None) == (cluster.wait_state("ok", "finished")["exit_code"], cluster.state("ok")["signal"])
        assert 1 == cluster.wait_state("bad", "failed")["exit_code"]
        history = cluster.json("runs", "history", "bad")["history"]
        assert [("running", None), ("failed", "exit code 1")] == [
            (e["state"], e["reason"] if e["state"] == "failed" else None) for e in history]

    def test_sigkilled_wrapper_is_crashed_after_timeout(self, cluster: Cluster) -> None:
        """SIGKILL to the wrapper itself: heartbeats stop, and the monitor marks the run crashed."""
        ready = cluster.tmp / "ready"
        proc = cluster.run("--run-id", "lost", "--", sys.executable, "-c", WAIT, str(ready))
        wait_until(ready.exists, what="child ready")
        cluster.wait_state("lost", "running")
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        run = cluster.wait_state("lost", "crashed", timeout=TIMEOUT_S + 15)
        detected = time.monotonic() - killed_at
        history = cluster.json("runs", "history", "lost")["history"]
        assert "heartbeat-timeout" == history[-1]["reason"]
        assert run["last_heartbeat_at"] is not None
        assert detected >= TIMEOUT_S - 0.5  # not before the timeout
        os.killpg(int(self_child_pid(cluster, "lost")), signal.SIGKILL)


def events_of(cluster: Cluster, kind: str, entity: str, event_type: str) -> list[dict[str, Any]]:
    """The payloads of one run's or sweep's events of a type, read with `ledger events tail`."""
    tail = ledger("events", "tail", f"--{kind}", entity, "--since-seq", "1", "--json", env=cluster.env)
    assert 0 == tail.returncode, tail.stderr
    payloads = [json.loads(json.loads(line)["data"]) for line in tail.stdout.splitlines()]
    return [p for p in payloads if p.get("type") == event_type]


def self_child_pid(cluster: Cluster, run_id: str) -> int:
    """The pid `ledger run` recorded in run.started (the wrapper's child)."""
    return int(events_of(cluster, "run", run_id, "run.started")[-1]["pid"])


class TestPreemption:
    def test_preempted_queued_claimed_resumed(self, cluster: Cluster) -> None:
        """Handled SIGTERM with mark_preempting, exit 143: preempted and queued; `sweep next` claims it;
        `ledger run --resume must` resumes it as attempt 2."""
        assert 0 == cluster.cli("sweep", "create", "s1").returncode
        script, ready = cluster.tmp / "train.py", cluster.tmp / "ready"
        script.write_text(TRAIN)
        proc = cluster.run("--run-id", "p1", "--sweep", "s1", "--", sys.executable, str(script), str(ready))
        wait_until(ready.exists, what="training ready")
        proc.send_signal(signal.SIGTERM)
        assert 143 == proc.wait(60)
        run = cluster.wait_state("p1", "preempted")
        assert (1, True, 143) == (run["attempt"], run["preempting"], run["exit_code"])
        assert ["p1"] == cluster.json("sweeps", "show", "s1")["queue"]
        claim = cluster.cli("sweep", "next", "s1")
        assert (0, "p1") == (claim.returncode, claim.stdout.strip())
        empty = cluster.cli("sweep", "next", "s1")
        assert 1 == empty.returncode and "empty" in empty.stderr
        assert [] == cluster.json("sweeps", "show", "s1")["queue"]
        ready.unlink()
        resumed = cluster.run("--run-id", "p1", "--sweep", "s1", "--resume", "must", "--", sys.executable,
                              "-c", WAIT, str(ready))
        wait_until(ready.exists, what="resumed child ready")
        run = cluster.wait_state("p1", "running")
        assert (2, False) == (run["attempt"], run["preempting"])
        resumed.send_signal(signal.SIGINT)
        resumed.wait(60)


class TestSweeps:
    def test_paused_sweep_keeps_runs_and_takes_none(self, cluster: Cluster) -> None:
        """Pausing a sweep leaves its running run alone and refuses a new one; resume lets runs in again."""
        cluster.cli("sweep", "create", "s2")
        ready = cluster.tmp / "ready"
        proc = cluster.run("--run-id", "a1", "--sweep", "s2", "--", sys.executable, "-c", WAIT, str(ready))
        wait_until(ready.exists, what="child ready")
        assert "paused" == cluster.json("sweep", "pause", "s2", "--reason", "quota")["state"]
        refused = ledger_run(["--run-id", "a2", "--sweep", "s2", "--", "true"], cluster.env)
        _, err = refused.communicate(timeout=60)
        assert 1 == refused.returncode and "paused" in err
        assert proc.poll() is None
        assert "running" == cluster.wait_state("a1", "running")["state"]
        assert 1 == cluster.cli("runs", "show", "a2").returncode  # nothing appended for a2
        assert "running" == cluster.json("sweep", "resume", "s2")["state"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        refused_twice = cluster.cli("sweep", "cancel", "s2")
        assert 0 == refused_twice.returncode
        nonsense = cluster.cli("sweep", "pause", "s2")
        assert 1 == nonsense.returncode and "cancelled" in nonsense.stderr

    def test_cancel_kills_children_within_a_second(self, cluster: Cluster) -> None:
        """Cancelling a sweep: its running children are SIGKILLed, the runs killed with the cancel as cause."""
        cluster.cli("sweep", "create", "s3")
        procs = []
        for i in range(3):
            ready = cluster.tmp / f"ready{i}"
            procs.append(cluster.run("--run-id", f"c{i}", "--sweep", "s3", "--", sys.executable, "-c", WAIT,
                                     str(ready)))
            wait_until(ready.exists, what=f"child {i} ready")
        for i in range(3):
            cluster.wait_state(f"c{i}", "running")
        pids = [self_child_pid(cluster, f"c{i}") for i in range(3)]
        cancelled = time.monotonic()
        assert "cancelled" == cluster.json("sweep", "cancel", "s3", "--reason", "bad idea")["state"]
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=60, what="children dead")
        took = time.monotonic() - cancelled
        assert [137] * 3 == [p.wait(60) for p in procs]
        cancel_id = events_of(cluster, "sweep", "s3", "sweep.cancelled")[0]["id"]
        for i in range(3):
            history = cluster.json("runs", "history", f"c{i}")["history"]
            assert ("killed", "sweep-cancelled") == (history[-1]["state"], history[-1]["reason"])
            assert "killed" == cluster.state(f"c{i}")["state"]
        kills = [events_of(cluster, "run", f"c{i}", "run.killed") for i in range(3)]
        assert [[cancel_id]] * 3 == [[k["cause"] for k in ks] for ks in kills]
        assert took < 10


class TestTwoMonitors:
    def test_second_monitor_records_nothing_twice(self, cluster: Cluster) -> None:
        """A second `ledger monitor` beside `ledger up`'s: one crash and one kill per run, never two."""
        import subprocess

        second = subprocess.Popen([sys.executable, "-m", "ledger.cli", "monitor", "--interval", "0.1"],
                                  env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cluster.children.append(second)
        cluster.cli("sweep", "create", "s4")
        ready = [cluster.tmp / "r-lost", cluster.tmp / "r-k1", cluster.tmp / "r-k2"]
        lost = cluster.run("--run-id", "lost2", "--", sys.executable, "-c", WAIT, str(ready[0]))
        victims = [cluster.run("--run-id", f"k{i}", "--sweep", "s4", "--", sys.executable, "-c", WAIT,
                               str(ready[i])) for i in (1, 2)]
        for path in ready:
            wait_until(path.exists, what="children ready")
        for run_id in ("lost2", "k1", "k2"):
            cluster.wait_state(run_id, "running")
        orphan = self_child_pid(cluster, "lost2")
        os.kill(lost.pid, signal.SIGKILL)
        cluster.cli("sweep", "cancel", "s4")
        cluster.wait_state("lost2", "crashed", timeout=TIMEOUT_S + 15)
        for run_id in ("k1", "k2"):
            cluster.wait_state(run_id, "killed")
        assert [137, 137] == [v.wait(60) for v in victims]
        os.killpg(orphan, signal.SIGKILL)
        assert 1 == len(events_of(cluster, "run", "lost2", "run.crashed"))
        assert [1, 1] == [len(events_of(cluster, "run", r, "run.killed")) for r in ("k1", "k2")]
