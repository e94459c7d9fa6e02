#!/usr/bin/env python
"""Cost over time (CONTRACT section 9, issue 12): what a heartbeat costs the views
and the stream, what ``ledger compact`` gives back, and the projector's rate on
a heartbeat-heavy mix against its ceiling.

Starts its own embedded nats-server (temp dir, free port) and measures:

1. views: bytes ``views.db`` (with its WAL, checkpointed) grows by per heartbeat
   (R runs x H heartbeats, after their starts) and per state change (N runs
   started and exited; the run rows included), amortized;
2. stream: the stream's bytes (as the server accounts them) for one finished run
   with 10,000 heartbeats, before and after ``compact --older-than 0s``, and
   compact's rate (heartbeats removed per second) over many such runs;
3. projector: ``Projector.run(until_idle=True)`` on bench/foundation.py's
   heartbeat-heavy mix against ceiling B (ordered read + decode + executemany of
   raw rows), median of ``--reps``, the ratio as bench/foundation.py reports it.
   Run it with ``PYTHONPATH`` pointing at an older tree for its "before" figure.

Usage:
    .venv/bin/python bench/cost.py                 # all three (~2-3 min on 2 cores)
    .venv/bin/python bench/cost.py --quick         # smoke run
    .venv/bin/python bench/cost.py --only projector --json
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
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import OrderedReader, machine_info, median
from foundation import BASE_MS, BASE_TIME, bench_projector, bench_raw_projector, fresh_stream, generate_mix, ulid


def views_bytes(db: Path) -> int:
    """The views database with its WAL, after a checkpoint that truncates the WAL."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


async def publish(js: Any, events: list[Any]) -> None:
    from ledger.core.events import encode_event, subject_of

    futures = [await js.publish_async(subject_of(e), encode_event(e), headers={"Nats-Msg-Id": e.id}) for e in events]
    await asyncio.gather(*futures)


async def project(js: Any, db: Path) -> None:
    from projections.projector.projector import Projector

    await Projector(js, db).run(until_idle=True)


