#!/usr/bin/env python
"""Web view benchmark: how long a state change takes to show on an open runs page.

Starts a real ``ledger up`` (embedded NATS on free loopback ports, a fresh
data dir), opens the runs page in Debian's chromium (Playwright, no browser
download) and waits until the page follows the ledger live. Then, ``--reps``
times: appends ``run.exited`` (exit code 1) for one running run and measures
the time from the append's acknowledgement until that run's badge on the open
page reads ``failed`` (no reload: the page's server-sent-events connection
and its in-place refresh). Prints the median and the maximum.

Target (issue 11): within 2 s. The ceiling beside it: the projector's own
part, the time from the same acknowledgement until ``/runs/ID?min_seq=SEQ``
answers (the views hold the change), measured in the same rep.

Usage:
    .venv/bin/python bench/web_live.py            # 20 reps
    .venv/bin/python bench/web_live.py --reps 50 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from common import machine_info, median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger.core import events as ev  # noqa: E402
from ledger.nats.publisher import Publisher  # noqa: E402
from ledger.nats.server import free_port  # noqa: E402
from ledger.nats.stream import connect  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TARGET_S = 2.0


def now() -> datetime:
    return datetime.now(timezone.utc)


async def bench(reps: int) -> dict[str, float]:
    from playwright.async_api import async_playwright

    nats_port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = str(Path(sys.executable).parent / "ledger")
        proc = subprocess.Popen([ledger, "up", "--json", "--data-dir", f"{tmp}/data", "--nats-port", str(nats_port),
                                 "--http", f"127.0.0.1:{http_port}"], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            base = info["http"]
            nc = await connect(info["nats"])
            publisher = Publisher(nc)
            ids = [f"live{i:04d}" for i in range(reps)]
            seq = 0
            for run_id in ids:
                seq = await publisher.publish(ev.RunStarted(id=f"s-{run_id}", at=now(), run_id=run_id, attempt=1))
            with urllib.request.urlopen(f"{base}/runs?min_seq={seq}&timeout=60", timeout=90):
                pass
            page_s: list[float] = []
            views_s: list[float] = []
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = await browser.new_page()
                await page.goto(f"{base}/?limit=100")
                await page.locator("body[data-live=on]").wait_for(state="attached", timeout=60_000)
                for run_id in ids:
                    await page.locator(f'tr[data-run="{run_id}"] .badge').wait_for(timeout=60_000)
                    seq = await publisher.publish(ev.RunExited(id=f"x-{run_id}", at=now(), run_id=run_id,
                                                               attempt=1, exit_code=1))
                    acked = time.perf_counter()
                    shown = asyncio.create_task(page.wait_for_function(
                        "id => document.querySelector(`tr[data-run=\"${id}\"] .badge`)?.textContent === 'failed'",
                        arg=run_id, polling="raf", timeout=60_000))
                    await asyncio.to_thread(_read, f"{base}/runs/{run_id}?min_seq={seq}&timeout=60")
                    views_s.append(time.perf_counter() - acked)
                    await shown
                    page_s.append(time.perf_counter() - acked)
                await browser.close()
            await publisher.close()
            await nc.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    return {"page_median_s": median(page_s), "page_max_s": max(page_s),
            "views_median_s": median(views_s), "views_max_s": max(views_s), "reps": reps}


def _read(url: str) -> None:
    with urllib.request.urlopen(url, timeout=90) as resp:
        resp.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    figures = asyncio.run(bench(args.reps))
    if args.json:
        print(json.dumps({**figures, "machine": machine_info(Path(tempfile.gettempdir()))}))
        return 0
    print(f"machine: {machine_info(Path(tempfile.gettempdir()))}")
    print(f"change -> shown on the open runs page: median {figures['page_median_s'] * 1000:.0f} ms, "
          f"max {figures['page_max_s'] * 1000:.0f} ms over {args.reps} reps (target < {TARGET_S:g} s)")
    print(f"change -> in the views (min_seq read), same reps: median {figures['views_median_s'] * 1000:.0f} ms, "
          f"max {figures['views_max_s'] * 1000:.0f} ms")
    print(f"page / views (median): {figures['page_median_s'] / max(figures['views_median_s'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
