"""Operating one node (CONTRACT section 5) as a user meets it: the real ``ledger`` command,
real nats-server processes killed and started again, a real full disk."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import connect
from tests.factory import started as started_event
from tests.jobs import ready_json

LEDGER = str(Path(sys.executable).parent / "ledger")
HISTORICAL = str(10 * 365 * 86400)
"""A heartbeat timeout long enough that the monitor crashes nothing in these tests."""
DEADLINE_S = 60.0
"""How long a test waits for a condition (the machine may be slow and busy)."""


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell environment: no LEDGER_* settings but those given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_HEARTBEAT_TIMEOUT=HISTORICAL, PYTHONUNBUFFERED="1", **extra)
    return env


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something true; its value, or an AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def ledger(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LEDGER, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class LedgerUp:
    """A ``ledger up --json`` process as a user starts it; its stderr is collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], *, new_session: bool = False) -> None:
        self.proc = subprocess.Popen([LEDGER, "up", "--json", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=new_session)
        self.stderr = ""
        self.nats_pids: set[int] = set()
        self.info = self._ready()
        self.http = str(self.info["http"])
        self.nats_pids |= set(self.nats_children())

    def _ready(self) -> dict[str, Any]:
        return ready_json(self.proc, DEADLINE_S)

    def read_stderr(self) -> str:
        """What ``ledger up`` wrote to stderr so far (read without blocking)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.stderr += chunk.decode(errors="replace")
        return self.stderr

    def nats_children(self) -> list[int]:
        pids = [p for p in children_of(self.proc.pid) if alive(p)]
        self.nats_pids |= set(pids)
        return pids

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{self.http}/health", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self, sig: int = signal.SIGINT, *, group: bool = False) -> int:
        """Send ``sig`` (to the whole process group with ``group``) and wait for the exit code."""
        if group:
            os.killpg(os.getpgid(self.proc.pid), sig)
        else:
            self.proc.send_signal(sig)
        code = self.proc.wait(DEADLINE_S)
        self.read_stderr()
        return code

    def kill(self) -> None:
        """Teardown: nothing this ``ledger up`` started may outlive the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.nats_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def started() -> Iterator[Callable[..., LedgerUp]]:
    """Start ``ledger up`` processes; every one (and its nats-server) is gone after the test."""
    running: list[LedgerUp] = []

    def start(args: list[str], env: dict[str, str], **kw: Any) -> LedgerUp:
        up = LedgerUp(args, env, **kw)
        running.append(up)
        return up

    yield start
    for up in running:
        up.kill()


def event(kind: str, n: int, run_id: str, **fields: Any) -> str:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return json.dumps({"type": kind, "id": f"{kind.replace('.', '_')}-{run_id}-{n}", "at": now, "run_id": run_id, **fields})


def emit(env: dict[str, str], payload: str) -> int:
    result = ledger("emit", payload, env=env)
    assert 0 == result.returncode, result.stderr
    return int(result.stdout.strip())


def run_ids(env: dict[str, str]) -> set[str]:
    """Every run id the views hold, through ``ledger runs list`` pages."""
    out: set[str] = set()
    after: list[str] = []
    while True:
        result = ledger("runs", "list", "--json", "--limit", "500", *after, env=env)
        assert 0 == result.returncode, result.stderr
        page = json.loads(result.stdout)
        out |= {r["run_id"] for r in page["runs"]}
        if not page.get("next"):
            return out
        after = ["--after", page["next"]]


class TestDataDirLock:
    def test_second_up_on_same_data_dir_refused(self, started: Callable[..., LedgerUp], tmp_path: Path) -> None:
        """A second `ledger up` on a data dir in use exits at once with one line naming the owner; the first goes on."""
        data = tmp_path / "data"
        first = started(["--data-dir", str(data), "--nats-port", str(free_port()), "--http", f"127.0.0.1:{free_port()}"],
                        user_env())
        began = time.monotonic()
        second = ledger("up", "--data-dir", str(data), "--nats-port", str(free_port()),
                        "--http", f"127.0.0.1:{free_port()}", env=user_env())
        assert second.returncode != 0 and time.monotonic() - began < 30
        lines = second.stderr.strip().splitlines()
        assert 1 == len(lines), second.stderr
        assert f"data dir {data} is in use by another ledger up (pid {first.proc.pid})" in lines[0]
        assert first.proc.poll() is None
        env = user_env(LEDGER_NATS_URL=str(first.info["nats"]), LEDGER_HTTP=first.http.removeprefix("http://"))
        seq = emit(env, event("run.started", 1, "r1"))
        wait_for(lambda: first.health() == (200, {"status": "ok", "last_seq": seq, "stream_last_seq": seq, "lag": 0}),
                 "the first ledger up to apply the new event")
        assert "Stream state outdated" not in (data / "nats" / "nats-server.log").read_text()
        assert 0 == first.stop()


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
    def test_signal_to_process_group_exits_0(self, started: Callable[..., LedgerUp], tmp_path: Path, sig: int) -> None:
        """Ctrl-C (the signal to the whole process group) stops `ledger up` and its nats-server: exit 0, no traceback."""
        up = started(["--data-dir", str(tmp_path / "data"), "--nats-port", str(free_port()),
                      "--http", f"127.0.0.1:{free_port()}"], user_env(), new_session=True)
        nats = up.nats_children()
        assert 1 == len(nats)
        assert 0 == up.stop(sig, group=True)
        assert "Traceback" not in up.stderr, up.stderr
        assert not alive(nats[0])


class TestEmbeddedSupervision:
    def test_killed_nats_server_is_restarted(self, started: Callable[..., LedgerUp], tmp_path: Path) -> None:
        """SIGKILL of the embedded nats-server: `ledger up` starts it again on the same port and store,
        and a new `ledger emit` lands and is visible."""
        nats_port = free_port()
        up = started(["--data-dir", str(tmp_path / "data"), "--nats-port", str(nats_port),
                      "--http", f"127.0.0.1:{free_port()}"], user_env())
        env = user_env(LEDGER_NATS_URL=f"nats://127.0.0.1:{nats_port}", LEDGER_HTTP=up.http.removeprefix("http://"))
        assert 1 == emit(env, event("run.started", 1, "before"))
        [first] = up.nats_children()
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: [p for p in up.nats_children() if p != first], "a new nats-server child")[0]
        assert "nats-server exited" in wait_for(lambda: "running again" in up.read_stderr() and up.stderr,
                                                "the restart to be logged")
        assert 2 == wait_for(lambda: ledger("emit", event("run.started", 2, "after"), env=env).stdout.strip() == "2" and 2,
                             "an emit to land on the restarted server")
        wait_for(lambda: run_ids(env) == {"before", "after"}, "the new run in the views")
        as_of = ledger("runs", "show", "before", "--as-of-seq", "1", "--json", env=env)  # the API reads the stream
        assert (0, "running") == (as_of.returncode, json.loads(as_of.stdout or "{}").get("state")), as_of.stderr
        assert (200, "ok") == (lambda h: (h[0], h[1]["status"]))(up.health())
        assert 0 == up.stop()
        assert not alive(second) and "Traceback" not in up.stderr