class Events:
    """Deterministic events: ULID-shaped ids, times from BASE_TIME."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def make(self, cls: type, run_id: str, t: float, **fields: Any) -> Any:
        return cls(id=ulid(self.rng, BASE_MS + int(t * 1000)), at=BASE_TIME + timedelta(seconds=t), run_id=run_id,
                   **fields)


async def bench_views(js: Any, work: Path, runs: int, beats: int, lifecycles: int, seed: int) -> dict[str, Any]:
    from ledger.core import events as ev

    make = Events(seed).make
    await fresh_stream(js)
    db = work / "views-hb.db"
    ids = [f"run-{i:05d}" for i in range(runs)]
    await publish(js, [make(ev.RunStarted, r, 0, attempt=1) for r in ids])
    await project(js, db)
    after_starts = views_bytes(db)
    for k in range(beats):
        await publish(js, [make(ev.RunHeartbeat, r, 30 * (k + 1), attempt=1, step=k, progress=k / beats) for r in ids])
    await project(js, db)
    after_beats = views_bytes(db)
    await fresh_stream(js)
    db2 = work / "views-life.db"
    life = [f"life-{i:06d}" for i in range(lifecycles)]
    await publish(js, [make(ev.RunStarted, r, 0, attempt=1) for r in life])
    await publish(js, [make(ev.RunExited, r, 60, attempt=1, exit_code=0) for r in life])
    from projections.views.schema import SCHEMA

    empty = work / "views-empty.db"
    await project(js, db2)
    con = sqlite3.connect(empty)
    con.executescript(SCHEMA)
    con.close()
    base = views_bytes(empty)
    return {"runs": runs, "heartbeats": runs * beats,
            "views_bytes_per_heartbeat": (after_beats - after_starts) / (runs * beats),
            "views_bytes_after_starts": after_starts, "views_bytes_after_heartbeats": after_beats,
            "state_changes": 2 * lifecycles,
            "views_bytes_per_state_change": (views_bytes(db2) - base) / (2 * lifecycles)}


async def bench_stream(js: Any, work: Path, beats: int, rate_runs: int, seed: int) -> dict[str, Any]:
    from ledger.core import events as ev
    from ledger.nats.compact import stream_bytes
    from projections.workers.compaction import compact

    make = Events(seed).make

    def one_run(run_id: str) -> list[Any]:
        return ([make(ev.RunStarted, run_id, 0, attempt=1)]
                + [make(ev.RunHeartbeat, run_id, 30 * (k + 1), attempt=1, step=k, progress=(k + 1) / beats)
                   for k in range(beats)]
                + [make(ev.RunExited, run_id, 30 * (beats + 1), attempt=1, exit_code=0)])

    await fresh_stream(js)
    db = work / "views-one.db"
    await publish(js, one_run("one"))
    before = await stream_bytes(js)
    await project(js, db)
    done = await compact(js, db, older_than=0)
    after = await stream_bytes(js)
    await fresh_stream(js)
    db2 = work / "views-rate.db"
    for i in range(rate_runs):
        await publish(js, one_run(f"rate-{i:03d}"))
    await project(js, db2)
    rate = await compact(js, db2, older_than=0)
    return {"heartbeats": beats, "stream_bytes_before": before[1], "stream_bytes_after": after[1],
            "stream_messages_before": before[0], "stream_messages_after": after[0],
            "stream_left_fraction": after[1] / before[1], "removed": done.messages_removed,
            "compact_runs": rate_runs, "compact_removed": rate.messages_removed, "compact_seconds": rate.seconds,
            "compact_messages_per_s": rate.rate}


async def bench_projector_ratio(js: Any, work: Path, events: int, runs: int, reps: int, seed: int) -> dict[str, Any]:
    from ledger.core.events import encode_event, subject_of

    mix = generate_mix(events, runs, seed)
    await fresh_stream(js)
    futures = [await js.publish_async(subject_of(e), encode_event(e), headers={"Nats-Msg-Id": e.id})
               for e in mix.events]
    await asyncio.gather(*futures)
    n = len(mix.events)
    project_rates: list[float] = []
    ceiling_rates: list[float] = []
    for rep in range(reps):
        for which in (["projector", "raw"] if rep % 2 == 0 else ["raw", "projector"]):
            db = work / f"{which}-{rep}.db"
            if which == "projector":
                project_rates.append(n / await bench_projector(js, db, n))
            else:
                ceiling_rates.append(n / await bench_raw_projector(js, db, n, OrderedReader))
    heartbeat_share = mix.type_counts["run.heartbeat"] / n
    return {"events": n, "heartbeat_share": heartbeat_share, "projector_events_per_s": median(project_rates),
            "ceiling_events_per_s": median(ceiling_rates),
            "ratio": median(project_rates) / median(ceiling_rates),
            "paired_ratios": [a / b for a, b in zip(project_rates, ceiling_rates)]}


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ledger.nats.server import EmbeddedNats, free_port
    from ledger.nats.stream import connect

    server = EmbeddedNats(work / "nats", port=free_port())
    url = server.start()
    out: dict[str, Any] = {}
    try:
        nc = await connect(url, reconnect=False)
        try:
            js = nc.jetstream(publish_async_max_pending=20_000)
            if args.only in (None, "views"):
                out["views"] = await bench_views(js, work, args.runs, args.beats, args.lifecycles, args.seed)
                say(f"views: {out['views']['views_bytes_per_heartbeat']:.2f} B/heartbeat, "
                    f"{out['views']['views_bytes_per_state_change']:.1f} B/state change")
            if args.only in (None, "stream"):
                out["stream"] = await bench_stream(js, work, args.stream_beats, args.rate_runs, args.seed)
                s = out["stream"]
                say(f"stream: {s['stream_bytes_before']:,} -> {s['stream_bytes_after']:,} B "
                    f"({100 * s['stream_left_fraction']:.2f}% left); compact {s['compact_messages_per_s']:,.0f} msg/s")
            if args.only in (None, "projector"):
                out["projector"] = await bench_projector_ratio(js, work, args.events, args.mix_runs, args.reps,
                                                               args.seed)
                p = out["projector"]
                say(f"projector: {p['projector_events_per_s']:,.0f} ev/s vs ceiling {p['ceiling_events_per_s']:,.0f}"
                    f" ev/s, ratio {p['ratio']:.2f}")
        finally:
            await nc.close()
    finally:
        server.stop()
    return out


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", choices=["views", "stream", "projector"], default=None)
    parser.add_argument("--json", action="store_true", help="figures as one JSON object on stdout")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    quick = args.quick
    args.runs, args.beats = (10, 200) if quick else (50, 2000)
    args.lifecycles = 1000 if quick else 10_000
    args.stream_beats, args.rate_runs = (2000, 3) if quick else (10_000, 10)
    args.events, args.mix_runs, args.reps = (30_000, 100, 1) if quick else (200_000, 500, 3)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledger-cost-") as tmp:
        out = asyncio.run(run(args, Path(tmp)))
        out["machine"] = machine_info(Path(tmp))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["command"] = " ".join(["bench/cost.py", *sys.argv[1:]])
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
