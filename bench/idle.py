#!/usr/bin/env python
"""Idle CPU of ``ledger up`` with 1k, 10k and 100k live runs (issue 12: flat in the count, < 2% of a core at 100k).

For each count: starts its own nats-server (temp dir, free port), then the
real ``ledger up --nats-url ...`` (so the figure is the ledger's process
alone, not the server's), publishes that many ``run.started`` events (runs
``running``, each with a fresh ``last_seen_at``), waits until ``/health``
says the views hold them all, lets it settle, then reads the process's CPU
time (user + sys, ``/proc/PID/stat``) over ``--windows`` windows of
``--window`` seconds with no event arriving. Prints the median and the max
of the windows as percent of one core.

The heartbeat timeout is set to an hour so that no crash deadline falls
inside the measurement (the monitor's idle cost does not depend on the
timeout: it sleeps until the earliest deadline; at a deadline it looks up
the expired runs through an index).

Usage:
    .venv/bin/python bench/idle.py                      # 1k, 10k, 100k (~3 min)
    .venv/bin/python bench/idle.py --counts 1000 10000 --windows 5 --window 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import median

LEDGER = str(Path(sys.executable).parent / "ledger")
TICKS = os.sysconf("SC_CLK_TCK")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    out["LEDGER_HEARTBEAT_TIMEOUT"] = "3600"
    return out


def health(http: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{http}/health", timeout=10) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except OSError:
        return {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


async def publish_starts(url: str, n: int) -> None:
    """``n`` runs started now: one ``run.started`` each, acknowledged."""
    from datetime import datetime, timezone

    import nats

    from ledger.core.events import RunStarted
    from ledger.nats.publisher import Publisher

    nc = await nats.connect(url)
    publisher = Publisher(nc)
    try:
        now = datetime.now(timezone.utc)
        futures = [await publisher.submit(RunStarted(id=f"idle-{i}", at=now, run_id=f"idle-{i}")) for i in range(n)]
        for future in futures:
            await publisher.wait(future)
    finally:
        await publisher.close()
        await nc.drain()


def measure(work: Path, n: int, windows: int, window: float, say: Any) -> list[float]:
    from ledger.nats.server import EmbeddedNats, free_port

    nats_server = EmbeddedNats(work / f"nats-{n}", port=free_port())
    nats_server.start()
    up = subprocess.Popen([LEDGER, "up", "--json", "--nats-url", nats_server.url, "--data-dir", str(work / f"up-{n}"),
                           "--http", f"127.0.0.1:{free_port()}"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    try:
        assert up.stdout is not None
        ready, _, _ = select.select([up.stdout], [], [], 60)
        assert ready, "ledger up did not start"
        http = json.loads(up.stdout.readline())["http"]
        began = time.perf_counter()
        asyncio.run(publish_starts(nats_server.url, n))
        deadline = time.monotonic() + 600
        while health(http).get("last_seq") != n:
            if time.monotonic() > deadline:
                raise SystemExit(f"the views did not reach {n} events")
            time.sleep(0.2)
        say(f"{n} runs running in the views after {time.perf_counter() - began:.1f} s; settling")
        time.sleep(3.0)
        shares = []
        for _ in range(windows):
            cpu0, t0 = cpu_seconds(up.pid), time.perf_counter()
            time.sleep(window)
            shares.append(100.0 * (cpu_seconds(up.pid) - cpu0) / (time.perf_counter() - t0))
        return shares
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        nats_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window", type=float, default=4.0, help="seconds per window")
    args = parser.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            results[n] = measure(Path(tmp), n, args.windows, args.window, say)
    print(f"ledger up idle CPU, % of one core ({args.windows} windows of {args.window:g} s, no event arriving):")
    for n, shares in results.items():
        print(f"  {n:>7} live runs: median {median(shares):5.2f} %   max {max(shares):5.2f} %")
    worst = max(median(s) for s in results.values())
    print(f"target < 2 % at every count: {'PASS' if worst < 2.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