class TestExternalNatsRestart:
    def test_sigkilled_nats_mid_job_views_catch_up(self, started: Callable[..., LedgerUp], tmp_path: Path) -> None:
        """NATS SIGKILLed and started again while a job heartbeats: /health goes degraded then ok,
        the views catch up, nothing is lost or doubled (`ledger verify` holds)."""
        nats = EmbeddedNats(tmp_path / "nats", port=free_port())
        nats.start()
        try:
            data = tmp_path / "data"
            up = started(["--nats-url", nats.url, "--data-dir", str(data), "--http", f"127.0.0.1:{free_port()}"],
                         user_env())
            env = user_env(LEDGER_NATS_URL=nats.url, LEDGER_HTTP=up.http.removeprefix("http://"),
                           LEDGER_DATA_DIR=str(data), LEDGER_SPOOL=str(tmp_path / "spool.db"))
            gate = tmp_path / "go"
            job = subprocess.Popen(
                [LEDGER, "run", "--run-id", "job1", "--heartbeat", "0.1", "--drain", "30", "--",
                 sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                before = wait_for(lambda: (h := up.health()[1])["last_seq"] >= 5 and h["last_seq"], "heartbeats applied")
                nats.process.kill()  # type: ignore[union-attr]
                nats.process.wait()  # type: ignore[union-attr]
                _, body = wait_for(lambda: (h := up.health())[0] == 503 and h, "/health degraded")
                assert ("degraded", True) == (body["status"], "NATS" in body["reason"])
                nats.start()
                wait_for(lambda: (h := up.health()[1])["status"] == "ok" and h["last_seq"] > before,
                         "/health ok and the views moving again")
                gate.touch()
                _, err = job.communicate(timeout=DEADLINE_S)
                assert 0 == job.returncode, err
            finally:
                gate.touch()
                if job.poll() is None:
                    os.killpg(job.pid, signal.SIGKILL)  # the job and its child
                job.communicate(timeout=DEADLINE_S)
            state = wait_for(lambda: (r := ledger("runs", "show", "job1", "--json", env=env)).returncode == 0
                             and json.loads(r.stdout)["state"] == "finished" and json.loads(r.stdout), "job1 finished")
            code, health = wait_for(lambda: (h := up.health())[1]["lag"] == 0 and h, "the views to catch up")
            assert (200, "ok") == (code, health["status"])
            exported = ledger("events", "export", env=env)
            assert 0 == exported.returncode, exported.stderr
            lines = [json.loads(line) for line in exported.stdout.splitlines()]
            ids = [json.loads(m["data"])["id"] for m in lines]
            assert len(ids) == len(set(ids)) == health["stream_last_seq"] == health["last_seq"]  # none lost, none doubled
            assert state["seq"] == max(m["seq"] for m in lines if m["subject"].startswith("ledger.run.job1."))
            verified = ledger("verify", env=env)
            assert 0 == verified.returncode, verified.stdout + verified.stderr
            assert 0 == up.stop()
            assert "Traceback" not in up.stderr, up.stderr
        finally:
            nats.stop()


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem under it is full."""
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class TestFullDisk:
    def test_full_disk_degrades_then_catches_up(self, started: Callable[..., LedgerUp], small_disk: Path,
                                                nats_url: str, js: object) -> None:
        """Views on a disk that fills up: `ledger up` keeps serving reads, /health says disk full,
        and once space is back the views catch up and `ledger verify` holds."""
        data = small_disk / "data"
        up = started(["--nats-url", nats_url, "--data-dir", str(data), "--http", f"127.0.0.1:{free_port()}"], user_env())
        env = user_env(LEDGER_NATS_URL=nats_url, LEDGER_HTTP=up.http.removeprefix("http://"), LEDGER_DATA_DIR=str(data))
        emit(env, event("run.started", 0, "early"))
        wait_for(lambda: up.health()[1]["last_seq"] == 1, "the first event applied")
        filler = small_disk / "filler"
        fill(filler)
        last = publish(nats_url, [started_event(f"r{i:05d}", host="gpu-" + "x" * 200) for i in range(4000)])
        _, body = wait_for(lambda: (h := up.health())[0] == 503 and h, "/health degraded by the full disk")
        assert ("degraded", True) == (body["status"], "disk full" in body["reason"])
        shown = ledger("runs", "show", "early", "--json", env=env)
        assert (0, "running") == (shown.returncode, json.loads(shown.stdout)["state"])  # reads go on
        assert up.proc.poll() is None and "disk full" in up.read_stderr()
        filler.unlink()
        wait_for(lambda: up.health() == (200, {"status": "ok", "last_seq": last, "stream_last_seq": last, "lag": 0}),
                 "the views to catch up once there is space")
        assert len(run_ids(env)) == 4001
        verified = ledger("verify", env=env)
        assert 0 == verified.returncode, verified.stdout + verified.stderr
        assert 0 == up.stop()
        assert "Traceback" not in up.stderr, up.stderr


def publish(url: str, events: list[ev.AnyEvent]) -> int:
    """Publish ``events`` (pipelined) and return the last stream sequence."""

    async def go() -> int:
        nc = await connect(url)
        try:
            publisher = Publisher(nc)
            futures = [await publisher.submit(e) for e in events]
            seqs = [await publisher.wait(f) for f in futures]
            await publisher.close()
            return max(seqs)
        finally:
            await nc.close()

    return asyncio.run(go())
