"""Helpers for the web view and read-client tests: the API served over real views with a projector,
a browser (Debian's chromium through Playwright, never a downloaded one), and a small ledger of
realistic runs to look at."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from ledger.nats.server import free_port
from projections.http.api import ApiServer, ApiState, api_server
from projections.projector.projector import Projector, SeqNotifier
from tests.conftest import Started, stop_task

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass
class Served:
    url: str
    state: ApiState
    server: ApiServer


@contextlib.asynccontextmanager
async def serve(js: JetStreamContext, db_path: Path, *, token: str | None = None,
                project: bool = True) -> AsyncIterator[Served]:
    """A projector and the API (with the web view) over one views database, as ``ledger up`` runs them
    (``project=False``: the API alone, over views that then stay as they are)."""
    notifier = SeqNotifier()
    port = free_port()
    state = ApiState(db_path, notifier=notifier, js=js, http_token=token)
    server = api_server(state, "127.0.0.1", port)
    projector: asyncio.Task[int] | None = None
    if project:
        ready = Started()
        projector = asyncio.create_task(Projector(js, db_path, notifier=notifier, idle_poll=0.2).run(task_status=ready))
        await ready.wait()
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                await asyncio.sleep(0.01)  # uvicorn exposes readiness only as a flag
        yield Served(f"http://127.0.0.1:{port}", state, server)
    finally:
        server.should_exit = True
        async with asyncio.timeout(60):
            await serving
        if projector is not None:
            await stop_task(projector)


_ids = itertools.count(1)


def _id() -> str:
    return f"demo{next(_ids):07d}"


async def seed_demo(publisher: Publisher, now: datetime | None = None) -> int:
    """A sweep of runs in every kind of state, times near ``now``; returns the last sequence."""
    now = now or datetime.now(timezone.utc)

    def t(minutes: float) -> datetime:
        return now - timedelta(minutes=minutes)

    out: list[Any] = [ev.SweepCreated(id=_id(), at=t(95), sweep_id="lr-sweep", config={"lr": [1e-4, 3e-4, 1e-3]})]
    host = itertools.cycle(["gpu-a1", "gpu-a2", "gpu-b1"])
    plans = [  # run, fate, began (minutes ago), lasted (minutes)
        ("lr-1e-4-s0", "finished", 90, 50), ("lr-1e-4-s1", "failed", 85, 20), ("lr-3e-4-s0", "running", 80, 80),
        ("lr-3e-4-s1", "preempted", 75, 30), ("lr-1e-3-s0", "resumed", 70, 70), ("lr-1e-3-s1", "crashed", 60, 25),
        ("lr-1e-3-s2", "running", 20, 20), ("lr-1e-3-s3", "killed", 15, 6),
    ]
    for run_id, fate, began, lasted in plans:
        out.append(ev.RunStarted(id=_id(), at=t(began), run_id=run_id, attempt=1, sweep_id="lr-sweep", host=next(host),
                                 pid=4100 + len(out), command=["python", "train.py", f"--run={run_id}"]))
        attempt = 1
        for i in range(1, 31):
            when = began - lasted * i / 30
            if fate == "crashed" and i > 12:
                break  # the process hung: heartbeats stop, the monitor crashes it later
            if fate == "resumed" and 12 < i < 18:
                continue  # preempted: no heartbeats until the resume
            if fate == "resumed" and i == 18:
                stop = began - lasted * 12.5 / 30
                out.append(ev.RunPreempting(id=_id(), at=t(stop), run_id=run_id, attempt=1))
                out.append(ev.RunExited(id=_id(), at=t(stop - 0.3), run_id=run_id, attempt=1, exit_code=143, signal=15))
                attempt = 2
                out.append(ev.RunStarted(id=_id(), at=t(when + 0.4), run_id=run_id, attempt=2, sweep_id="lr-sweep",
                                         resume="must", host="gpu-b1", pid=7310,
                                         command=["python", "train.py", f"--run={run_id}", "--resume"]))
            if i < 30 or fate in ("running", "resumed"):
                out.append(ev.RunHeartbeat(id=_id(), at=t(when), run_id=run_id, attempt=attempt, step=i * 50,
                                           progress=round(i / 30 * (0.85 if fate != "finished" else 1.0), 3)))
        end = t(began - lasted)
        if fate == "finished":
            out.append(ev.RunExited(id=_id(), at=end, run_id=run_id, attempt=1, exit_code=0))
        elif fate == "failed":
            out.append(ev.RunExited(id=_id(), at=end, run_id=run_id, attempt=1, exit_code=1))
        elif fate == "preempted":
            out.append(ev.RunPreempting(id=_id(), at=end, run_id=run_id, attempt=1))
            out.append(ev.RunExited(id=_id(), at=end + timedelta(seconds=20), run_id=run_id, attempt=1,
                                    exit_code=143, signal=15))
        elif fate == "crashed":
            out.append(ev.RunCrashed(id=_id(), at=t(began - lasted * 12 / 30 - 5), run_id=run_id, attempt=1,
                                     reason="heartbeat-timeout", last_heartbeat_at=t(began - lasted * 12 / 30)))
        elif fate == "killed":
            out.append(ev.RunKilled(id=_id(), at=end, run_id=run_id, attempt=1, reason="killed by user"))
    seq = 0
    for event in out:
        seq = await publisher.publish(event)
    return seq
