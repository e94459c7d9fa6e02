#!/usr/bin/env python
"""Foundation benchmark of run-ledger: publish, projection and read latency,
each beside a raw ceiling built from the same libraries.

Starts its own embedded nats-server (temp dir, free port) and measures, as
the median of ``--reps`` repetitions on a fresh LEDGER stream / fresh SQLite
file each time:

1. publish rate of a realistic, seeded event mix (pre-generated) through
   ``ledger.nats.publisher.Publisher`` vs ceiling A: raw nats-py ``js.publish_async``
   of the same pre-encoded payloads; plus a wire ceiling (core ``nc.publish``
   with reply subjects, acks counted), since ``publish_async`` is no ceiling;
2. projection rate of ``projections.projector.projector.Projector.run(until_idle=True)``
   vs ceiling B: ``OrderedReader`` (bench/common.py) + ``msgspec`` decode + stdlib
   ``sqlite3.executemany`` of raw rows into one table, 5,000 per transaction
   (and the same with the Projector's own reader class when it uses another).
   Every projection run is checked complete (every event applied, final run
   states as the contract says); a run that lost events is reported and its
   rate discarded;
3. ``GET /runs/{id}`` latency (p50/p99) of the API, served in this process,
   over >= 100k projected runs, with the HTTP client in a separate process.

Usage:
    .venv/bin/python bench/foundation.py            # full run (~2 min on 2 cores)
    .venv/bin/python bench/foundation.py --quick    # smoke run (~10 s)
    .venv/bin/python bench/foundation.py --json     # figures as one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from common import (
    Interrupts,
    OrderedReader,
    RawCeiling,
    cancel_on_interrupt,
    machine_info,
    median,
    nearest_rank,
    progress_printer,
)

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


BASE_TIME = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)
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


class _RunWriter:
    """Appends one run's events to the mix: (time, run index, index within the run, event)."""

    def __init__(self, items: list[tuple[float, int, int, Any]], k: int, run_id: str, t0: float,
                 total_steps: int, rng: random.Random, at: Any, eid: Any) -> None:
        self.items, self.k, self.run_id, self.t = items, k, run_id, t0
        self.total_steps, self.rng, self.at, self.eid = total_steps, rng, at, eid
        self.j = 0
        self.step = 0

    def put(self, after: float, cls: type, **fields: Any) -> None:
        """An event ``after`` seconds after the run's previous one."""
        self.t += after
        t = self.t
        self.items.append((t, self.k, self.j, cls(id=self.eid(t), at=self.at(t), run_id=self.run_id, **fields)))
        self.j += 1

    def beats(self, count: int, attempt: int) -> None:
        """``count`` heartbeats, ~30 s apart, with step and progress."""
        from ledger.core import events as ev

        for _ in range(count):
            self.step += 100
            self.put(HEARTBEAT_EVERY_S + self.rng.uniform(-3.0, 3.0), ev.RunHeartbeat, attempt=attempt,
                     step=self.step, progress=round(min(1.0, self.step / self.total_steps), 4))


