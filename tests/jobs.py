"""Helpers for tests of the job side: reading a run's events back from the stream."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.nats.entity import fold_subject
from ledger.nats.stream import PullReader, stream_last_seq

LEDGER = [sys.executable, "-m", "ledger.cli"]


async def run_events(js: JetStreamContext, run_id: str) -> list[ev.AnyEvent]:
    """Every valid event of a run, in stream order."""
    last = await stream_last_seq(js)
    if last == 0:
        return []
    reader = PullReader(js, 1, subject=f"ledger.run.{run_id}.>")
    await reader.start()
    out: list[ev.AnyEvent] = []
    try:
        while True:
            batch = await reader.next_batch(1000, 0.5)
            if not batch:
                return out
            out += [ev.decode_event(m.subject, m.data) for m in batch]
            if batch[-1].pending == 0:
                return out
    finally:
        await reader.stop()


async def run_state(js: JetStreamContext, run_id: str):  # type: ignore[no-untyped-def]
    views, _ = await fold_subject(js, f"ledger.run.{run_id}.>")
    return views.runs.get(run_id)


def types(events: list[ev.AnyEvent]) -> list[str]:
    return [ev.tag_of(e) for e in events]


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def job_env(nats_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update({"LEDGER_NATS_URL": nats_url, "LEDGER_SPOOL": str(tmp_path / "spool.db"), "PYTHONUNBUFFERED": "1"})
    return env


def ledger_run(args: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([*LEDGER, "run", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # type: ignore[call-overload]


def ledger(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEDGER, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)


def ready_json(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The JSON ready line ``ledger up --json`` prints, within a generous deadline (a clear failure,
    with its stderr, if it exits first)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)  # type: ignore[no-any-return]
        if proc.poll() is not None:
            raise AssertionError(f"ledger up exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError("ledger up did not become ready")


class Up:
    """A running ``ledger up`` process and what it printed when ready."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*LEDGER, "up", "--json", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.info = self._ready()

    def _ready(self, timeout: float = 60) -> dict[str, Any]:
        return ready_json(self.proc, timeout)

    def stop(self, sig: int = signal.SIGINT) -> int:
        from tests.conftest import kill_tree

        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)  # its nats-server too: nothing outlives the test
            raise
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return code
