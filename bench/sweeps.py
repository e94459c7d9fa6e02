#!/usr/bin/env python
"""Sweep benchmark of run-ledger: sweep-cancel kill latency, crash detection latency
and ``ledger sweep next`` under contention, with real processes, as a user runs them.

Starts its own ``ledger up`` (the console script, as a subprocess in its own
session: temp data dir, free NATS and HTTP ports, ``--heartbeat-timeout T``),
which starts its own embedded nats-server, and measures:

1. kill latency of ``ledger sweep cancel``: per round a fresh sweep and K
   ``ledger run --sweep S --heartbeat H -- python -c CHILD`` wrappers (CHILD
   writes a ready file with its pid, then sleeps forever); once every ready
   file exists and ``ledger runs show`` says running, the children's pids are
   read from ``ledger events tail --run ID --since-seq 1 --json`` (run.started
   ``pid``, checked against the ready file). A thread polls every child
   (``kill(pid, 0)`` + zombie check in /proc) every ``--poll-ms``; the clock
   starts just before ``ledger sweep cancel S`` is spawned, and separately at
   the cancel's stream time (``time`` of the sweep.cancelled record). Per-child
   latencies over all rounds: median, p90, max. Breakdown from the stream:
   CLI spawn -> cancel appended, cancel -> run.killed appended (projector +
   sweep reactor), run.killed -> child dead (wrapper's kill subscription +
   killpg). Checked: every wrapper exits 137, every run ends ``killed``
   (reason sweep-cancelled) with exactly one run.killed whose ``cause`` is the
   cancel's event id. Target: median < 1 s.
2. crash detection: per round one wrapper (``--heartbeat H``, no sweep),
   running, then SIGKILLed (its orphaned child is SIGKILLed by the benchmark
   at once: this process is a child subreaper, so orphans come back to it).
   ``GET /runs/ID`` (what ``ledger runs show`` reads) is polled every
   ``--crash-poll-ms`` until the run is ``crashed``; elapsed = that moment -
   the run's ``last_heartbeat_at``, detection delay = elapsed - T (confirmed
   with ``ledger runs show --json`` and the run.crashed event). Breakdown:
   monitor tick lateness (run.crashed ``at`` - last heartbeat - T), append
   (stream time - ``at``), visible (seen - stream time). Target: every round
   detected within T + 2 s.
3. ``ledger sweep next`` under contention: per round a fresh sweep with N
   preempted runs (seeded with the Python client: start, mark_preempting,
   exit 143), then A agent threads each run ``ledger sweep next S --json`` in
   a loop until it answers empty, all released at once; then the same with one
   agent as a baseline. Checked: no run claimed twice, every run claimed,
   exactly one run.initializing per run in the stream, queue empty.

Usage:
    .venv/bin/python bench/sweeps.py            # full run (~75 s on 2 cores)
    .venv/bin/python bench/sweeps.py --quick    # smoke run (~25 s)
    .venv/bin/python bench/sweeps.py --json     # figures as one JSON object
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    Interrupts,
    ledger_command,
    machine_info,
    median,
    nearest_rank,
    progress_printer,
    verdict,
)

KILL_TARGET_S = 1.0
CRASH_SLACK_S = 2.0
PR_SET_CHILD_SUBREAPER = 36

CHILD = """import os, sys, time
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(path + ".tmp", path)
while True:
    time.sleep(3600)
