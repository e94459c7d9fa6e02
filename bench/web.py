#!/usr/bin/env python
"""Web view benchmark: the runs page over 100k runs, server time, beside raw sqlite3.

Builds a views database of ``--runs`` runs (default 100,000) in a temp dir,
written straight with the projector's schema and row codecs (no stream
needed: the page reads only the views), spread over 50 sweeps and every
state. Then, in this process, through the real Litestar app (ASGI, no
network, so the figure is server time: routing, query, rendering, encoding):

- ``GET /`` (the first page: 100 newest runs and the count), and with a
  state filter, a sweep filter, an id prefix, and ten pages deep;
- ``GET /runs?sort=started`` (the same page as JSON);
- raw: stdlib ``sqlite3`` running the page's two queries (the same SQL:
  page + count), fetching rows, no decoding: the floor under the page.

Each figure is the median of ``--reps`` requests (after 3 warm-ups).
Target: the first page under 200 ms (median).

Usage:
    .venv/bin/python bench/web.py                 # 100k runs
    .venv/bin/python bench/web.py --runs 20000 --reps 50
    .venv/bin/python bench/web.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common import machine_info, median, verdict

TARGET_MS = 200.0


def build_views(path: Path, n_runs: int) -> None:
    """A views database of ``n_runs`` runs and their sweeps, with the projector's schema."""
    from ledger.core.machine import RUN_STATES, Run, Sweep
    from projections.views.schema import (
        SCHEMA,
        UPSERT_RUNS,
        UPSERT_SWEEPS,
        json_param,
        run_row,
        sweep_row,
    )

    rng = random.Random(11)
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    sweeps = [Sweep(sweep_id=f"sweep-{i:02d}", created_at=t0, updated_at=t0, seq=i + 1) for i in range(50)]
    db.execute(UPSERT_SWEEPS, json_param(sweep_row(s) for s in sweeps))
    batch = []
    for i in range(n_runs):
        started = t0 + timedelta(seconds=i * 20 + rng.random())
        state = rng.choice(RUN_STATES)
        batch.append(run_row(Run(
            run_id=f"run-{rng.getrandbits(40):010x}", sweep_id=sweeps[i % 50].sweep_id, state=state,
            attempt=1 + (i % 7 == 0), created_at=started, started_at=started,
            ended_at=started + timedelta(minutes=30) if state in ("finished", "failed", "killed") else None,
            last_heartbeat_at=started + timedelta(minutes=20), step=i % 5000, progress=rng.random(),
            seq=100 + i)))
        if len(batch) == 5000:
            db.execute(UPSERT_RUNS, json_param(batch))
            batch = []
    if batch:
        db.execute(UPSERT_RUNS, json_param(batch))
    db.execute("UPDATE checkpoint SET last_seq = ?", (100 + n_runs,))
    db.commit()
    db.close()


async def measure_app(path: Path, reps: int) -> dict[str, float]:
    import logging

    import httpx

    from projections.http.api import ApiState, create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)
    state = ApiState(path)
    app = create_app(state)
    await state.open()
    out: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            deep = "/"
            for _ in range(10):  # follow "older" ten pages down
                page = (await client.get(deep)).text
                deep = page.split('rel="next" href="')[1].split('"')[0].replace("&amp;", "&")
            cases = {
                "runs page, first page": "/",
                "runs page, state=running": "/?state=running",
                "runs page, sweep=sweep-07": "/?sweep=sweep-07",
                "runs page, id prefix run-a": "/?prefix=run-a",
                "runs page, 10 pages deep": deep,
                "GET /runs?sort=started (JSON)": "/runs?sort=started",
            }
            times: dict[str, list[float]] = {name: [] for name in [*cases, RAW]}
            raw = raw_page(path)
            for i in range(reps + 3):  # interleaved: a busy machine's slow moments hit every case alike
                for name, url in cases.items():
                    start = time.perf_counter()
                    resp = await client.get(url)
                    elapsed = time.perf_counter() - start
                    assert resp.status_code == 200, (url, resp.status_code, resp.text[:200])
                    if i >= 3:
                        times[name].append(elapsed * 1000)
                elapsed = raw()
                if i >= 3:
                    times[RAW].append(elapsed * 1000)
            out = {name: median(xs) for name, xs in times.items()}
    finally:
        await state.close()
    return out


RAW = "raw sqlite3, same page + count"


def raw_page(path: Path) -> Callable[[], float]:
    """The page's two queries (the same SQL) in stdlib sqlite3, fetching rows: seconds per call."""
    from projections.views.listing import _KEY, page_sql

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    page = page_sql([], f"{_KEY} DESC, run_id DESC")

    def once() -> float:
        start = time.perf_counter()
        db.execute(page, (101,)).fetchall()
        db.execute("SELECT count(*) FROM runs").fetchone()
        return time.perf_counter() - start

    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        path = Path(tmp) / "views.db"
        start = time.perf_counter()
        build_views(path, args.runs)
        print(f"built {args.runs:,} runs in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        figures = asyncio.run(measure_app(path, args.reps))
    first = figures["runs page, first page"]
    if args.json:
        print(json.dumps({"runs": args.runs, "reps": args.reps, "median_ms": figures,
                          "target_ms": TARGET_MS, "pass": first < TARGET_MS,
                          "machine": machine_info(Path(tempfile.gettempdir()))}))
        return 0
    print(f"web view over {args.runs:,} runs, median of {args.reps} requests, server time (in-process ASGI)")
    for name, ms in figures.items():
        print(f"  {name:<34} {ms:8.1f} ms")
    print(f"first page {first:.1f} ms, target < {TARGET_MS:.0f} ms: {verdict(first < TARGET_MS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
