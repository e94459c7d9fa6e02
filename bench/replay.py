#!/usr/bin/env python
"""Replay benchmark of run-ledger: ``ledger replay`` of a long stream beside a raw ceiling.

Starts its own embedded nats-server (temp dir, free port). For each stream
size (``--events``, default 1,000,000, and a quarter of it to show that memory
does not grow with the stream) it publishes the realistic event mix of
``bench/foundation.py`` (from this process), then measures in fresh child
processes, one per measurement, alternating the order across ``--reps``:

- replay: ``projections.audit.rebuild.replay`` into a data dir (rebuild from seq 1
  into a new generation file, indexes, fsync, symlink swap), as
  ``ledger replay`` runs it;
- ceiling: the same ``OrderedReader`` + ``msgspec`` decode + stdlib
  ``sqlite3.executemany`` of one raw row per event into one table, 5,000
  events per transaction (WAL, synchronous=NORMAL), nothing else.

Each child reports elapsed seconds (connect excluded) and its peak RSS
(``VmHWM`` of ``/proc/self/status``), and its RSS after imports, so the
publisher's memory never counts.

Usage:
    .venv/bin/python bench/replay.py                  # 1M and 250k events (~5-10 min on 2 cores)
    .venv/bin/python bench/replay.py --events 200000  # smaller: 200k and 50k
    .venv/bin/python bench/replay.py --json           # figures as one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

# after sys.path, which has bench/ (also when this file is imported rather than run)
from common import RawCeiling, cpu_model, nats_server_version, progress_printer, rss_kib

# --------------------------------------------------------------------------- children

async def child_replay(url: str, work: Path, expected: int) -> dict[str, Any]:
    from ledger.nats.stream import connect
    from projections.audit.rebuild import replay

    nc = await connect(url, name="bench-replay", reconnect=False)
    try:
        js = nc.jetstream()
        base = rss_kib()["VmRSS"]
        t0 = time.perf_counter()
        result = await replay(js, work / "data")
        elapsed = time.perf_counter() - t0
    finally:
        await nc.close()
    if result.rebuild.last_seq != expected:
        raise RuntimeError(f"replay stopped at {result.rebuild.last_seq}, stream has {expected}")
    con = sqlite3.connect(work / "data" / "views.db")
    runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    con.close()
    return {"seconds": elapsed, "rss_after_imports_kib": base, "runs": runs,
            "outcomes": dict(result.rebuild.outcomes)}


async def child_ceiling(url: str, work: Path, expected: int) -> dict[str, Any]:
    RawCeiling.modules()  # imported before anything else, as the memory after imports has always been measured
    from ledger.nats.stream import PullReader, connect

    nc = await connect(url, name="bench-ceiling", reconnect=False)
    ceiling = RawCeiling(work / "ceiling.db")
    try:
        js = nc.jetstream()
        base = rss_kib()["VmRSS"]
        elapsed, _ = await ceiling.run(js, expected, PullReader, 10.0,
                                       lambda done: RuntimeError(f"ceiling stalled at seq {done}"))
    finally:
        ceiling.close()
        await nc.close()
    return {"seconds": elapsed, "rss_after_imports_kib": base}


def child_main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    fn = child_replay if args.child == "replay" else child_ceiling
    out = asyncio.run(fn(args.nats_url, work, args.expected))
    out["peak_rss_kib"] = rss_kib()["VmHWM"]
    print(json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- parent

def run_child(kind: str, url: str, work: Path, expected: int) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", kind, "--nats-url", url, "--work", str(work),
           "--expected", str(expected)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return out


async def publish_mix(url: str, n_events: int, seed: int, say: Any) -> int:
    from foundation import fresh_stream, generate_mix

    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import connect, stream_last_seq

    say(f"generating {n_events:,} events over {n_events // 20:,} runs (seed {seed})")
    mix = generate_mix(n_events, max(1, n_events // 20), seed)
    nc = await connect(url, name="bench-publisher", reconnect=False)
    try:
        js = nc.jetstream()
        await fresh_stream(js)
        pub = Publisher(nc)
        t0 = time.perf_counter()
        futures = [await pub.submit(e) for e in mix.events]
        await asyncio.gather(*futures)
        await pub.close()
        say(f"published {n_events:,} events in {time.perf_counter() - t0:.1f} s")
        last = await stream_last_seq(js)
    finally:
        await nc.close()
    del mix
    if last != n_events:
        raise RuntimeError(f"stream holds {last} messages, expected {n_events}")
    return last


def bench_size(url: str, n_events: int, reps: int, seed: int, work: Path, say: Any) -> dict[str, Any]:
    total = asyncio.run(publish_mix(url, n_events, seed, say))
    figures: dict[str, list[dict[str, Any]]] = {"replay": [], "ceiling": []}
    for rep in range(reps):
        order = ("replay", "ceiling") if rep % 2 == 0 else ("ceiling", "replay")
        for kind in order:
            out = run_child(kind, url, work / kind, total)
            out["events_per_s"] = total / out["seconds"]
            figures[kind].append(out)
            say(f"[{n_events:,} rep {rep + 1}/{reps}] {kind:8s} {out['events_per_s']:>10,.0f} ev/s  "
                f"{out['seconds']:6.1f} s  peak RSS {out['peak_rss_kib'] / 1024:6.0f} MiB")
    rate = {k: statistics.median(x["events_per_s"] for x in v) for k, v in figures.items()}
    peak = {k: max(x["peak_rss_kib"] for x in v) / 1024 for k, v in figures.items()}
    return {"events": total, "replay_events_per_s": rate["replay"], "ceiling_events_per_s": rate["ceiling"],
            "ratio_ceiling_over_replay": rate["ceiling"] / rate["replay"],
            "replay_peak_rss_mib": peak["replay"], "ceiling_peak_rss_mib": peak["ceiling"],
            "replay_rss_after_imports_mib": figures["replay"][0]["rss_after_imports_kib"] / 1024,
            "runs": figures["replay"][0]["runs"], "outcomes": figures["replay"][0]["outcomes"],
            "reps": figures}


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    nats_v = nats_server_version(timeout=None, best_effort=False)
    return {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "nats_server": nats_v,
            "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def render(s: dict[str, Any]) -> str:
    lines = [f"command: {s['command']}", f"machine: {s['machine']['cpu']}, {s['machine']['cores']} cores, "
             f"Python {s['machine']['python']}, SQLite {s['machine']['sqlite']}, {s['machine']['nats_server']}", ""]
    lines.append(f"{'events':>10} {'replay ev/s':>12} {'ceiling ev/s':>13} {'ceiling/replay':>15} "
                 f"{'replay peak RSS':>16} {'ceiling peak RSS':>17}")
    for r in s["sizes"]:
        lines.append(f"{r['events']:>10,} {r['replay_events_per_s']:>12,.0f} {r['ceiling_events_per_s']:>13,.0f} "
                     f"{r['ratio_ceiling_over_replay']:>14.2f}x {r['replay_peak_rss_mib']:>12.0f} MiB "
                     f"{r['ceiling_peak_rss_mib']:>13.0f} MiB")
    big, small = s["sizes"][0], s["sizes"][-1]
    lines += ["", f"target: replay within 2x of the ceiling -> {big['ratio_ceiling_over_replay']:.2f}x at "
              f"{big['events']:,} events: {'MET' if big['ratio_ceiling_over_replay'] <= 2 else 'MISSED'}",
              f"memory: replay peak RSS {small['replay_peak_rss_mib']:.0f} MiB at {small['events']:,} events vs "
              f"{big['replay_peak_rss_mib']:.0f} MiB at {big['events']:,} "
              f"({big['events'] / small['events']:.0f}x the events, "
              f"{big['replay_peak_rss_mib'] / small['replay_peak_rss_mib']:.2f}x the memory)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the long stream (default 1,000,000)")
    ap.add_argument("--small", type=int, default=None, help="events in the short stream (default a quarter)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per size, order alternating (default 2)")
    ap.add_argument("--seed", type=int, default=20250303)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--child", choices=["replay", "ceiling"], help=argparse.SUPPRESS)
    ap.add_argument("--nats-url", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)

    from ledger.nats.server import EmbeddedNats, free_port

    say = progress_printer(None)

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/replay.py", *sys.argv[1:]])
    sizes = [args.events, args.small or args.events // 4]
    with tempfile.TemporaryDirectory(prefix="ledger-bench-replay-") as tmp:
        work = Path(tmp)
        server = EmbeddedNats(work / "nats", port=free_port())
        server.start()
        try:
            results = [bench_size(server.url, n, args.reps, args.seed, work, say) for n in sizes]
        finally:
            server.stop()
    summary = {"command": command, "machine": machine(), "sizes": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
