"""The read verbs of issue 11 as a user runs them: ``runs list --sort/--since/--watch``,
``ledger quarantine``, and the HTTP token of ``ledger up --http-token``."""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ledger.nats.server import free_port
from tests.jobs import LEDGER, Up, ledger

HISTORICAL = str(10 * 365 * 86400)


def event(run_id: str, minutes_ago: float, kind: str = "run.started", **extra: object) -> str:
    at = (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")
    event_id = f"{run_id}-{kind.replace('.', '_')}-{int(minutes_ago * 60)}"
    return json.dumps({"type": kind, "id": event_id, "at": at, "run_id": run_id, **extra})


@pytest.fixture
def up_env(cli_env: dict[str, str], tmp_path: Path, js: object) -> Iterator[dict[str, str]]:
    """``ledger up --http-token`` on the test's nats-server; the env a user has (token included)."""
    env = {**cli_env, "LEDGER_HTTP": f"127.0.0.1:{free_port()}", "LEDGER_DATA_DIR": str(tmp_path / "data"),
           "LEDGER_HEARTBEAT_TIMEOUT": HISTORICAL, "LEDGER_HTTP_TOKEN": "tok-1"}
    running = Up([], env)
    try:
        yield env
    finally:
        if running.proc.poll() is None:
            running.stop()


def read_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return proc.stdout.readline()
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    raise AssertionError("no line within the deadline")


class TestReadVerbs:
    def test_token_sort_since_and_quarantine(self, up_env: dict[str, str]) -> None:
        """With a token, read verbs work from LEDGER_HTTP_TOKEN and fail in one line without it; runs list
        sorts newest first and filters by --since; quarantine lists what was kept aside."""
        for line in (event("old", 600), event("mid", 30), event("new", 5), event("new", 4, "run.exited", exit_code=1)):
            assert 0 == ledger("emit", line, env=up_env).returncode
        deadline = time.monotonic() + 60
        while True:
            listed = json.loads(ledger("runs", "list", "--sort", "started", "--json", env=up_env).stdout)
            if [r["state"] for r in listed["runs"]][:1] == ["failed"] or time.monotonic() > deadline:
                break
        assert ["new", "mid", "old"] == [r["run_id"] for r in listed["runs"]]
        recent = json.loads(ledger("runs", "list", "--sort", "started", "--since", "1h", "--json", env=up_env).stdout)
        assert ["new", "mid"] == [r["run_id"] for r in recent["runs"]]
        no_token = {k: v for k, v in up_env.items() if k != "LEDGER_HTTP_TOKEN"}
        refused = ledger("runs", "list", env=no_token)
        assert 1 == refused.returncode and "token" in refused.stderr and "Traceback" not in refused.stderr
        assert 2 == ledger("runs", "list", "--since", "yesterday-ish", env=up_env).returncode  # a usage error
        empty = ledger("quarantine", env=up_env)
        assert 0 == empty.returncode and "nothing quarantined" in empty.stdout

    def test_watch_prints_again_when_the_ledger_moves(self, up_env: dict[str, str]) -> None:
        """runs list --watch --json prints the runs, then again once a change reaches the views."""
        assert 0 == ledger("emit", event("w1", 5), env=up_env).returncode
        proc = subprocess.Popen([*LEDGER, "runs", "list", "--watch", "--json", "--sort", "started"], env=up_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = json.loads(read_line(proc))
            while [r["run_id"] for r in first["runs"]] != ["w1"]:
                first = json.loads(read_line(proc))
            ledger("emit", event("w1", 1, "run.exited", exit_code=0), env=up_env)
            update = json.loads(read_line(proc))
            while update["runs"][0]["state"] != "finished":
                update = json.loads(read_line(proc))
            assert update["seq"] > first["seq"]
        finally:
            proc.terminate()
            proc.wait(60)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