def distinct_run_ids(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct random run ids, in the order drawn (deterministic under ``rng``)."""
    run_ids: dict[str, None] = {}
    while len(run_ids) < n:
        run_ids.setdefault(f"r{rng.getrandbits(48):012x}")
    return list(run_ids)


def generate_mix(n_events: int, n_runs: int, seed: int) -> Mix:
    """A deterministic, realistic lifecycle mix of exactly ``n_events`` events over ``n_runs`` runs.

    Every run is queued and started; heartbeats fill the rest of the budget.
    Outcomes: ~3% fail (exit 1), ~4% preempted (SIGTERM signalled, run.preempting,
    exit 143 by signal 15; half of them resume as attempt 2 and finish),
    ~2% killed (run.killed, then exit 137 by signal 9), ~0.5% crashed
    (heartbeat timeout), the rest exit 0. ~20% of runs belong to a few sweeps.
    """
    from ledger.core import events as ev

    rng = random.Random(seed)
    n_sweeps = max(1, n_runs // 2000)
    sweeps = [f"sweep-{i:02d}-{rng.getrandbits(24):06x}" for i in range(n_sweeps)]
    run_ids = distinct_run_ids(rng, n_runs)

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
        run = _RunWriter(items, k, rid, t0, n_hb * 100, rng, at, eid)
        lr = rng.choice([1e-4, 3e-4, 1e-3, 3e-3])
        bs = rng.choice([32, 64, 128, 256])
        model = rng.choice(models)
        run.put(0.0, ev.RunQueued, sweep_id=sweep, config={"lr": lr, "batch_size": bs, "model": model})
        cmd = ["python", "train.py", "--model", model, "--lr", str(lr), "--batch-size", str(bs)]
        run.put(rng.uniform(2.0, 60.0), ev.RunStarted, attempt=1, sweep_id=sweep, host=rng.choice(hosts),
                pid=rng.randint(1000, 400000), command=cmd)
        n1 = max(1, n_hb // 2) if resumed else n_hb
        run.beats(n1, 1)
        if outcome == "finished":
            run.put(rng.uniform(1.0, 20.0), ev.RunExited, attempt=1, exit_code=0)
        elif outcome == "failed":
            run.put(rng.uniform(1.0, 20.0), ev.RunExited, attempt=1, exit_code=1)
        elif outcome == "crashed":  # the monitor's event: no attempt, the last heartbeat it saw
            last_hb = items[-1][3].at
            run.put(300.0 + rng.uniform(1.0, 30.0), ev.RunCrashed, reason="heartbeat-timeout",
                    last_heartbeat_at=last_hb)
        elif outcome == "killed":
            run.put(rng.uniform(1.0, 20.0), ev.RunKilled, attempt=1, reason="user-request")
            run.put(rng.uniform(0.05, 2.0), ev.RunExited, attempt=1, exit_code=137, signal=9)
        else:  # preempted: SIGTERM, preempting, exit 143 by signal 15; maybe resumed as attempt 2
            run.put(rng.uniform(1.0, 20.0), ev.RunSignalled, attempt=1, signal=15, name="SIGTERM", handled=True)
            run.put(rng.uniform(0.01, 0.2), ev.RunPreempting, attempt=1)
            run.put(rng.uniform(1.0, 30.0), ev.RunExited, attempt=1, exit_code=143, signal=15)
            if resumed:
                run.put(rng.uniform(60.0, 600.0), ev.RunStarted, attempt=2, sweep_id=sweep, resume="auto",
                        host=rng.choice(hosts), pid=rng.randint(1000, 400000), command=cmd)
                run.beats(n_hb - n1, 2)
                run.put(rng.uniform(1.0, 20.0), ev.RunExited, attempt=2, exit_code=0)

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
    from ledger.core import events as ev

    rng = random.Random(seed)
    run_ids = distinct_run_ids(rng, n_runs)
    out = []
    for k, rid in enumerate(run_ids):
        t = k * 0.5
        out.append(ev.RunStarted(
            id=ulid(rng, BASE_MS + int(t * 1000)), at=BASE_TIME + timedelta(seconds=t), run_id=rid, attempt=1,
            host=f"gpu-node-{k % 32:02d}", pid=1000 + k, command=["python", "train.py", "--seed", str(k)]))
    return out, run_ids


# --------------------------------------------------------------------------- measurements

async def fresh_stream(js: Any) -> None:
    from nats.js.errors import NotFoundError

    from ledger.nats.stream import STREAM, ensure_stream

    try:
        await js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await ensure_stream(js)


async def check_stream(js: Any, expected: int) -> None:
    from ledger.nats.stream import stream_last_seq

    info = await js.stream_info("LEDGER")
    if info.state.messages != expected or await stream_last_seq(js) != expected:
        raise RuntimeError(f"stream holds {info.state.messages} messages, expected {expected}")


async def bench_publisher(nc: Any, events: list[Any]) -> float:
    """Seconds to submit every event through the project's Publisher and await every ack."""
    from ledger.nats.publisher import Publisher

    pub = Publisher(nc)
    try:
        if hasattr(pub, "_ensure_inbox"):  # subscribe the reply inbox before the clock starts (one-time setup)
            await pub._ensure_inbox()
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
    """Wire ceiling: core nc.publish with a per-message reply subject under one wildcard
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
        raise RuntimeError(f"wire ceiling: {errors} publishes refused")
    return elapsed


class LostEvents(Exception):
    """A projection run that skipped or never received part of the stream (see the report)."""


STALL_S = 15.0


async def bench_projector(js: Any, db_path: Path, total: int) -> float:
    """Seconds for Projector.run(until_idle=True) over the whole stream, then checked for completeness.

    A watchdog cancels the run when its checkpoint stops moving for STALL_S (until_idle
    otherwise waits forever for messages the reader lost); both that and a checkpoint
    reached with events skipped raise LostEvents.
    """
    from projections.projector.projector import Projector

    projector = Projector(js, db_path)
    gc.collect()
    t0 = time.perf_counter()
    task = asyncio.create_task(projector.run(until_idle=True))
    last, moved = -1, t0
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        now, seq = time.perf_counter(), projector.notifier.last_seq
        if seq != last:
            last, moved = seq, now
        elif not task.done() and now - moved > STALL_S:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            seen = _count(db_path, "seen")
            raise LostEvents(f"stalled at checkpoint {seq:,} of {total:,} ({total - seen:,} events never applied)")
    checkpoint = task.result()
    elapsed = time.perf_counter() - t0
    seen, quarantined = _count(db_path, "seen") + _forgotten(db_path), _count(db_path, "quarantine")
    if checkpoint != total or seen != total or quarantined:
        raise LostEvents(f"checkpoint {checkpoint:,} of {total:,} but {total - seen:,} events skipped silently"
                         + (f", {quarantined} quarantined" if quarantined else ""))
    return elapsed


def _forgotten(db_path: Path) -> int:
    """Heartbeats the views keep no seen id for (CONTRACT section 9): in the mix, every heartbeat names its
    attempt; their count is the run's step / 100 (each heartbeat adds 100). 0 for views that keep them all."""
    con = sqlite3.connect(db_path)
    try:
        if con.execute("SELECT count(*) FROM seen").fetchone()[0] == con.execute(
                "SELECT last_seq FROM checkpoint").fetchone()[0]:
            return 0  # an older ledger, which keeps an id per heartbeat
        return int(con.execute("SELECT coalesce(sum(step / 100), 0) FROM runs").fetchone()[0])
    finally:
        con.close()


def _count(db_path: Path, table: str) -> int:
    con = sqlite3.connect(db_path)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


def projector_reader() -> type:
    """The reader class the project's Projector reads with (the working tree may change it)."""
    import projections.projector.projector as module
    from ledger.nats import stream

    for name in ("PullReader",):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and getattr(stream, name, None) is cls:
            return cast(type, cls)
    raise RuntimeError("cannot tell which ledger.nats.stream reader projections.projector.projector uses")


async def bench_raw_projector(js: Any, db_path: Path, total: int, reader_cls: type | None = None) -> float:
    """Ceiling B: ordered read + msgspec decode + executemany of raw rows, 5,000 per transaction.

    The reader is ``OrderedReader`` (bench/common.py) (an ordered push consumer) unless ``reader_cls`` is given.
    """

    ceiling = RawCeiling(db_path)
    try:
        gc.collect()
        elapsed, done = await ceiling.run(js, total, reader_cls or OrderedReader, STALL_S,
                                          lambda done: LostEvents(f"stalled at seq {done:,} of {total:,}"))
        count = ceiling.count()
        if count != total:
            raise LostEvents(f"reached seq {done:,} of {total:,} but {total - count:,} events skipped silently")
    finally:
        ceiling.close()
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
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent rather than hang it
        conn.send(("error", repr(exc), 0))
    finally:
        conn.close()


async def bench_api(db_path: Path, ids: list[str], warmup: int) -> tuple[float, float, int]:
    """Serve the API in this process's loop; a separate process does the GETs. Returns p50, p99 (ms), failures."""
    from ledger.nats.server import free_port
    from projections.http.api import ApiState, api_server

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
        except (TimeoutError, asyncio.CancelledError):
            serve.cancel()


# --------------------------------------------------------------------------- driver

@dataclass
class Figures:
    publisher: list[float] = field(default_factory=list)      # events/s
    raw_publish: list[float] = field(default_factory=list)
    wire_publish: list[float] = field(default_factory=list)
    reader: str = ""                                           # the reader class the Projector uses
    projector: list[float] = field(default_factory=list)       # complete runs only
    raw_same: list[float] = field(default_factory=list)        # ceiling B with the Projector's reader
    raw_projector: list[float] = field(default_factory=list)
    api_p50: list[float] = field(default_factory=list)        # ms
    api_p99: list[float] = field(default_factory=list)
    api_failures: list[int] = field(default_factory=list)
    api_projection: list[float] = field(default_factory=list)  # events/s, run.started-only stream
    state_check: dict[str, Any] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)              # projection attempts that lost events
    attempts: dict[str, int] = field(default_factory=dict)     # projection attempts made, per kind


