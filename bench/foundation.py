#!/usr/bin/env python
"""Foundation benchmark of run-ledger: publish, projection and read latency,
each beside a raw ceiling built from the same libraries.

Starts its own embedded nats-server (temp dir, free port) and measures, as
the median of ``--reps`` repetitions on a fresh LEDGER stream / fresh SQLite
file each time:

1. publish rate of a realistic event mix through ``ledger.publisher.Publisher``
   vs ceiling A: raw ``js.publish_async`` of the same pre-encoded payloads;
2. projection rate of ``projections.projector.Projector.run(until_idle=True)``
   vs ceiling B: the same ``OrderedReader`` + ``msgspec`` decode + stdlib
   ``sqlite3.executemany`` of raw rows into one table, 5,000 per transaction;
3. ``GET /runs/{id}`` latency (p50/p99) of the API over >= 100k projected runs,
   with the HTTP client in a separate process.

Usage:
    .venv/bin/python bench/foundation.py            # full run (~5-10 min on 2 cores)
    .venv/bin/python bench/foundation.py --quick    # smoke run
    .venv/bin/python bench/foundation.py --json     # figures as one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec

# --------------------------------------------------------------------------- event mix

_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, as ULIDs use
_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> 2 chars


def ulid(rng: random.Random, ms: int) -> str:
    """A ULID-shaped event id (48-bit ms time + 80 random bits, 26 chars), deterministic under ``rng``."""
    n = ((ms & ((1 << 48) - 1)) << 80) | rng.getrandbits(80)  # 128 bits; 26 chars hold 130
    out = []
    for _ in range(13):
        out.append(_PAIRS[n & 1023])
        n >>= 10
    return "".join(reversed(out))


BASE_TIME = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)
BASE_MS = int(BASE_TIME.timestamp() * 1000)
HEARTBEAT_EVERY_S = 30.0
TARGET_CONCURRENCY = 200  # runs alive at once, on average: decides how runs interleave in the stream


@dataclass
class Mix:
    events: list[Any]                  # event structs, in stream (time) order
    expected_states: Counter[str]      # final run state -> count, as the contract says
    type_counts: Counter[str]
    n_runs: int
    n_sweeps: int


def generate_mix(n_events: int, n_runs: int, seed: int) -> Mix:
    """A deterministic, realistic lifecycle mix of exactly ``n_events`` events over ``n_runs`` runs.

    Every run is queued and started; heartbeats fill the rest of the budget.
    Outcomes: ~3% fail (exit 1), ~4% preempted (SIGTERM signalled, run.preempting,
    exit 143 by signal 15; half of them resume as attempt 2 and finish),
    ~2% killed (run.killed, then exit 137 by signal 9), ~0.5% crashed
    (heartbeat timeout), the rest exit 0. ~20% of runs belong to a few sweeps.
    """
    from ledger import events as ev

    rng = random.Random(seed)
    n_sweeps = max(1, n_runs // 2000)
    sweeps = [f"sweep-{i:02d}-{rng.getrandbits(24):06x}" for i in range(n_sweeps)]
    run_ids: list[str] = []
    seen_ids: set[str] = set()
    while len(run_ids) < n_runs:
        rid = f"r{rng.getrandbits(48):012x}"
        if rid not in seen_ids:
            seen_ids.add(rid)
            run_ids.append(rid)

    plans = []
    lifecycle = 0
    expected: Counter[str] = Counter()
    for _ in range(n_runs):
        u = rng.random()
        if u < 0.03:
            outcome, extra = "failed", 1
        elif u < 0.07:
            outcome, extra = "preempted", 3
        elif u < 0.09:
            outcome, extra = "killed", 2
        elif u < 0.095:
            outcome, extra = "crashed", 1
        else:
            outcome, extra = "finished", 1
        resumed = outcome == "preempted" and rng.random() < 0.5
        if resumed:
            extra += 2  # run.started (attempt 2) + run.exited 0
        expected["finished" if resumed else outcome] += 1
        sweep = rng.choice(sweeps) if rng.random() < 0.2 else None
        plans.append((outcome, resumed, sweep))
        lifecycle += 2 + extra  # queued + started + outcome events
    sweep_events = 2 * n_sweeps + 2  # created + stopped each; one pause/resume
    heartbeats = n_events - lifecycle - sweep_events
    if heartbeats < n_runs:
        raise SystemExit(f"--events {n_events} is too small for --runs {n_runs}: need >= {lifecycle + sweep_events + n_runs}")

    # Heartbeat budget per run: uneven (weights 0.2..1.8), summing exactly to `heartbeats`.
    weights = [rng.uniform(0.2, 1.8) for _ in range(n_runs)]
    total_w = sum(weights)
    hb = [max(1, int(heartbeats * w / total_w)) for w in weights]
    diff = heartbeats - sum(hb)
    order = list(range(n_runs))
    rng.shuffle(order)
    i = 0
    while diff != 0:
        k = order[i % n_runs]
        if diff > 0:
            hb[k] += 1
            diff -= 1
        elif hb[k] > 1:
            hb[k] -= 1
            diff += 1
        i += 1

    mean_duration = (heartbeats / n_runs) * HEARTBEAT_EVERY_S
    window = n_runs * mean_duration / TARGET_CONCURRENCY
    starts = sorted(rng.uniform(0.0, window) for _ in range(n_runs))

    items: list[tuple[float, int, int, Any]] = []
    hosts = [f"gpu-node-{i:02d}" for i in range(32)]
    models = ["resnet50", "vit-b16", "llama-7b-lora", "bert-base", "unet"]

    def at(t: float) -> datetime:
        return BASE_TIME + timedelta(seconds=round(t, 6))

    def eid(t: float) -> str:
        return ulid(rng, BASE_MS + int(t * 1000))

    for k, (rid, (outcome, resumed, sweep), t0, n_hb) in enumerate(zip(run_ids, plans, starts, hb)):
        j = 0

        def put(t: float, cls: type, **fields: Any) -> None:
            nonlocal j
            items.append((t, k, j, cls(id=eid(t), at=at(t), run_id=rid, **fields)))
            j += 1

        lr = rng.choice([1e-4, 3e-4, 1e-3, 3e-3])
        bs = rng.choice([32, 64, 128, 256])
        model = rng.choice(models)
        put(t0, ev.RunQueued, sweep_id=sweep, config={"lr": lr, "batch_size": bs, "model": model})
        t = t0 + rng.uniform(2.0, 60.0)
        host = rng.choice(hosts)
        cmd = ["python", "train.py", "--model", model, "--lr", str(lr), "--batch-size", str(bs)]
        put(t, ev.RunStarted, attempt=1, sweep_id=sweep, host=host, pid=rng.randint(1000, 400000), command=cmd)
        n1 = max(1, n_hb // 2) if resumed else n_hb
        total_steps = n_hb * 100
        step = 0

        def beats(count: int, attempt: int) -> None:
            nonlocal t, step
            for _ in range(count):
                t += HEARTBEAT_EVERY_S + rng.uniform(-3.0, 3.0)
                step += 100
                put(t, ev.RunHeartbeat, attempt=attempt, step=step, progress=round(min(1.0, step / total_steps), 4))

        beats(n1, 1)
        if outcome == "finished":
            t += rng.uniform(1.0, 20.0)
            put(t, ev.RunExited, attempt=1, exit_code=0)
        elif outcome == "failed":
            t += rng.uniform(1.0, 20.0)
            put(t, ev.RunExited, attempt=1, exit_code=1)
        elif outcome == "crashed":
            last_hb = items[-1][3].at
            t += 300.0 + rng.uniform(1.0, 30.0)
            items.append((t, k, j, ev.RunCrashed(id=eid(t), at=at(t), run_id=rid, reason="heartbeat-timeout",
                                                 last_heartbeat_at=last_hb)))
            j += 1
        elif outcome == "killed":
            t += rng.uniform(1.0, 20.0)
            put(t, ev.RunKilled, attempt=1, reason="user-request")
            t += rng.uniform(0.05, 2.0)
            put(t, ev.RunExited, attempt=1, exit_code=137, signal=9)
        else:  # preempted
            t += rng.uniform(1.0, 20.0)
            put(t, ev.RunSignalled, attempt=1, signal=15, name="SIGTERM", handled=True)
            t += rng.uniform(0.01, 0.2)
            put(t, ev.RunPreempting, attempt=1)
            t += rng.uniform(1.0, 30.0)
            put(t, ev.RunExited, attempt=1, exit_code=143, signal=15)
            if resumed:
                t += rng.uniform(60.0, 600.0)
                put(t, ev.RunStarted, attempt=2, sweep_id=sweep, resume="auto", host=rng.choice(hosts),
                    pid=rng.randint(1000, 400000), command=cmd)
                beats(n_hb - n1, 2)
                t += rng.uniform(1.0, 20.0)
                put(t, ev.RunExited, attempt=2, exit_code=0)

    end = max(x[0] for x in items) + 60.0
    for i, sw in enumerate(sweeps):
        t = -60.0 + i
        items.append((t, -1, i, ev.SweepCreated(id=eid(t), at=at(t), sweep_id=sw,
                                                config={"method": "random", "metric": "val/loss"})))
        t = end + i
        items.append((t, -1, 100 + i, ev.SweepStopped(id=eid(t), at=at(t), sweep_id=sw, reason="budget reached")))
    t = window / 2
    items.append((t, -1, 50, ev.SweepPaused(id=eid(t), at=at(t), sweep_id=sweeps[0], reason="quota")))
    t = window / 2 + 900.0
    items.append((t, -1, 51, ev.SweepResumed(id=eid(t), at=at(t), sweep_id=sweeps[0])))

    items.sort(key=lambda x: (x[0], x[1], x[2]))
    evs = [x[3] for x in items]
    assert len(evs) == n_events, (len(evs), n_events)
    types = Counter(ev.tag_of(e) for e in evs)
    return Mix(evs, expected, types, n_runs, n_sweeps)


def generate_starts(n_runs: int, seed: int) -> tuple[list[Any], list[str]]:
    """``n_runs`` run.started events of distinct runs (the read benchmark's data)."""
    from ledger import events as ev

    rng = random.Random(seed)
    run_ids: list[str] = []
    seen: set[str] = set()
    while len(run_ids) < n_runs:
        rid = f"r{rng.getrandbits(48):012x}"
        if rid not in seen:
            seen.add(rid)
            run_ids.append(rid)
    out = []
    for k, rid in enumerate(run_ids):
        t = k * 0.5
        out.append(ev.RunStarted(
            id=ulid(rng, BASE_MS + int(t * 1000)), at=BASE_TIME + timedelta(seconds=t), run_id=rid, attempt=1,
            host=f"gpu-node-{k % 32:02d}", pid=1000 + k, command=["python", "train.py", "--seed", str(k)]))
    return out, run_ids


# --------------------------------------------------------------------------- measurements

def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def nearest_rank(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[max(0, math.ceil(q * len(sorted_xs)) - 1)]


async def fresh_stream(js: Any) -> None:
    from nats.js.errors import NotFoundError

    from ledger.stream import STREAM, ensure_stream

    try:
        await js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await ensure_stream(js)


async def check_stream(js: Any, expected: int) -> None:
    from ledger.stream import stream_last_seq

    info = await js.stream_info("LEDGER")
    if info.state.messages != expected or await stream_last_seq(js) != expected:
        raise RuntimeError(f"stream holds {info.state.messages} messages, expected {expected}")


async def bench_publisher(nc: Any, events: list[Any]) -> float:
    """Seconds to submit every event through the project's Publisher and await every ack."""
    from ledger.publisher import Publisher

    pub = Publisher(nc)
    try:
        await pub._ensure_inbox()  # subscribe the reply inbox before the clock starts (a one-time setup)
        gc.collect()
        t0 = time.perf_counter()
        futures = [await pub.submit(e) for e in events]
        seqs = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0
    finally:
        await pub.close()
    if len(set(seqs)) != len(events):
        raise RuntimeError("publisher: duplicate sequences")
    return elapsed


async def bench_raw_publish(js_raw: Any, prepared: list[tuple[str, bytes, str]]) -> float:
    """Seconds for raw nats-py publish_async of the same pre-encoded payloads, all acks awaited."""
    gc.collect()
    t0 = time.perf_counter()
    futures = [await js_raw.publish_async(subject, payload, headers={"Nats-Msg-Id": mid})
               for subject, payload, mid in prepared]
    acks = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    if any(a.duplicate for a in acks):
        raise RuntimeError("raw publish: duplicates acked")
    return elapsed


async def bench_bare_publish(nc: Any, prepared: list[tuple[str, bytes, str]], window: int = 20_000) -> float:
    """Wire floor: core nc.publish with a per-message reply subject under one wildcard
    inbox, acks counted (not parsed), at most ``window`` in flight."""
    prefix = nc.new_inbox() + "."
    total = len(prepared)
    acked = 0
    errors = 0
    all_acked = asyncio.Event()
    room = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acked, errors
        acked += 1
        if b'"error"' in msg.data or not msg.data:
            errors += 1
        room.set()
        if acked == total:
            all_acked.set()

    sub = await nc.subscribe(prefix + "*", cb=on_ack)
    try:
        gc.collect()
        t0 = time.perf_counter()
        for i, (subject, payload, mid) in enumerate(prepared):
            while i - acked >= window:
                room.clear()
                await room.wait()
            await nc.publish(subject, payload, reply=prefix + str(i), headers={"Nats-Msg-Id": mid})
        await asyncio.wait_for(all_acked.wait(), 60)
        elapsed = time.perf_counter() - t0
    finally:
        await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"wire floor: {errors} publishes refused")
    return elapsed


async def bench_projector(js: Any, db_path: Path, total: int) -> float:
    from projections.projector import Projector

    gc.collect()
    t0 = time.perf_counter()
    checkpoint = await Projector(js, db_path).run(until_idle=True)
    elapsed = time.perf_counter() - t0
    if checkpoint != total:
        raise RuntimeError(f"projector stopped at {checkpoint}, stream has {total}")
    return elapsed


RAW_BATCH = 5000


async def bench_raw_projector(js: Any, db_path: Path, total: int) -> float:
    """Ceiling B: ordered read + msgspec decode + executemany of raw rows, 5,000 per transaction."""
    from ledger.events import AnyEvent, RunEvent
    from ledger.stream import OrderedReader

    decode = msgspec.json.Decoder(AnyEvent).decode
    con = sqlite3.connect(db_path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")  # the same durability the project's views use
    con.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, entity_id TEXT NOT NULL, "
                "type TEXT NOT NULL, payload BLOB NOT NULL)")
    insert = "INSERT INTO events (seq, entity_id, type, payload) VALUES (?, ?, ?, ?)"
    gc.collect()
    t0 = time.perf_counter()
    reader = OrderedReader(js, 1)
    await reader.start()
    try:
        rows: list[tuple[int, str, str, bytes]] = []
        done = 0
        while done < total:
            batch = await reader.next_batch(RAW_BATCH - len(rows), 10.0)
            if not batch:
                raise RuntimeError(f"raw projector stalled at seq {done}")
            for m in batch:
                e = decode(m.data)
                key = e.run_id if isinstance(e, RunEvent) else e.sweep_id
                rows.append((m.seq, key, type(e).__struct_config__.tag, m.data))
            if len(rows) >= RAW_BATCH or rows[-1][0] >= total:
                con.execute("BEGIN")
                con.executemany(insert, rows)
                con.execute("COMMIT")
                done = rows[-1][0]
                rows = []
        elapsed = time.perf_counter() - t0
    finally:
        await reader.stop()
        con.close()
    return elapsed


def view_states(db_path: Path) -> Counter[str]:
    con = sqlite3.connect(db_path)
    try:
        return Counter(dict(con.execute("SELECT state, count(*) FROM runs GROUP BY state").fetchall()))
    finally:
        con.close()


def _http_client(base_url: str, ids: list[str], warmup: int, conn: Any) -> None:
    """Child process: sequential keep-alive GETs; sends back latencies (ns) and failures."""
    import httpx

    lat: list[int] = []
    bad = 0
    try:
        with httpx.Client(base_url=base_url, timeout=30.0) as client:
            for rid in ids[:warmup]:
                client.get(f"/runs/{rid}")
            for rid in ids[warmup:]:
                t0 = time.perf_counter_ns()
                r = client.get(f"/runs/{rid}")
                lat.append(time.perf_counter_ns() - t0)
                if r.status_code != 200 or r.json().get("run_id") != rid:
                    bad += 1
        conn.send(("ok", lat, bad))
    except BaseException as exc:  # report, don't hang the parent
        conn.send(("error", repr(exc), 0))
    finally:
        conn.close()


async def bench_api(db_path: Path, ids: list[str], warmup: int) -> tuple[float, float, int]:
    """Serve the API in this process's loop; a separate process does the GETs. Returns p50, p99 (ms), failures."""
    from ledger.server import free_port
    from projections.api import ApiState, api_server

    port = free_port()
    server = api_server(ApiState(db_path=db_path), "127.0.0.1", port)
    serve = asyncio.create_task(server.serve())
    proc = None
    try:
        while not server.started:
            if serve.done():
                serve.result()
                raise RuntimeError("API server exited at startup")
            await asyncio.sleep(0.02)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_http_client, args=(f"http://127.0.0.1:{port}", ids, warmup, child), daemon=True)
        proc.start()
        child.close()
        try:
            status, payload, bad = await asyncio.to_thread(parent.recv)
        finally:
            parent.close()
        if status != "ok":
            raise RuntimeError(f"HTTP client failed: {payload}")
        lat = sorted(x / 1e6 for x in payload)
        return median(lat), nearest_rank(lat, 0.99), bad
    finally:
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
            await asyncio.to_thread(proc.join, 5)
        server.should_exit = True
        try:
            await asyncio.wait_for(serve, 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            serve.cancel()


# --------------------------------------------------------------------------- driver

@dataclass
class Figures:
    publisher: list[float] = field(default_factory=list)      # events/s
    raw_publish: list[float] = field(default_factory=list)
    projector: list[float] = field(default_factory=list)
    raw_projector: list[float] = field(default_factory=list)
    api_p50: list[float] = field(default_factory=list)        # ms
    api_p99: list[float] = field(default_factory=list)
    api_failures: list[int] = field(default_factory=list)
    api_projection: list[float] = field(default_factory=list)  # events/s, run.started-only stream
    state_check: dict[str, Any] = field(default_factory=dict)


async def run_bench(args: argparse.Namespace, url: str, work: Path, say: Any) -> tuple[Figures, Mix]:
    from ledger.events import encode_event, subject_of
    from ledger.stream import connect

    say(f"generating {args.events:,} events over {args.runs:,} runs (seed {args.seed})")
    mix = generate_mix(args.events, args.runs, args.seed)
    prepared = [(subject_of(e), encode_event(e), e.id) for e in mix.events]
    starts, api_ids = generate_starts(args.api_runs, args.seed + 1)
    starts_prepared = [(subject_of(e), encode_event(e), e.id) for e in starts]
    rng = random.Random(args.seed + 2)

    nc = await connect(url, name="ledger-bench", reconnect=False)
    fig = Figures()
    try:
        js = nc.jetstream()
        js_raw = nc.jetstream(publish_async_max_pending=20_000)  # the Publisher's default in-flight window
        n = len(mix.events)
        for rep in range(args.reps):
            tag = f"[rep {rep + 1}/{args.reps}]"
            # Publish: both orders alternate across reps, each on a fresh stream.
            order = ("publisher", "raw") if rep % 2 == 0 else ("raw", "publisher")
            for which in order:
                await fresh_stream(js)
                if which == "publisher":
                    secs = await bench_publisher(nc, mix.events)
                    fig.publisher.append(n / secs)
                else:
                    secs = await bench_raw_publish(js_raw, prepared)
                    fig.raw_publish.append(n / secs)
                await check_stream(js, n)
                say(f"{tag} publish {which:9s} {n / secs:>10,.0f} ev/s")
            # Projection of the same stream: both orders alternate, fresh database files.
            order = ("projector", "raw") if rep % 2 == 0 else ("raw", "projector")
            for which in order:
                db = work / f"{which}-{rep}.sqlite"
                if which == "projector":
                    secs = await bench_projector(js, db, n)
                    fig.projector.append(n / secs)
                    states = view_states(db)
                    fig.state_check = {"expected": dict(mix.expected_states), "projected": dict(states),
                                       "match": states == mix.expected_states}
                else:
                    secs = await bench_raw_projector(js, db, n)
                    fig.raw_projector.append(n / secs)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                say(f"{tag} project {which:9s} {n / secs:>10,.0f} ev/s")
            # Reads: a fresh stream of run.started events for api_runs distinct runs, projected, then served.
            await fresh_stream(js)
            await bench_raw_publish(js_raw, starts_prepared)
            await check_stream(js, len(starts))
            db = work / f"api-{rep}.sqlite"
            secs = await bench_projector(js, db, len(starts))
            fig.api_projection.append(len(starts) / secs)
            con = sqlite3.connect(db)
            (count,) = con.execute("SELECT count(*) FROM runs").fetchone()
            con.close()
            if count != args.api_runs:
                raise RuntimeError(f"views hold {count} runs, expected {args.api_runs}")
            ids = [rng.choice(api_ids) for _ in range(args.warmup + args.gets)]
            p50, p99, bad = await bench_api(db, ids, args.warmup)
            fig.api_p50.append(p50)
            fig.api_p99.append(p99)
            fig.api_failures.append(bad)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            say(f"{tag} GET /runs/{{id}} over {count:,} runs: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                + (f", {bad} FAILED" if bad else ""))
    finally:
        try:
            await asyncio.wait_for(nc.close(), 5)
        except Exception:
            pass
    return fig, mix


def machine_info(work: Path) -> dict[str, Any]:
    from importlib.metadata import version

    from ledger.server import nats_server_binary

    try:
        nats_v = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception as exc:
        nats_v = f"unknown ({exc})"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        fs = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True, timeout=5).stdout.splitlines()[-1].split()[1]
    except Exception:
        fs = "unknown"
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "python": platform.python_version(),
        "nats_server": nats_v,
        "nats_py": version("nats-py"),
        "msgspec": version("msgspec"),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "tmp_fs": fs,
        "loadavg_start": os.getloadavg(),
    }