"""


# --------------------------------------------------------------------------- small helpers

def stats(xs: list[float]) -> dict[str, Any]:
    return {"median": median(xs), "p90": nearest_rank(xs, 0.9), "min": min(xs, default=float("nan")),
            "max": max(xs, default=float("nan")), "n": len(xs)}


def epoch(text: str) -> float:
    """RFC 3339 (``Z`` or offset) to seconds since the epoch."""
    return datetime.fromisoformat(text).timestamp()  # Python 3.11 reads "Z"


def pid_alive(pid: int) -> bool:
    """Exists and is not a zombie (a SIGKILLed child stays a zombie until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def become_subreaper() -> bool:
    """Orphans of our descendants (a SIGKILLed wrapper's child) are reparented to us, not to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class BenchError(Exception):
    """A round that could not be measured (reported, not raised past the round)."""


class DeathWatch(threading.Thread):
    """Polls pids every ``poll`` s; records (monotonic, wall) of the first poll that finds each dead."""

    def __init__(self, pids: list[int], poll: float) -> None:
        super().__init__(daemon=True, name="death-watch")
        self.pending = set(pids)
        self.poll = poll
        self.died: dict[int, tuple[float, float]] = {}
        self.polls = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.pending and not self.stop.is_set():
            for pid in list(self.pending):
                if not pid_alive(pid):
                    self.died[pid] = (time.monotonic(), time.time())
                    self.pending.discard(pid)
            self.polls += 1
            time.sleep(self.poll)


# --------------------------------------------------------------------------- the cluster

class Cluster:
    """``ledger up`` in a temp dir, the environment a user's shell would have, and every process started."""

    def __init__(self, work: Path, timeout: float, say: Any) -> None:
        from ledger.nats.server import free_port

        self.work, self.timeout, self.say = work, timeout, say
        self.ledger = ledger_command()
        self.nats_port, self.http_port = free_port(), free_port()
        self.http = f"127.0.0.1:{self.http_port}"
        self.url = f"nats://127.0.0.1:{self.nats_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        env.update({"LEDGER_NATS_URL": self.url, "LEDGER_HTTP": self.http, "LEDGER_SPOOL": str(work / "spool.db"),
                    "PYTHONUNBUFFERED": "1"})
        self.env = env
        self.up: subprocess.Popen[bytes] | None = None
        self.up_cmd: list[str] = []
        self.wrappers: list[subprocess.Popen[bytes]] = []
        self.children: dict[int, str] = {}  # child pid -> its ready file (a marker in its command line)
        self.cli_calls = 0
        self._http: Any = None
        self._ready_seq = 0

    # --- ledger up
    def start(self) -> dict[str, Any]:
        out, err = self.work / "up.out", self.work / "up.err"
        self.up_cmd = [*self.ledger, "up", "--json", "--data-dir", str(self.work / "data"), "--nats-port",
                       str(self.nats_port), "--http", self.http, "--heartbeat-timeout", f"{self.timeout:g}"]
        with open(out, "wb") as o, open(err, "wb") as e:
            env = {k: v for k, v in self.env.items() if k != "LEDGER_NATS_URL"}  # set, it would start no NATS
            self.up = subprocess.Popen(self.up_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=env,
                                       cwd=self.work, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace")
            if text.endswith("\n"):
                return json.loads(text.splitlines()[0])  # type: ignore[no-any-return]
            if self.up.poll() is not None:
                raise BenchError(f"ledger up exited {self.up.returncode}: {err.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise BenchError("ledger up did not become ready in 60 s")

    def stop(self) -> int | None:
        up, self.up = self.up, None
        if up is None:
            return None
        code: int | None = None
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                code = up.wait(30)
            except subprocess.TimeoutExpired:
                pass
        else:
            code = up.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(up.pid, signal.SIGKILL)  # its session: the embedded nats-server, if it outlived it
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(10)
        return code

    # --- commands
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        self.cli_calls += 1
        return subprocess.run([*self.ledger, *args], check=False, env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, stdin=subprocess.DEVNULL)

    def cli_json(self, *args: str) -> Any:
        r = self.cli(*args, "--json")
        if r.returncode != 0:
            raise BenchError(f"ledger {' '.join(args)} --json: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout)

    def records(self, *, run: str | None = None, sweep: str | None = None, since: int = 1) -> list[dict[str, Any]]:
        """``ledger events tail ... --json``: each record with its payload decoded under ``payload``."""
        args = ["events", "tail", "--since-seq", str(since), "--json"]
        if run:
            args += ["--run", run]
        if sweep:
            args += ["--sweep", sweep]
        r = self.cli(*args)
        if r.returncode != 0:
            raise BenchError(f"ledger {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        out = []
        for line in r.stdout.splitlines():
            rec = json.loads(line)
            try:
                rec["payload"] = json.loads(rec["data"]) if rec.get("data") else {}
            except ValueError:
                rec["payload"] = {}
            out.append(rec)
        return out

    def api(self, path: str) -> tuple[int, Any]:
        """``GET path`` of the HTTP API, keep-alive (what ``ledger runs show`` reads, without a process start)."""
        import httpx

        if self._http is None:
            self._http = httpx.Client(base_url=f"http://{self.http}", timeout=10)
        resp = self._http.get(path)
        return resp.status_code, resp.json()

    def close_http(self) -> None:
        if self._http is not None:
            with contextlib.suppress(Exception):
                self._http.close()
            self._http = None

    # --- wrappers and their children
    def start_wrapper(self, run_id: str, ready: Path, heartbeat: float, sweep: str | None = None) -> subprocess.Popen[bytes]:
        args = [*self.ledger, "run", "--run-id", run_id, *(["--sweep", sweep] if sweep else []),
                "--heartbeat", f"{heartbeat:g}", "--", sys.executable, "-c", CHILD, str(ready)]
        with open(self.work / f"wrapper-{run_id}.log", "wb") as log:
            proc = subprocess.Popen(args, env=self.env, cwd=self.work, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.wrappers.append(proc)
        return proc

    def wrapper_command(self, sweep: str | None, heartbeat: float) -> str:
        return shlex.join(["ledger", "run", "--run-id", "ID", *(["--sweep", sweep] if sweep else []), "--heartbeat",
                           f"{heartbeat:g}", "--", "python", "-c", "CHILD", "READY_FILE"])

    def wait_ready(self, items: list[tuple[Path, subprocess.Popen[bytes]]], timeout: float = 60) -> list[int]:
        deadline = time.monotonic() + timeout
        pids: list[int | None] = [None] * len(items)
        while True:
            for i, (path, proc) in enumerate(items):
                if pids[i] is None and path.exists():
                    pid = int(path.read_text())
                    pids[i] = pid
                    self.children[pid] = str(path)
            if all(p is not None for p in pids):
                return [int(p) for p in pids if p is not None]
            for path, proc in items:
                if proc.poll() is not None and not path.exists():
                    raise BenchError(f"wrapper for {path.name} exited {proc.returncode} before its child was ready: "
                                     + self.wrapper_log(proc))
            if time.monotonic() > deadline:
                raise BenchError(f"children not ready after {timeout:g} s")
            time.sleep(0.01)

    def wrapper_log(self, proc: subprocess.Popen[bytes]) -> str:
        args = proc.args if isinstance(proc.args, list) else []
        try:
            run_id = args[args.index("--run-id") + 1]
            return (self.work / f"wrapper-{run_id}.log").read_text(errors="replace").strip()[-500:]
        except (ValueError, IndexError, OSError):
            return ""

    def wait_state(self, run_ids: list[str], state: str, timeout: float = 30) -> None:
        """Poll the API until every run is in ``state``, then confirm with ``ledger runs show --json``."""
        deadline = time.monotonic() + timeout
        waiting = list(run_ids)
        while waiting:
            status, body = self.api(f"/runs/{waiting[0]}")
            if status == 200 and body.get("state") == state:
                waiting.pop(0)
                continue
            if time.monotonic() > deadline:
                raise BenchError(f"run {waiting[0]} not {state} after {timeout:g} s (API: {status} {body})")
            time.sleep(0.02)
        for run_id in run_ids:
            shown = self.cli_json("runs", "show", run_id)
            if shown["state"] != state:
                raise BenchError(f"ledger runs show {run_id}: {shown['state']}, expected {state}")

    def kill_child(self, pid: int) -> None:
        """SIGKILL a child of ours (its own process group), checked by its marker against pid reuse; reap it."""
        marker = self.children.get(pid)
        if marker and pid_alive(pid) and marker in cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        reap(pid)

    def end_wrappers(self, procs: list[subprocess.Popen[bytes]], wait: float = 15) -> list[int | None]:
        codes: list[int | None] = []
        deadline = time.monotonic() + wait
        for p in procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes.append(None)
        return codes

    def cleanup(self) -> list[str]:
        """Every process this benchmark started, by pid: children, wrappers, ``ledger up``, any orphan left."""
        notes = []
        for pid in list(self.children):
            if pid_alive(pid) and self.children[pid] in cmdline(pid):
                notes.append(f"child {pid} still alive at cleanup: SIGKILLed")
            self.kill_child(pid)
        for p in self.wrappers:
            if p.poll() is None:
                notes.append(f"wrapper {p.pid} still running at cleanup: SIGKILLed")
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        self.close_http()
        self.stop()
        mine = {os.getpid()}
        for entry in Path("/proc").iterdir():  # orphans reparented to us (we are a subreaper): by pid
            if entry.name.isdigit() and parent_of(int(entry.name)) in mine:
                pid = int(entry.name)
                if pid_alive(pid) and str(self.work) in cmdline(pid):
                    notes.append(f"orphan {pid} ({cmdline(pid)[:80]}) SIGKILLed")
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                reap(pid)
        return notes


def reap(pid: int) -> None:
    """Collect a zombie that was reparented to us (no-op for processes that are not our children)."""
    with contextlib.suppress(ChildProcessError, OSError):
        for _ in range(100):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            if not pid_alive(pid):
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)


# --------------------------------------------------------------------------- 1. kill latency

def kill_round(c: Cluster, args: argparse.Namespace, r: int, tag: str) -> dict[str, Any]:
    sweep = f"kill-{tag}-{r}"
    c.cli_json("sweep", "create", sweep)
    run_ids = [f"{sweep}-c{i}" for i in range(args.children)]
    items = []
    for run_id in run_ids:
        ready = c.work / f"ready-{run_id}"
        items.append((ready, c.start_wrapper(run_id, ready, args.heartbeat, sweep)))
    procs = [p for _, p in items]
    try:
        ready_pids = c.wait_ready(items)
        c.wait_state(run_ids, "running")
        pids = []
        for run_id, ready_pid in zip(run_ids, ready_pids):
            started = [x for x in c.records(run=run_id) if x["payload"].get("type") == "run.started"]
            if not started:
                raise BenchError(f"no run.started for {run_id}")
            pid = int(started[-1]["payload"]["pid"])
            if pid != ready_pid:
                raise BenchError(f"{run_id}: run.started pid {pid} but the child wrote {ready_pid}")
            pids.append(pid)
        f0 = time.monotonic()
        c.cli_json("sweeps", "show", sweep)  # the floor of any CLI verb: start, imports, one GET
        floor_s = time.monotonic() - f0
        watch = DeathWatch(pids, args.poll_ms / 1000)
        watch.start()
        time.sleep(0.05)  # the watcher is polling before the clock starts
        t_mono, t_wall = time.monotonic(), time.time()
        cancel = c.cli("sweep", "cancel", sweep, "--json")
        cli_s = time.monotonic() - t_mono
        if cancel.returncode != 0:
            raise BenchError(f"ledger sweep cancel {sweep}: exit {cancel.returncode}: {cancel.stderr.strip()}")
        watch.join(10)
        watch.stop.set()
        survivors = [p for p in pids if p not in watch.died]
        codes = c.end_wrappers(procs)
        # the stream: the cancel, each run.killed, each exit
        sweep_recs = c.records(sweep=sweep)
        cancels = [x for x in sweep_recs if x["payload"].get("type") == "sweep.cancelled"]
        if len(cancels) != 1:
            raise BenchError(f"{len(cancels)} sweep.cancelled events for {sweep}")
        cancel_id, cancel_time = cancels[0]["payload"]["id"], epoch(cancels[0]["time"])
        children = []
        problems = []
        for run_id, pid, code in zip(run_ids, pids, codes):
            recs = c.records(run=run_id)
            kills = [x for x in recs if x["payload"].get("type") == "run.killed"]
            shown = c.cli_json("runs", "show", run_id)
            killed_time = epoch(kills[0]["time"]) if kills else float("nan")
            if len(kills) != 1:
                problems.append(f"{run_id}: {len(kills)} run.killed events")
            elif kills[0]["payload"].get("cause") != cancel_id or kills[0]["payload"].get("reason") != "sweep-cancelled":
                problems.append(f"{run_id}: run.killed cause {kills[0]['payload'].get('cause')} reason "
                                f"{kills[0]['payload'].get('reason')}")
            if shown["state"] != "killed":
                problems.append(f"{run_id}: state {shown['state']} after the cancel")
            if code != 137:
                problems.append(f"{run_id}: wrapper exit {code}, expected 137")
            died = watch.died.get(pid)
            if died is None:
                problems.append(f"{run_id}: child {pid} alive 10 s after the cancel")
                c.kill_child(pid)
                children.append({"run_id": run_id, "pid": pid, "dead": False})
                continue
            d_mono, d_wall = died
            children.append({
                "run_id": run_id, "pid": pid, "dead": True,
                "from_cli_s": d_mono - t_mono,
                "from_append_s": d_wall - cancel_time,
                "reactor_s": killed_time - cancel_time,
                "wrapper_s": d_wall - killed_time,
            })
        if survivors:
            problems.append(f"survivors after 10 s: {survivors}")
        return {"round": r, "sweep": sweep, "cli_s": cli_s, "cli_to_append_s": cancel_time - t_wall, "floor_s": floor_s,
                "polls": watch.polls, "children": children, "problems": problems}
    finally:
        c.end_wrappers([p for p in procs if p.poll() is None], wait=0.1)
        for pid in list(c.children):
            if c.children[pid].startswith(str(c.work / f"ready-{sweep}-")):
                c.kill_child(pid)


# --------------------------------------------------------------------------- 2. crash detection

def crash_round(c: Cluster, args: argparse.Namespace, r: int, tag: str) -> dict[str, Any]:
    run_id = f"crash-{tag}-{r}"
    ready = c.work / f"ready-{run_id}"
    proc = c.start_wrapper(run_id, ready, args.heartbeat)
    child = None
    try:
        (child,) = c.wait_ready([(ready, proc)])
        c.wait_state([run_id], "running")
        deadline = time.monotonic() + 10
        while True:  # at least one heartbeat in the views, then a phase that varies by round
            status, body = c.api(f"/runs/{run_id}")
            if status == 200 and body.get("last_heartbeat_at") and body["last_heartbeat_at"] > body["started_at"]:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{run_id}: no heartbeat in the views after 10 s")
            time.sleep(0.02)
        time.sleep(0.5 + args.heartbeat * (r % 4) / 4)
        os.kill(proc.pid, signal.SIGKILL)
        kill_wall = time.time()
        proc.wait(10)
        c.kill_child(child)  # the orphan (reparented to us): SIGKILL it at once and reap it
        poll = args.crash_poll_ms / 1000
        limit = time.monotonic() + c.timeout + 30
        polls = 0
        while True:
            status, body = c.api(f"/runs/{run_id}")
            seen_wall = time.time()
            polls += 1
            if status == 200 and body.get("state") == "crashed":
                break
            if status == 200 and body.get("state") not in ("running",):
                raise BenchError(f"{run_id}: state {body.get('state')} while waiting for crashed")
            if time.monotonic() > limit:
                raise BenchError(f"{run_id}: not crashed {c.timeout + 30:g} s after the wrapper's SIGKILL")
            time.sleep(poll)
        shown = c.cli_json("runs", "show", run_id)
        recs = c.records(run=run_id)
        crashes = [x for x in recs if x["payload"].get("type") == "run.crashed"]
        beats = [x for x in recs if x["payload"].get("type") == "run.heartbeat"]
        problems = []
        if shown["state"] != "crashed":
            problems.append(f"ledger runs show: {shown['state']}")
        if len(crashes) != 1:
            problems.append(f"{len(crashes)} run.crashed events")
        last_hb = epoch(shown["last_heartbeat_at"])
        last_beat_event = epoch(beats[-1]["payload"]["at"]) if beats else float("nan")
        if beats and abs(last_beat_event - last_hb) > 1e-3:
            problems.append(f"last_heartbeat_at {shown['last_heartbeat_at']} is not the last heartbeat's at "
                            f"{beats[-1]['payload']['at']}")
        crash = crashes[0] if crashes else None
        reason = crash["payload"].get("reason") if crash else None
        if crash and reason != "heartbeat-timeout":
            problems.append(f"run.crashed reason {reason}")
        crash_at = epoch(crash["payload"]["at"]) if crash else float("nan")
        crash_stream = epoch(crash["time"]) if crash else float("nan")
        elapsed = seen_wall - last_hb
        return {
            "round": r, "run_id": run_id, "last_heartbeat_at": shown["last_heartbeat_at"],
            "kill_after_last_beat_s": kill_wall - last_hb,
            "elapsed_s": elapsed, "delay_s": elapsed - c.timeout,
            "from_sigkill_s": seen_wall - kill_wall,
            "monitor_late_s": crash_at - last_hb - c.timeout,
            "append_s": crash_stream - crash_at,
            "visible_s": seen_wall - crash_stream,
            "polls": polls, "problems": problems,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if child is not None:
            c.kill_child(child)


# --------------------------------------------------------------------------- 3. sweep next under contention

def seed_preempted(url: str, spool: Path, sweep: str, n: int) -> list[str]:
    """``n`` preempted runs of ``sweep``, oldest first, through the Python client (start, preempting, exit 143)."""
    from ledger import Ledger

    led = Ledger.connect(url, spool=spool)
    ids = []
    try:
        for i in range(n):
            run_id = f"{sweep}-q{i:02d}"
            handle = led.start_run(run_id, sweep=sweep, heartbeat=None)
            handle.mark_preempting()
            handle.exited(143, 15)
            ids.append(run_id)
    finally:
        led.close()
    return ids


def agents_claim(c: Cluster, sweep: str, agents: int) -> dict[str, Any]:
    """``agents`` threads, each running ``ledger sweep next S --json`` until it answers empty; released at once."""
    barrier = threading.Barrier(agents + 1)
    claims: list[tuple[int, str, float, float]] = []  # agent, run id, latency, end (monotonic)
    empties: list[tuple[int, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def agent(k: int) -> None:
        barrier.wait()
        while True:
            t0 = time.monotonic()
            r = c.cli("sweep", "next", sweep, "--json")
            t1 = time.monotonic()
            with lock:
                if r.returncode == 0:
                    claims.append((k, json.loads(r.stdout)["run_id"], t1 - t0, t1))
                    continue
                if r.returncode == 1 and "empty" in r.stderr:
                    empties.append((k, t1 - t0))
                else:
                    errors.append(f"agent {k}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
                return

    threads = [threading.Thread(target=agent, args=(k,), daemon=True) for k in range(agents)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(120)
    last_claim = max((x[3] for x in claims), default=t0)
    return {"agents": agents, "claimed": [x[1] for x in claims], "per_agent": dict(Counter(x[0] for x in claims)),
            "latency_s": [x[2] for x in claims], "empty_latency_s": [x[1] for x in empties],
            "claims_s": last_claim - t0, "claims_per_s": len(claims) / (last_claim - t0) if claims else 0.0,
            "errors": errors}


def claim_round(c: Cluster, args: argparse.Namespace, r: int, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {"round": r, "problems": []}
    for label, agents in (("contended", args.claim_agents), ("baseline", 1)):
        sweep = f"claim-{tag}-{r}-{label}"
        c.cli_json("sweep", "create", sweep)
        ids = seed_preempted(c.url, c.work / "seed-spool.db", sweep, args.claim_runs)
        deadline = time.monotonic() + 30
        while True:
            status, body = c.api(f"/sweeps/{sweep}")
            if status == 200 and body.get("queue") == ids:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{sweep}: queue {body.get('queue') if status == 200 else status} after seeding")
            time.sleep(0.02)
        res = agents_claim(c, sweep, agents)
        dupes = [k for k, v in Counter(res["claimed"]).items() if v > 1]
        missing = sorted(set(ids) - set(res["claimed"]))
        inits = Counter(x["subject"].split(".")[2] for x in c.records(since=1)
                        if x["subject"].startswith(f"ledger.run.{sweep}-q") and x["subject"].endswith(".initializing"))
        twice = sorted(k for k, v in inits.items() if v != 1)
        queue = c.cli_json("sweeps", "show", sweep)["queue"]
        problems = [*res["errors"]]
        if dupes:
            problems.append(f"{label}: claimed twice: {dupes}")
        if missing:
            problems.append(f"{label}: never claimed: {missing}")
        if twice or len(inits) != len(ids):
            problems.append(f"{label}: run.initializing counts {dict(inits)}")
        if queue:
            problems.append(f"{label}: queue not empty after the agents: {queue}")
        res.update({"sweep": sweep, "duplicates": dupes, "missing": missing,
                    "initializing_events": sum(inits.values()), "queue_after": queue})
        out[label] = res
        out["problems"] += problems
    return out


# --------------------------------------------------------------------------- report

def summarize(args: argparse.Namespace, kills: list[dict[str, Any]], crashes: list[dict[str, Any]],
              claims: list[dict[str, Any]], errors: list[str], info: dict[str, Any], command: str,
              up_command: str, wall: float, cli_calls: int, cleanup: list[str]) -> dict[str, Any]:
    children = [ch for k in kills for ch in k["children"]]
    dead = [ch for ch in children if ch["dead"]]
    kill_problems = [p for k in kills for p in k["problems"]]
    kill: dict[str, Any] = {
        "rounds": len(kills), "children": len(children), "dead": len(dead),
        "from_cli_s": stats([ch["from_cli_s"] for ch in dead]),
        "from_append_s": stats([ch["from_append_s"] for ch in dead]),
        "cli_to_append_s": stats([k["cli_to_append_s"] for k in kills]),
        "reactor_s": stats([ch["reactor_s"] for ch in dead if not math.isnan(ch["reactor_s"])]),
        "wrapper_s": stats([ch["wrapper_s"] for ch in dead if not math.isnan(ch["wrapper_s"])]),
        "cli_wall_s": stats([k["cli_s"] for k in kills]),
        "cli_floor_s": stats([k["floor_s"] for k in kills]),
        "problems": kill_problems, "per_round": kills,
    }
    kill["pass"] = (bool(dead) and len(dead) == len(children) and not kill_problems
                    and kill["from_cli_s"]["median"] < KILL_TARGET_S and kill["from_append_s"]["median"] < KILL_TARGET_S
                    and len(kills) == args.rounds)
    crash_problems = [p for c in crashes for p in c["problems"]]
    crash: dict[str, Any] = {
        "rounds": len(crashes),
        "delay_s": stats([c["delay_s"] for c in crashes]),
        "elapsed_s": stats([c["elapsed_s"] for c in crashes]),
        "from_sigkill_s": stats([c["from_sigkill_s"] for c in crashes]),
        "kill_after_last_beat_s": stats([c["kill_after_last_beat_s"] for c in crashes]),
        "monitor_late_s": stats([c["monitor_late_s"] for c in crashes]),
        "append_s": stats([c["append_s"] for c in crashes]),
        "visible_s": stats([c["visible_s"] for c in crashes]),
        "problems": crash_problems, "per_round": crashes,
    }
    crash["pass"] = (bool(crashes) and len(crashes) == args.crash_rounds and not crash_problems
                     and crash["delay_s"]["max"] <= CRASH_SLACK_S)
    claim: dict[str, Any] | None = None
    if args.claim_rounds:
        claim_problems = [p for c in claims for p in c["problems"]]

        def agg(label: str) -> dict[str, Any]:
            rs = [c[label] for c in claims if label in c]
            return {"agents": rs[0]["agents"] if rs else None,
                    "claims_per_s": stats([x["claims_per_s"] for x in rs]),
                    "latency_s": stats([v for x in rs for v in x["latency_s"]]),
                    "empty_latency_s": stats([v for x in rs for v in x["empty_latency_s"]]),
                    "claimed": sum(len(x["claimed"]) for x in rs),
                    "duplicates": sum(len(x["duplicates"]) for x in rs),
                    "per_agent": [x["per_agent"] for x in rs]}
        claim = {"rounds": len(claims), "runs_per_round": args.claim_runs, "contended": agg("contended"),
                 "baseline": agg("baseline"), "problems": claim_problems, "per_round": claims}
        claim["pass"] = (len(claims) == args.claim_rounds and not claim_problems
                         and claim["contended"]["claimed"] == args.claim_runs * args.claim_rounds
                         and claim["contended"]["duplicates"] == 0)
    return {
        "command": command, "ledger_up": up_command,
        "params": {"rounds": args.rounds, "children": args.children, "heartbeat": args.heartbeat,
                   "timeout": args.timeout, "crash_rounds": args.crash_rounds, "claim_rounds": args.claim_rounds,
                   "claim_runs": args.claim_runs, "claim_agents": args.claim_agents, "poll_ms": args.poll_ms,
                   "crash_poll_ms": args.crash_poll_ms},
        "machine": info, "kill": kill, "crash": crash, "claim": claim, "errors": errors,
        "cli_calls": cli_calls, "cleanup": cleanup, "wall_seconds": wall,
        "pass": kill["pass"] and crash["pass"] and (claim is None or claim["pass"]) and not errors,
    }


def render(s: dict[str, Any]) -> str:
    m, p, k, cr, cl = s["machine"], s["params"], s["kill"], s["crash"], s["claim"]
    out: list[str] = []
    add = out.append

    def ms3(d: dict[str, Any]) -> str:
        return f"{1000 * d['median']:8.1f} {1000 * d['p90']:8.1f} {1000 * d['max']:8.1f}"

    def row(label: str, d: dict[str, Any], target: str = "", ok: bool | None = None, note: str = "") -> None:
        add(f"{label:<66}{ms3(d)}  {target:<16}{'' if ok is None else verdict(ok):<6}{note}")

    add("run-ledger sweeps benchmark: sweep-cancel kill latency, crash detection, sweep next under contention")
    add(f"command : {s['command']}")
    add(f"server  : {s['ledger_up']}")
    add(f"machine : nproc={m['nproc']} (affinity {m['affinity']}), {m['cpu']}, {m['platform']}")
    add(f"software: Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, SQLite {m['sqlite']}; "
        f"temp dir on {m['tmp_fs']}")
    add(f"load    : loadavg at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))} (other work on this machine shares its cores)")
    add(f"setup   : heartbeat timeout T = {p['timeout']:g} s, wrappers --heartbeat {p['heartbeat']:g}; kill: "
        f"{p['rounds']} rounds x {p['children']} children, death polled every {p['poll_ms']:g} ms; crash: "
        f"{p['crash_rounds']} rounds, GET /runs/ID every {p['crash_poll_ms']:g} ms"
        + (f"; claims: {p['claim_rounds']} rounds x {p['claim_runs']} preempted runs, {p['claim_agents']} agents"
           if cl else ""))
    add("")
    add(f"{'figure (ms)':<66}{'median':>8} {'p90':>8} {'max':>8}  {'target':<16}{'result':<6}")
    add("-" * 126)
    n = f"{k['dead']}/{k['children']} children over {k['rounds']} rounds"
    row("1. kill: `sweep cancel` spawned -> child dead", k["from_cli_s"], f"median < {KILL_TARGET_S * 1000:.0f}",
        k["pass"], n)
    row("   kill: cancel appended (stream time) -> child dead", k["from_append_s"],
        f"median < {KILL_TARGET_S * 1000:.0f}", k["pass"])
    row("     CLI spawned -> sweep.cancelled appended (per round)", k["cli_to_append_s"])
    row("     sweep.cancelled -> run.killed appended (projector+reactor)", k["reactor_s"])
    row("     run.killed appended -> child dead (wrapper: sub + killpg)", k["wrapper_s"])
    row("     `ledger sweep cancel` wall time, spawn to exit (per round)", k["cli_wall_s"])
    row("     CLI floor: `ledger sweeps show S --json`, spawn to exit", k["cli_floor_s"])
    row("2. crash: detection delay beyond T (seen crashed - last hb - T)", cr["delay_s"],
        f"<= {CRASH_SLACK_S * 1000:.0f} each", cr["pass"], f"{cr['rounds']} rounds")
    row("   crash: last heartbeat -> `crashed` visible", cr["elapsed_s"], f"<= T+{CRASH_SLACK_S:g} s")
    row("   crash: wrapper SIGKILL -> `crashed` visible", cr["from_sigkill_s"])
    row("     wrapper SIGKILLed after its last heartbeat by", cr["kill_after_last_beat_s"])
    row("     monitor late: run.crashed at - last hb - T (tick)", cr["monitor_late_s"])
    row("     run.crashed at -> appended (stream time)", cr["append_s"])
    row("     appended -> seen crashed by the GET poll (projector+poll)", cr["visible_s"])
    if cl:
        a, b = cl["contended"], cl["baseline"]
        add(f"{'3. claims: ' + str(a['agents']) + ' agents, `sweep next` per claim':<66}{ms3(a['latency_s'])}  "
            f"{'no run twice':<16}{verdict(cl['pass']):<6}{a['claimed']} claims, {a['duplicates']} claimed twice")
        row("   claims: 1 agent (baseline), per claim", b["latency_s"])
        row(f"   claims: `sweep next` answering empty ({a['agents']} agents)", a["empty_latency_s"])
    add("-" * 126)
    if cl:
        a, b = cl["contended"], cl["baseline"]
        add(f"claims  : {a['agents']} agents {a['claims_per_s']['median']:.1f} claims/s, 1 agent "
            f"{b['claims_per_s']['median']:.1f} claims/s (medians over {cl['rounds']} rounds of "
            f"{cl['runs_per_round']} runs; first claim to last claim); claims per agent: "
            + "; ".join(" ".join(f"{v}" for _, v in sorted(pa.items())) for pa in a["per_agent"]))
    add("kill    : per round: " + "; ".join(
        f"r{x['round']} " + "/".join(f"{1000 * ch['from_cli_s']:.0f}" if ch["dead"] else "ALIVE"
                                     for ch in x["children"]) for x in k["per_round"]) + " ms (from CLI spawn)")
    add("crash   : per round delay beyond T: "
        + ", ".join(f"r{x['round']} {1000 * x['delay_s']:.0f}" for x in cr["per_round"]) + " ms")
    add("method  : 1: clock starts just before `ledger sweep cancel S --json` is spawned (monotonic), or at the "
        "sweep.cancelled record's stream time (wall; same host); a child is dead at the first poll that finds it gone "
        "or a zombie. 2: GET /runs/ID (the API `ledger runs show` reads) polled in-process; last_heartbeat_at and "
        "the verdict confirmed with `ledger runs show --json`. Stream times from `ledger events tail --json`.")
    add("monitor : `ledger up`'s Monitor ticks when the views move, else every 0.5 s (its interval); after the last "
        "heartbeat its ticks fall at last hb + k x 0.5 s, so with T a multiple of 0.5 s a tick lands just after T; "
        "otherwise it is up to 0.5 s late (T=2.25: ~260 ms)")
    problems = k["problems"] + cr["problems"] + (cl["problems"] if cl else []) + s["errors"]
    if problems:
        add(f"PROBLEMS: {len(problems)}")
        out.extend(f"          - {x}" for x in problems[:40])
    else:
        add("checks  : every wrapper of a cancelled sweep exited 137, its run `killed` with one run.killed caused by "
            "the cancel; every SIGKILLed wrapper's run `crashed` (heartbeat-timeout) once; "
            + ("every queued run claimed exactly once (one run.initializing each), queues empty" if cl else ""))
    if s["cleanup"]:
        add("cleanup : " + "; ".join(s["cleanup"]))
    add(f"verdict : {verdict(s['pass'])}; {s['cli_calls']} ledger CLI invocations; wall {s['wall_seconds']:.0f} s")
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="kill rounds, a fresh sweep each (default 5; quick 2)")
    ap.add_argument("--children", type=int, default=None, help="wrappers per kill round (default 5; quick 3)")
    ap.add_argument("--crash-rounds", type=int, default=None, help="crash rounds (default 5; quick 2)")
    ap.add_argument("--claim-rounds", type=int, default=None, help="claim rounds, 0 to skip (default 3; quick 1)")
    ap.add_argument("--claim-runs", type=int, default=None, help="preempted runs per claim round (default 20; quick 8)")
    ap.add_argument("--claim-agents", type=int, default=4, help="concurrent agents claiming")
    ap.add_argument("--timeout", type=float, default=2.0, help="ledger up --heartbeat-timeout T (s)")
    ap.add_argument("--heartbeat", type=float, default=0.5, help="ledger run --heartbeat (s)")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="child death poll interval (ms)")
    ap.add_argument("--crash-poll-ms", type=float, default=50.0, help="GET /runs/ID poll interval while waiting for crashed")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 kill rounds of 3, 2 crash rounds, 1 claim round of 8")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    defaults = ({"rounds": 2, "children": 3, "crash_rounds": 2, "claim_rounds": 1, "claim_runs": 8} if args.quick else
                {"rounds": 5, "children": 5, "crash_rounds": 5, "claim_rounds": 3, "claim_runs": 20})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.rounds, args.children, args.crash_rounds, args.claim_agents, args.claim_runs) < 1 or args.claim_rounds < 0:
        ap.error("counts must be positive")
    if args.timeout <= args.heartbeat * 2:
        ap.error("--timeout must exceed two heartbeats")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()
    say = progress_printer(started, err)

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/sweeps.py", *argv])

    interrupts = Interrupts()
    subreaper = become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-sweeps-"))
    cluster = Cluster(work, args.timeout, say)
    tag = format(int(time.time()) % 100000, "05d")
    kills: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    errors: list[str] = []
    cleanup: list[str] = []
    try:
        info = machine_info(work)
        if not subreaper:
            say("warning: could not become a child subreaper; orphans are found by their ready files only")
        ready = cluster.start()
        say(f"ledger up: NATS {ready['nats']}, HTTP {ready['http']}, data in {work}")
        for phase, count, fn, sink in (("kill", args.rounds, kill_round, kills),
                                       ("crash", args.crash_rounds, crash_round, crashes),
                                       ("claim", args.claim_rounds, claim_round, claims)):
            for r in range(1, count + 1):
                try:
                    res = fn(cluster, args, r, tag)
                except BenchError as exc:
                    errors.append(f"{phase} round {r}: {exc}")
                    say(f"{phase} round {r}: ERROR {exc}")
                    continue
                sink.append(res)
                if phase == "kill":
                    lat = [ch["from_cli_s"] for ch in res["children"] if ch["dead"]]
                    say(f"kill round {r}: children dead {', '.join(f'{1000 * x:.0f}' for x in lat)} ms after the "
                        f"CLI spawn (cancel appended at +{1000 * res['cli_to_append_s']:.0f} ms)"
                        + (f"; PROBLEMS {res['problems']}" if res["problems"] else ""))
                elif phase == "crash":
                    say(f"crash round {r}: crashed visible {res['elapsed_s']:.3f} s after the last heartbeat "
                        f"(delay beyond T {1000 * res['delay_s']:.0f} ms)"
                        + (f"; PROBLEMS {res['problems']}" if res["problems"] else ""))
                else:
                    a, b = res["contended"], res["baseline"]
                    say(f"claim round {r}: {len(a['claimed'])} claims by {a['agents']} agents at "
                        f"{a['claims_per_s']:.1f}/s, {len(b['claimed'])} by 1 agent at {b['claims_per_s']:.1f}/s"
                        + (f"; PROBLEMS {res['problems']}" if res["problems"] else ""))
        up_command = shlex.join(["ledger", *cluster.up_cmd[len(cluster.ledger):]])
        cleanup = cluster.cleanup()
        interrupts.rearm()
        summary = summarize(args, kills, crashes, claims, errors, info, command, up_command,
                            time.perf_counter() - started, cluster.cli_calls, cleanup)
        summary["machine"]["loadavg_end"] = os.getloadavg()
        print(json.dumps(summary) if args.json else render(summary))
        return 0 if summary["pass"] else 1
    except BaseException:
        if not interrupts.interrupted:
            raise
        err.print("interrupted: cleaning up")
        return 130
    finally:
        with interrupts.cleaning_up():
            for note in cluster.cleanup():
                say(f"cleanup: {note}")
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