def _unlink_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


@dataclass
class Workload:
    mix: Mix
    prepared: list[tuple[str, bytes, str]]         # (subject, payload, event id) of the mix, pre-encoded
    starts_prepared: list[tuple[str, bytes, str]]  # the read views' run.started events, pre-encoded
    api_ids: list[str]


def build_workload(args: argparse.Namespace) -> Workload:
    from ledger.core.events import encode_event, subject_of

    mix = generate_mix(args.events, args.runs, args.seed)
    starts, api_ids = generate_starts(args.api_runs, args.seed + 1)
    return Workload(mix, [(subject_of(e), encode_event(e), e.id) for e in mix.events],
                    [(subject_of(e), encode_event(e), e.id) for e in starts], api_ids)


async def run_bench(args: argparse.Namespace, url: str, work: Path, wl: Workload, say: Any,
                    on_interrupt: Any) -> tuple[Figures, Mix]:
    from ledger.nats.stream import connect

    # Ctrl-C / SIGTERM while the loop runs: cancel this task, so every finally block below runs.
    cancel_on_interrupt(on_interrupt)

    mix, prepared, starts_prepared, api_ids = wl.mix, wl.prepared, wl.starts_prepared, wl.api_ids
    rng = random.Random(args.seed + 2)
    same_reader = projector_reader()
    nc = await connect(url, name="ledger-bench", reconnect=False)
    fig = Figures(reader=same_reader.__name__)
    try:
        js = nc.jetstream()
        js_raw = nc.jetstream(publish_async_max_pending=20_000)  # the Publisher's default in-flight window
        n = len(mix.events)
        for rep in range(args.reps):
            tag = f"[rep {rep + 1}/{args.reps}]"
            # Publish: both orders alternate across reps, each on a fresh stream.
            order = ["publisher", "raw", "wire"] if rep % 2 == 0 else ["wire", "raw", "publisher"]
            for which in order:
                await fresh_stream(js)
                if which == "publisher":
                    secs = await bench_publisher(nc, mix.events)
                    fig.publisher.append(n / secs)
                elif which == "raw":
                    secs = await bench_raw_publish(js_raw, prepared)
                    fig.raw_publish.append(n / secs)
                else:
                    secs = await bench_bare_publish(nc, prepared)
                    fig.wire_publish.append(n / secs)
                await check_stream(js, n)
                say(f"{tag} publish {which:9s} {n / secs:>10,.0f} ev/s")
            # Projection of the same stream, fresh database files, order alternating across reps:
            # the project's Projector, ceiling B (OrderedReader) and, when the Projector reads with
            # another reader, ceiling B with that reader. Every run is checked complete; a run that
            # lost events is reported, its rate discarded, and retried up to --attempts times.
            kinds = ["projector", "raw"] + (["raw-same"] if same_reader is not OrderedReader else [])
            order = kinds if rep % 2 == 0 else kinds[::-1]
            for which in order:
                for attempt in range(1, args.attempts + 1):
                    db = work / f"{which}-{rep}-{attempt}.sqlite"
                    fig.attempts[which] = fig.attempts.get(which, 0) + 1
                    try:
                        if which == "projector":
                            secs = await bench_projector(js, db, n)
                            states = view_states(db)
                            fig.state_check = {"projected": dict(states), "match": states == mix.expected_states}
                        else:
                            secs = await bench_raw_projector(js, db, n, same_reader if which == "raw-same" else None)
                    except LostEvents as exc:
                        fig.lost.append(f"rep {rep + 1} {which}: {exc}")
                        say(f"{tag} project {which:9s} LOST EVENTS: {exc}")
                        continue
                    finally:
                        _unlink_db(db)
                    {"projector": fig.projector, "raw": fig.raw_projector, "raw-same": fig.raw_same}[which].append(n / secs)
                    say(f"{tag} project {which:9s} {n / secs:>10,.0f} ev/s")
                    break
            # Reads: a fresh stream of run.started events for api_runs distinct runs, projected, then served.
            await fresh_stream(js)
            await bench_raw_publish(js_raw, starts_prepared)
            await check_stream(js, len(starts_prepared))
            for attempt in range(1, args.attempts + 1):
                db = work / f"api-{rep}-{attempt}.sqlite"
                fig.attempts["read-views"] = fig.attempts.get("read-views", 0) + 1
                try:
                    secs = await bench_projector(js, db, len(starts_prepared))
                except LostEvents as exc:
                    fig.lost.append(f"rep {rep + 1} read-views: {exc}")
                    say(f"{tag} read views: LOST EVENTS: {exc}")
                    _unlink_db(db)
                    continue
                fig.api_projection.append(len(starts_prepared) / secs)
                break
            else:
                say(f"{tag} no complete read views after {args.attempts} attempts: skipping the read benchmark")
                continue
            try:
                count = _count(db, "runs")
                if count != args.api_runs:
                    raise RuntimeError(f"views hold {count} runs, expected {args.api_runs}")
                ids = [rng.choice(api_ids) for _ in range(args.warmup + args.gets)]
                p50, p99, bad = await bench_api(db, ids, args.warmup)
            finally:
                _unlink_db(db)
            fig.api_p50.append(p50)
            fig.api_p99.append(p99)
            fig.api_failures.append(bad)
            say(f"{tag} GET /runs/{{id}} over {count:,} runs: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                + (f", {bad} FAILED" if bad else ""))
    finally:
        with contextlib.suppress(Exception):  # the server may be gone already (interrupted)
            await asyncio.wait_for(nc.close(), 5)
    return fig, mix


def summarize(args: argparse.Namespace, fig: Figures, mix: Mix, info: dict[str, Any], command: str,
              wall: float) -> dict[str, Any]:
    def block(project: list[float], raw: list[float]) -> dict[str, Any]:
        mp_, mr = median(project), median(raw)
        return {"project": mp_, "ceiling": mr, "ratio": mp_ / mr,
                "project_reps": project, "ceiling_reps": raw,
                "paired_ratios": [a / b for a, b in zip(project, raw)]}

    total = sum(mix.type_counts.values())
    shipped_runs = fig.attempts.get("projector", 0)
    return {
        "command": command,
        "params": {"events": args.events, "runs": args.runs, "api_runs": args.api_runs, "gets": args.gets,
                   "warmup": args.warmup, "reps": args.reps, "seed": args.seed, "attempts": args.attempts},
        "machine": info,
        "mix": {"types": dict(mix.type_counts.most_common()),
                "heartbeat_share": mix.type_counts["run.heartbeat"] / total,
                "sweeps": mix.n_sweeps, "expected_final_states": dict(mix.expected_states)},
        "publish_events_per_s": block(fig.publisher, fig.raw_publish),
        "publish_vs_wire_ceiling_events_per_s": block(fig.publisher, fig.wire_publish),
        "projector_reader": fig.reader,
        "projection_events_per_s": {
            **block(fig.projector, fig.raw_projector),
            "complete_runs": len(fig.projector), "runs": shipped_runs,
        },
        "projection_vs_same_reader_events_per_s": (
            {**block(fig.projector, fig.raw_same), "reader": fig.reader} if fig.reader != "OrderedReader" else None),
        "get_run_ms": {"p50": median(fig.api_p50), "p99": median(fig.api_p99), "p50_reps": fig.api_p50,
                       "p99_reps": fig.api_p99, "failures": sum(fig.api_failures),
                       "views_runs": args.api_runs, "gets_per_rep": args.gets},
        "read_views_projection_events_per_s": {"median": median(fig.api_projection), "reps": fig.api_projection},
        "state_check": {"expected": dict(mix.expected_states), **fig.state_check},
        "projection_attempts": fig.attempts,
        "lost_events": fig.lost,
        "wall_seconds": wall,
    }


def render(s: dict[str, Any]) -> str:
    def reps(xs: list[float], fmt: str) -> str:
        return " / ".join(format(x, fmt) for x in xs) if xs else "-"

    def row(label: str, d: dict[str, Any], fmt: str = ",.0f", note: str = "") -> str:
        left = reps(d["project_reps"], fmt)
        return (f"{label:<46}{format(d['project'], fmt):>11}{format(d['ceiling'], fmt):>11}{d['ratio']:>7.2f}   "
                f"{left} | {reps(d['ceiling_reps'], fmt)}{note}")

    p, w, g = s["publish_events_per_s"], s["publish_vs_wire_ceiling_events_per_s"], s["get_run_ms"]
    q, qs = s["projection_events_per_s"], s["projection_vs_same_reader_events_per_s"]
    m, par, mix, chk = s["machine"], s["params"], s["mix"], s["state_check"]
    shipped_note = f"   [{q['complete_runs']} of {q['runs']} runs complete]" if q["complete_runs"] < q["runs"] else ""
    rdr = s["projector_reader"]
    lines = [
        "run-ledger foundation benchmark",
        f"command : {s['command']}",
        f"machine : nproc={m['nproc']} (affinity {m['affinity']}), {m['cpu']}, {m['platform']}",
        (f"software: Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, msgspec {m['msgspec']}, "
         f"SQLite {m['sqlite']}; temp dir on {m['tmp_fs']}"),
        (f"load    : loadavg at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
         f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))} (a shared, noisy 2-core machine)"),
        (f"workload: {par['events']:,} events over {par['runs']:,} runs and {mix['sweeps']} sweeps "
         f"(heartbeats {mix['heartbeat_share']:.1%}); median of {par['reps']} reps, fresh stream + DB each"),
        "          " + ", ".join(f"{k} {v:,}" for k, v in mix["types"].items()),
        "",
        f"{'figure':<46}{'project':>11}{'ceiling':>11}{'ratio':>7}   per rep: project | ceiling",
        "-" * 124,
        row("publish, Publisher (events/s)", p),
        row("  same, against the wire ceiling", w),
        row(f"projection, Projector/{rdr} (events/s)", q, note=shipped_note),
        *([row(f"  same, against ceiling B with {rdr}", qs)] if qs else []),
        f"{'GET /runs/{id} p50 (ms)':<46}{g['p50']:>11.2f}{'':>11}{'':>7}   {reps(g['p50_reps'], '.2f')}",
        f"{'GET /runs/{id} p99 (ms)':<46}{g['p99']:>11.2f}{'':>11}{'':>7}   {reps(g['p99_reps'], '.2f')}",
        "-" * 124,
        ("ceiling A (publish): raw nats-py js.publish_async of the same pre-encoded payloads, Nats-Msg-Id header, "
         "20,000 in flight"),
        ("wire ceiling (extra): core nc.publish, reply subjects under one wildcard inbox, acks counted not parsed, "
         "20,000 in flight"),
        ("ceiling B (projection): OrderedReader (ordered push consumer, bench/common.py) + msgspec.json.Decoder(AnyEvent)"
         " + sqlite3.executemany of (seq, id, type, payload), 5,000/txn"
         + (f"; second ceiling B: the same with {rdr}, the reader the Projector uses" if qs else "")),
        (f"reads   : {g['gets_per_rep']:,} sequential keep-alive GETs per rep (httpx in a separate process, after "
         f"{par['warmup']} warm-up) of random ids among {g['views_runs']:,} projected runs; failures {g['failures']}"),
        (f"          building those views projected run.started-only streams at "
         f"{s['read_views_projection_events_per_s']['median']:,.0f} events/s "
         f"(reps {reps(s['read_views_projection_events_per_s']['reps'], ',.0f')})"),
    ]
    if "match" in chk:
        verdict = "match" if chk["match"] else "DO NOT MATCH"
        lines.append(f"check   : Projector: final run states {verdict} the contract's: {chk['projected']}")
    else:
        lines.append("check   : no complete Projector run to check final run states on")
    attempts = s["projection_attempts"]
    if s["lost_events"]:
        lines += [f"LOSSES  : {len(s['lost_events'])} projection run(s) lost events (runs made: "
                  + ", ".join(f"{k} {v}" for k, v in attempts.items()) + "); rates are from complete runs only:",
                  *(f"          - {x}" for x in s["lost_events"])]
    else:
        lines.append("losses  : none (every projection run checked complete: "
                     + ", ".join(f"{k} {v}" for k, v in attempts.items()) + ")")
    lines.append(f"wall    : {s['wall_seconds']:.0f} s")
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
    ap.add_argument("--attempts", type=int, default=3,
                    help="projection attempts per rep when a run loses events (each loss is reported)")
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

    from ledger.nats.server import EmbeddedNats, free_port

    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()
    say = progress_printer(started, err)

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/foundation.py", *argv])

    # Ctrl-C / SIGTERM: outside the event loop the first one raises KeyboardInterrupt; inside it,
    # run_bench's loop handlers cancel the run so that every finally block runs. Later ones are ignored.
    interrupts = Interrupts()
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    nats = EmbeddedNats(work / "nats", port=free_port())
    try:
        info = machine_info(work, ("nats-py", "msgspec"))
        say(f"generating {args.events:,} events over {args.runs:,} runs and {args.api_runs:,} run starts "
            f"(seed {args.seed})")
        workload = build_workload(args)
        url = nats.start()
        say(f"nats-server at {url}, data in {work}")
        fig, mix = asyncio.run(run_bench(args, url, work, workload, say, interrupts.first))
        interrupts.rearm()  # asyncio.run put the defaults back
        summary = summarize(args, fig, mix, info, command, time.perf_counter() - started)
        summary["machine"]["loadavg_end"] = os.getloadavg()
        if args.json:
            print(json.dumps(summary))
        else:
            print(render(summary))
        return 0
    except BaseException:
        if not interrupts.interrupted:
            raise
        err.print("interrupted: cleaning up")  # whatever the interrupt surfaced as (nats-py converts some)
        return 130
    finally:
        with interrupts.cleaning_up():
            nats.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