def summarize(args: argparse.Namespace, fig: Figures, mix: Mix, info: dict[str, Any], command: str,
              wall: float) -> dict[str, Any]:
    def block(project: list[float], raw: list[float]) -> dict[str, Any]:
        mp_, mr = median(project), median(raw)
        return {"project": mp_, "ceiling": mr, "ratio": mp_ / mr,
                "project_reps": project, "ceiling_reps": raw,
                "paired_ratios": [a / b for a, b in zip(project, raw)]}

    total = sum(mix.type_counts.values())
    return {
        "command": command,
        "params": {"events": args.events, "runs": args.runs, "api_runs": args.api_runs, "gets": args.gets,
                   "warmup": args.warmup, "reps": args.reps, "seed": args.seed},
        "machine": info,
        "mix": {"types": dict(mix.type_counts.most_common()),
                "heartbeat_share": mix.type_counts["run.heartbeat"] / total,
                "sweeps": mix.n_sweeps, "expected_final_states": dict(mix.expected_states)},
        "publish_events_per_s": block(fig.publisher, fig.raw_publish),
        "projection_events_per_s": block(fig.projector, fig.raw_projector),
        "get_run_ms": {"p50": median(fig.api_p50), "p99": median(fig.api_p99), "p50_reps": fig.api_p50,
                       "p99_reps": fig.api_p99, "failures": sum(fig.api_failures),
                       "views_runs": args.api_runs, "gets_per_rep": args.gets},
        "api_setup_projection_events_per_s": {"median": median(fig.api_projection), "reps": fig.api_projection},
        "state_check": fig.state_check,
        "wall_seconds": wall,
    }


def render(s: dict[str, Any]) -> str:
    def reps(xs: list[float], fmt: str) -> str:
        return " / ".join(format(x, fmt) for x in xs)

    p, q, g = s["publish_events_per_s"], s["projection_events_per_s"], s["get_run_ms"]
    m, par, mix = s["machine"], s["params"], s["mix"]
    lines = [
        "run-ledger foundation benchmark",
        f"command : {s['command']}",
        f"machine : nproc={m['nproc']} (affinity {m['affinity']}), {m['cpu']}, {m['platform']}",
        f"software: Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, msgspec {m['msgspec']}, "
        f"SQLite {m['sqlite']}; temp dir on {m['tmp_fs']}; loadavg at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}",
        f"workload: {par['events']:,} events over {par['runs']:,} runs and {mix['sweeps']} sweeps "
        f"(heartbeats {mix['heartbeat_share']:.1%}); median of {par['reps']} reps, fresh stream + DB each",
        "          " + ", ".join(f"{k} {v:,}" for k, v in mix["types"].items()),
        "",
        f"{'figure':<34}{'project':>14}{'ceiling':>14}{'ratio':>8}   per rep (project | ceiling)",
        "-" * 110,
        f"{'publish (events/s)':<34}{p['project']:>14,.0f}{p['ceiling']:>14,.0f}{p['ratio']:>8.2f}   "
        f"{reps(p['project_reps'], ',.0f')} | {reps(p['ceiling_reps'], ',.0f')}",
        f"{'projection (events/s)':<34}{q['project']:>14,.0f}{q['ceiling']:>14,.0f}{q['ratio']:>8.2f}   "
        f"{reps(q['project_reps'], ',.0f')} | {reps(q['ceiling_reps'], ',.0f')}",
        f"{'GET /runs/{id} p50 (ms)':<34}{g['p50']:>14.2f}{'':>14}{'':>8}   {reps(g['p50_reps'], '.2f')}",
        f"{'GET /runs/{id} p99 (ms)':<34}{g['p99']:>14.2f}{'':>14}{'':>8}   {reps(g['p99_reps'], '.2f')}",
        "-" * 110,
        "ceilings: publish = raw js.publish_async of the same pre-encoded payloads (Nats-Msg-Id header, "
        "20,000 in flight);",
        "          projection = same OrderedReader + msgspec.json.Decoder(AnyEvent) + sqlite3.executemany of "
        "(seq, id, type, payload), 5,000/txn",
        f"reads   : {g['gets_per_rep']:,} sequential keep-alive GETs (httpx, separate process, after "
        f"{par['warmup']} warm-up) of random ids among {g['views_runs']:,} projected runs; "
        f"failures {g['failures']}",
        f"          (setting up the read views projected run.started-only streams at "
        f"{s['api_setup_projection_events_per_s']['median']:,.0f} events/s)",
        f"check   : final run states {'match' if s['state_check'].get('match') else 'DO NOT MATCH'} the contract: "
        f"{s['state_check'].get('projected')}",
        f"wall    : {s['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=None, help="events in the mix (default 200000; quick 20000)")
    ap.add_argument("--runs", type=int, default=None, help="runs in the mix (default 10000; quick 1000)")
    ap.add_argument("--api-runs", type=int, default=None, help="runs in the read views (default 100000; quick 10000)")
    ap.add_argument("--gets", type=int, default=None, help="timed GETs per rep (default 2000; quick 1000)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed GETs before the timed ones")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    ap.add_argument("--seed", type=int, default=20250303)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20k events, 1k runs, 10k api runs, 1 rep")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    defaults = ({"events": 20_000, "runs": 1_000, "api_runs": 10_000, "gets": 1_000, "reps": 1} if args.quick else
                {"events": 200_000, "runs": 10_000, "api_runs": 100_000, "gets": 2_000, "reps": 3})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.events, args.runs, args.api_runs, args.gets, args.reps) < 1:
        ap.error("sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.markup import escape

    from ledger.server import EmbeddedNats, free_port

    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()

    def say(msg: str) -> None:
        err.print(f"[dim]{time.perf_counter() - started:6.1f}s[/dim] {escape(msg)}")

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/foundation.py", *argv])

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    nats = EmbeddedNats(work / "nats", port=free_port())
    try:
        info = machine_info(work)
        url = nats.start()
        say(f"nats-server at {url}, data in {work}")
        fig, mix = asyncio.run(run_bench(args, url, work, say))
        summary = summarize(args, fig, mix, info, command, time.perf_counter() - started)
        summary["machine"]["loadavg_end"] = os.getloadavg()
        if args.json:
            print(json.dumps(summary))
        else:
            print(render(summary))
        return 0
    except KeyboardInterrupt:
        err.print("interrupted: cleaning up")
        return 130
    finally:
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
