#!/usr/bin/env python
"""Job-side benchmark of run-ledger (issue 3): ``ledger run`` wrapper overhead and heartbeat cost.

Starts its own embedded nats-server (temp dir, free port, the LEDGER stream via
``ensure_stream``) and measures:

1. wrapper overhead: wall time of ``ledger run -- true`` (the console script,
   as a user runs it, with ``LEDGER_NATS_URL`` at the bench server,
   ``LEDGER_SPOOL`` in the temp dir and no ``--run-id``: a fresh ULID each
   time) minus that of ``true`` alone, medians of ``--reps`` runs after
   ``--warmup`` warm-ups, every command interleaved in a shuffled order per
   rep. Bytecode is cached as a user has it, under the temp dir
   (``PYTHONPYCACHEPREFIX``: the tree gets no ``__pycache__``). Context: bare
   ``python -c pass``, ``python -I -S -c pass`` (the wrapper's gate child is
   such an interpreter), ``python -c "import ledger.cli"`` and ``...
   ledger.cli, ledger.jobs.wrapper`` (every import ``ledger run`` makes), the
   wrapper with ``PYTHONDONTWRITEBYTECODE=1`` (as some sandboxes set it) and,
   as a what-if, with ``gc.freeze()`` at exit. Breakdown: the same ``ledger
   run -- true`` under a harness that wraps project functions from outside
   (no edits) and stamps CLOCK_MONOTONIC at each phase; and ``-X importtime``
   of the real command, own time by package;
2. heartbeat cost: ONE client process (a child of this one; the nats-server is
   another) with one ``AsyncLedger`` starts ``--runs`` runs with
   ``heartbeat=--heartbeat`` (each run heartbeats in the background), lets
   them settle, then measures over a ``--window`` s steady state: its own CPU
   (``getrusage(RUSAGE_SELF)`` user+sys over wall, as % of one core, split by
   thread), its RSS, the heartbeats the stream stored (message count delta,
   read by this process), the spool backlog (sampled from outside every 0.5 s
   by this process, and counted by the client at the window's end). Then every
   run exits 0 and the client closes with a drain; the stream is checked to
   hold one run.started and one run.exited per run and the spool to be empty.

Usage:
    .venv/bin/python bench/jobs.py             # full run (~1 min)
    .venv/bin/python bench/jobs.py --quick     # smoke run (~20 s)
    .venv/bin/python bench/jobs.py --json      # figures as one JSON object
    .venv/bin/python bench/jobs.py --profile   # also a cProfile'd heartbeat window: where the client's CPU goes
    .venv/bin/python bench/jobs.py --what-if   # also the heartbeat part with Spool.remove batched (client-side patch)
    .venv/bin/python bench/jobs.py --only wrapper|heartbeat

Exit status: 0 when every target is met, 1 when one is missed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    Interrupts,
    cancel_on_interrupt,
    ledger_command,
    machine_info,
    median,
    progress_printer,
    rss_kib,
    verdict,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WRAPPER_TARGET_MS = 150.0
CPU_TARGET_PCT = 100.0
TARGET_RUNS = 2000
RATE_MIN_SHARE = 0.95  # achieved heartbeats/s must be at least this share of runs / period
NOTABLE_IMPORTS = ("ledger.cli", "ledger.jobs.wrapper", "ledger.cli.audit", "ledger.cli.serve",
                   "ledger.cli.events", "click", "asyncio", "nats", "nats.js.api", "msgspec", "ulid",
                   "importlib.metadata", "aiosqlite", "anyio", "gzip", "ssl")
NO_PYC = "ledger run -- true, PYTHONDONTWRITEBYTECODE=1, no cache dir"
WHAT_IF = "ledger run -- true, gc.freeze() at exit [what-if]"  # the same, the final GC skipped


def ms(ns: float) -> float:
    return ns / 1e6


# --------------------------------------------------------------------------- 1. wrapper overhead

# Runs ``ledger run`` exactly as the console script does, but first wraps project
# functions (from outside, nothing edited) to stamp CLOCK_MONOTONIC (system-wide, so
# comparable with the parent's stamps) when each phase ends. Marks go to $BENCH_MARKS at exit.
HARNESS = r"""
import time
T0 = time.monotonic_ns()
import atexit, json, os, sys
marks = {"ready": T0}
def mark(name):
    marks[name] = time.monotonic_ns()
import ledger.cli
mark("import ledger.cli")
import ledger.jobs.wrapper
mark("import ledger.jobs.wrapper")
import asyncio, asyncio.subprocess
import ledger.jobs.client, ledger.nats.connection, ledger.nats.publisher, ledger.jobs.spool

def stamp(owner, name, label):
    orig = getattr(owner, name, None)
    if orig is None:  # renamed in the tree since: that phase merges into the next one
        return
    async def wrapped(*args, **kwargs):
        try:
            return await orig(*args, **kwargs)
        finally:
            marks.setdefault(label, time.monotonic_ns())  # the first call only
    setattr(owner, name, wrapped)

orig_main = ledger.jobs.wrapper.Wrapper.main
async def main(self):
    mark("main>")
    try:
        return await orig_main(self)
    finally:
        mark("main<")
ledger.jobs.wrapper.Wrapper.main = main
stamp(ledger.jobs.spool.Spool, "open", "spool open<")
stamp(ledger.nats.connection.Connection, "try_connect", "nats connect<")
stamp(ledger.jobs.client.AsyncLedger, "connect", "connect<")
stamp(asyncio, "create_subprocess_exec", "spawn<")
stamp(ledger.jobs.client, "load_run", "load_run<")
stamp(ledger.nats.publisher.Publisher, "publish", "publish<")
stamp(ledger.jobs.client.AsyncLedger, "start_run", "start_run<")
stamp(ledger.jobs.wrapper.Wrapper, "_watch_kills", "watch<")
stamp(asyncio.subprocess.Process, "wait", "wait<")
stamp(ledger.jobs.client.AsyncRunHandle, "exited", "exited<")
stamp(ledger.jobs.client.AsyncLedger, "close", "close<")

@atexit.register
def dump():
    mark("atexit")
    with open(os.environ["BENCH_MARKS"], "w") as f:
        json.dump(marks, f)

_exit = os._exit
def exit_now(code):  # ``ledger run`` leaves with os._exit, which skips atexit: dump the marks first
    dump()
    _exit(code)
os._exit = exit_now

mark("patched")
sys.argv = ["ledger", *sys.argv[1:]]
ledger.cli.main()
"""

# (label, from mark, to mark): consecutive, so they add up to the whole invocation.
PHASES = [
    ("python startup (exec, site, venv)", "spawn", "ready"),
    ("import ledger.cli (click, commands)", "ready", "import ledger.cli"),
    ("import ledger.jobs.wrapper (client, nats, aiosqlite, ulid)", "import ledger.cli", "import ledger.jobs.wrapper"),
    ("[harness: wrapping functions]", "import ledger.jobs.wrapper", "patched"),
    ("click dispatch, asyncio.run start", "patched", "main>"),
    ("open spool (SQLite, WAL, schema)", "main>", "spool open<"),
    ("connect to NATS", "spool open<", "nats connect<"),
    ("connect: rest (outbox task)", "nats connect<", "connect<"),
    ("spawn gate child (python -I -S)", "connect<", "spawn<"),
    ("start_run: load_run (fold own subjects)", "spawn<", "load_run<"),
    ("start_run: publish run.started, await ack", "load_run<", "publish<"),
    ("start_run rest + subscribe to kills", "publish<", "watch<"),
    ("child: gate released -> exec true -> exit", "watch<", "wait<"),
    ("run.exited into the spool", "wait<", "exited<"),
    ("close: drain to NATS, disconnect, close spool", "exited<", "close<"),
    ("asyncio.run teardown, atexit", "close<", "atexit"),
    ("interpreter shutdown, reaped by parent", "atexit", "end"),
]


def timed(cmd: list[str], env: dict[str, str], *, marks_file: Path | None = None) -> tuple[int, int, str]:
    """Wall ns from spawn to reaped, return code, stderr."""
    if marks_file is not None:
        env = {**env, "BENCH_MARKS": str(marks_file)}
    t0 = time.perf_counter_ns()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          check=False)
    return time.perf_counter_ns() - t0, proc.returncode, proc.stderr.decode(errors="replace")


def bench_wrapper(args: argparse.Namespace, url: str, work: Path, say: Any) -> dict[str, Any]:
    py = sys.executable
    true = shutil.which("true") or "/bin/true"
    ledger = ledger_command()
    spool = work / "wrapper-spool.db"
    # Bytecode as a user has it (compiled once, then cached), kept under the temp dir so that the
    # tree gets no __pycache__; the warm-ups fill it. PYTHONDONTWRITEBYTECODE (set in some sandboxes)
    # would make every run compile the project's modules again: shown as a row of its own.
    env = {**os.environ, "LEDGER_NATS_URL": url, "LEDGER_SPOOL": str(spool),
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    for key in ("LEDGER_RUN_ID", "LEDGER_SWEEP_ID", "LEDGER_ATTEMPT", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    env_nocache = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    env_nocache.pop("PYTHONPYCACHEPREFIX")
    commands = {
        "true": [true],
        "ledger run -- true": [*ledger, "run", "--", "true"],
        NO_PYC: [*ledger, "run", "--", "true"],
        WHAT_IF: [py, "-c", ("import atexit, gc, sys; atexit.register(gc.freeze); from ledger.cli import main; "
                            "sys.argv[0] = 'ledger'; sys.exit(main())"), "run", "--", "true"],
        "python -c pass": [py, "-c", "pass"],
        "python -I -S -c pass": [py, "-I", "-S", "-c", "pass"],
        "python -c 'import ledger.cli'": [py, "-c", "import ledger.cli"],
        "python -c 'import ledger.cli, ledger.jobs.wrapper'": [py, "-c", "import ledger.cli, ledger.jobs.wrapper"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    problems: list[str] = []
    rng = random.Random(args.seed)
    names = list(commands)
    wrapper_calls = 0
    for rep in range(-args.warmup, args.reps):
        rng.shuffle(names)
        for name in names:
            wall, rc, err = timed(commands[name], env_nocache if name == NO_PYC else env)
            if name in ("ledger run -- true", WHAT_IF, NO_PYC):
                wrapper_calls += 1
                if rc != 0 or "unreachable" in err or "error" in err:
                    problems.append(f"ledger run -- true: exit {rc}: {err.strip()}")
            elif rc != 0:
                problems.append(f"{name}: exit {rc}: {err.strip()}")
            if rep >= 0:
                times[name].append(ms(wall))
        if rep >= 0 and (rep + 1) % 5 == 0:
            say(f"wrapper: {rep + 1}/{args.reps} reps, ledger run -- true median so far "
                f"{median(times['ledger run -- true']):.1f} ms")

    # Breakdown: the harness, then -X importtime of the real command.
    harness_cmd = [py, "-c", HARNESS, "run", "--", "true"]
    marks_file = work / "marks.json"
    phase_ms: dict[str, list[float]] = defaultdict(list)
    harness_problems: list[str] = []
    harness_total: list[float] = []
    for rep in range(-1, args.breakdown_reps):
        marks_file.unlink(missing_ok=True)
        spawn = time.monotonic_ns()
        wall, rc, err = timed(harness_cmd, env, marks_file=marks_file)
        end = time.monotonic_ns()
        wrapper_calls += 1
        if rc != 0 or not marks_file.exists():
            harness_problems.append(f"harness: exit {rc}: {err.strip()[-300:]}")
            continue
        if rep < 0:
            continue
        marks = {**json.loads(marks_file.read_text()), "spawn": spawn, "end": end}
        harness_total.append(ms(wall))
        for label, a, b in PHASES:
            if a in marks and b in marks:
                phase_ms[label].append(ms(marks[b] - marks[a]))
    say(f"wrapper: breakdown over {args.breakdown_reps} instrumented runs done")

    # -X importtime: own ("self") time summed by top-level package (they add up to the total),
    # and the cumulative time of a few modules worth naming.
    by_package: dict[str, list[float]] = defaultdict(list)
    notable: dict[str, list[float]] = defaultdict(list)
    import_totals: list[float] = []
    for rep in range(args.importtime_reps):
        wall, rc, err = timed([py, "-X", "importtime", *ledger_command_py(), "run", "--", "true"], env)
        wrapper_calls += 1
        own: dict[str, float] = defaultdict(float)
        for line in err.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if not m:
                continue
            name = m.group(4)
            own[name.split(".")[0]] += int(m.group(1)) / 1000
            if name in NOTABLE_IMPORTS:
                notable[name].append(int(m.group(2)) / 1000)
        import_totals.append(sum(own.values()))
        for package, value in own.items():
            by_package[package].append(value)
    for package, values in by_package.items():  # absent from a rep: 0
        values.extend([0.0] * (args.importtime_reps - len(values)))
    top_imports = sorted(((name, median(v)) for name, v in by_package.items()), key=lambda x: -x[1])

    t_ledger, t_true = median(times["ledger run -- true"]), median(times["true"])
    return {
        "commands": {name: shlex.join(cmd) for name, cmd in commands.items()},
        "bytecode_cache": str(work / "pycache"),
        "tree_has_pyc": any((ROOT / "ledger").rglob("*.pyc")),
        "median_ms": {name: median(v) for name, v in times.items()},
        "min_ms": {name: min(v) for name, v in times.items() if v},
        "max_ms": {name: max(v) for name, v in times.items() if v},
        "reps_ms": times,
        "overhead_ms": t_ledger - t_true,
        "target_ms": WRAPPER_TARGET_MS,
        "pass": (t_ledger - t_true) < WRAPPER_TARGET_MS and not problems,
        "breakdown_ms": {label: median(phase_ms[label]) for label, _, _ in PHASES if phase_ms.get(label)},
        "harness_total_ms": median(harness_total),
        "importtime_total_ms": median(import_totals),
        "importtime_own_by_package_ms": dict(top_imports[:14]),
        "importtime_cumulative_ms": {name: median(notable[name]) for name in NOTABLE_IMPORTS if notable.get(name)},
        "wrapper_invocations": wrapper_calls,
        "problems": problems,
        "harness_problems": harness_problems,
        "spool": str(spool),
    }


def ledger_command_py() -> list[str]:
    """``ledger`` run by this interpreter (so ``-X importtime`` applies): the console script's code."""
    return ["-c", "import sys; from ledger.cli import main; sys.argv[0] = 'ledger'; sys.exit(main())"]


# --------------------------------------------------------------------------- 2. heartbeat cost (client)

def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _proc_io() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value)
    return out


async def _loop_lag(every: float, lags: list[float]) -> None:
    """How late the event loop wakes a sleeper (ms): its latency for every other task too."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(every)
        lags.append(1000 * (loop.time() - t0 - every))


def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user+sys) of each thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _patch_spool_remove() -> None:
    """What-if (this process only, the project's file untouched): ``Spool.remove`` deletes its rows in
    one transaction. As it stands, each row's DELETE autocommits: one WAL commit and fdatasync per row."""
    from ledger.jobs.spool import Spool

    async def remove(self: Any, ids: Any) -> None:
        if ids:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    Spool.remove = remove  # type: ignore[method-assign]


async def heartbeat_client(cfg: dict[str, Any]) -> None:
    """The measured process: one AsyncLedger, ``runs`` runs heartbeating every ``heartbeat`` s."""
    import gc

    from ledger.jobs.client import AsyncLedger

    if cfg.get("what_if_remove"):
        _patch_spool_remove()
    ledger = await AsyncLedger.connect(cfg["url"], spool=cfg["spool"])
    if not ledger.connected:
        raise SystemExit(f"client: NATS unreachable at {cfg['url']}")
    _emit({"phase": "connected", "rss": rss_kib()})
    handles = []
    t0 = time.perf_counter()
    for i in range(cfg["runs"]):
        handles.append(await ledger.start_run(f"{cfg['prefix']}-{i:05d}", heartbeat=cfg["heartbeat"],
                                              command=["bench/jobs.py", "heartbeat-client"]))
    start_s = time.perf_counter() - t0
    gc.collect()
    _emit({"phase": "started", "runs": len(handles), "seconds": start_s, "rss": rss_kib()})
    await asyncio.sleep(cfg["settle"])

    profiler = None
    if cfg.get("profile"):
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU time of the event-loop thread, not wall time
    main_tid = threading.get_native_id()
    lags: list[float] = []
    lag_task = asyncio.get_running_loop().create_task(_loop_lag(0.05, lags))
    io0 = _proc_io()
    sent0 = ledger.outbox.sent
    threads0 = _thread_cpu()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    pt0 = time.process_time()
    w0 = time.monotonic()
    _emit({"phase": "window_start"})
    if profiler:
        profiler.enable()
    await asyncio.sleep(cfg["window"])
    if profiler:
        profiler.disable()
    w1 = time.monotonic()
    pt1 = time.process_time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    threads1 = _thread_cpu()
    io1 = _proc_io()
    sent1 = ledger.outbox.sent
    lag_task.cancel()
    lags.sort()
    _emit({"phase": "window_end"})
    spool_rows = await ledger.spool.count()
    wall = w1 - w0
    by_thread = {tid: threads1[tid] - threads0.get(tid, 0.0) for tid in threads1}
    main_cpu = by_thread.pop(main_tid, 0.0)
    result = {
        "wall_s": wall,
        "user_s": ru1.ru_utime - ru0.ru_utime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        "process_time_s": pt1 - pt0,
        "main_thread_cpu_s": main_cpu,
        "other_threads_cpu_s": sum(by_thread.values()),
        "threads": len(threads1),
        "vol_ctx_switches": ru1.ru_nvcsw - ru0.ru_nvcsw,
        "invol_ctx_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
        "fs_writes": ru1.ru_oublock - ru0.ru_oublock,
        "write_syscalls": io1.get("syscw", 0) - io0.get("syscw", 0),
        "write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0),
        "loop_lag_ms": {"p50": lags[len(lags) // 2], "p99": lags[int(0.99 * (len(lags) - 1))], "max": lags[-1],
                        "samples": len(lags)} if lags else None,
        "sent_in_window": sent1 - sent0,
        "spool_rows_at_window_end": spool_rows,
        "rss": rss_kib(),
    }
    if profiler:
        profiler.dump_stats(cfg["profile"])
    # Wind down as a job would: every run exits 0, then a bounded drain.
    t0 = time.perf_counter()
    await asyncio.gather(*(h.exited(0, wait=0) for h in handles))
    result["exit_all_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["close_drained"] = await ledger.close(drain=60.0)
    result["close_s"] = time.perf_counter() - t0
    _emit({"phase": "done", "result": result})


def client_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    try:
        asyncio.run(heartbeat_client(cfg))
    except KeyboardInterrupt:
        return 130
    return 0


# --------------------------------------------------------------------------- 2. heartbeat cost (driver)

def proc_cpu_s(pid: int) -> float:
    """User+sys CPU seconds of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spool_rows(path: Path) -> int | None:
    """Rows in the spool file, read from outside the client (WAL: readers do not block its writer)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(con.execute("SELECT count(*) FROM spool").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None


async def run_heartbeat_client(args: argparse.Namespace, url: str, work: Path, server_pid: int, say: Any,
                               *, profile: Path | None = None, window: float | None = None,
                               what_if_remove: bool = False) -> dict[str, Any]:
    from ledger.nats.stream import connect

    window = window if window is not None else args.window
    tag = f"hb{random.Random().getrandbits(32):08x}"
    spool = work / f"{tag}-spool.db"
    cfg = {"url": url, "spool": str(spool), "runs": args.runs, "heartbeat": args.heartbeat, "settle": args.settle,
           "window": window, "prefix": tag, "profile": str(profile) if profile else None,
           "what_if_remove": what_if_remove}
    nc = await connect(url, name="ledger-bench-jobs", reconnect=False)
    js = nc.jetstream()
    errlog = work / f"{tag}-client.stderr"
    proc = None
    out: dict[str, Any] = {"what_if_remove": what_if_remove, "runs": args.runs, "heartbeat_s": args.heartbeat, "window_s": window,
                           "settle_s": args.settle, "spool": str(spool)}
    samples: list[int] = []
    try:
        err_fd = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--_client", json.dumps(cfg),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_fd)
        finally:
            os.close(err_fd)
        out["client_pid"] = proc.pid
        assert proc.stdout is not None
        sampler: asyncio.Task[None] | None = None
        before = (await js.stream_info("LEDGER")).state.messages

        async def sample() -> None:
            while True:
                n = await asyncio.to_thread(spool_rows, spool)
                if n is not None:
                    samples.append(n)
                await asyncio.sleep(0.5)

        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            phase = msg["phase"]
            if phase == "connected":
                out["rss_connected_kib"] = msg["rss"]["VmRSS"]
                say(f"heartbeat: client {proc.pid} connected, starting {args.runs:,} runs "
                    f"(heartbeat {args.heartbeat:g} s)")
            elif phase == "started":
                out["start_s"] = msg["seconds"]
                out["rss_started_kib"] = msg["rss"]["VmRSS"]
                say(f"heartbeat: {msg['runs']:,} runs started in {msg['seconds']:.1f} s; settling {args.settle:g} s, "
                    f"then a {window:g} s window{' (cProfile on)' if profile else ''}")
            elif phase == "window_start":
                m0, t0 = (await js.stream_info("LEDGER")).state.messages, time.monotonic()
                client0, server0 = proc_cpu_s(proc.pid), proc_cpu_s(server_pid)
                sampler = asyncio.create_task(sample())
            elif phase == "window_end":
                m1, t1 = (await js.stream_info("LEDGER")).state.messages, time.monotonic()
                client1, server1 = proc_cpu_s(proc.pid), proc_cpu_s(server_pid)
                if sampler:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                out["stored_in_window"] = m1 - m0
                out["observed_window_s"] = t1 - t0
                out["stored_per_s"] = (m1 - m0) / (t1 - t0)
                out["client_cpu_pct_outside"] = 100 * (client1 - client0) / (t1 - t0)
                out["server_cpu_pct"] = 100 * (server1 - server0) / (t1 - t0)
                say(f"heartbeat: window over: {out['stored_per_s']:,.0f} heartbeats/s stored; winding down")
            elif phase == "done":
                out["client"] = msg["result"]
        rc = await proc.wait()
        proc = None
        if rc != 0 or "client" not in out:
            raise RuntimeError(f"heartbeat client exited {rc}: {errlog.read_text(errors='replace')[-2000:]}")
        after = await js.stream_info("LEDGER")
        for kind in ("started", "exited"):
            info = await js.stream_info("LEDGER", subjects_filter=f"ledger.run.*.{kind}")
            out[f"stream_{kind}"] = sum(n for subject, n in (info.state.subjects or {}).items()
                                        if subject.startswith(f"ledger.run.{tag}-"))
        out["stream_total"] = after.state.messages - before
        out["spool_rows_after"] = spool_rows(spool)
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
    c = out["client"]
    cpu = c["user_s"] + c["sys_s"]
    out["cpu_pct"] = 100 * cpu / c["wall_s"]
    out["cpu_us_per_heartbeat"] = 1e6 * cpu / max(1, out["stored_in_window"])
    nominal = args.runs / args.heartbeat
    out["nominal_per_s"] = nominal
    out["cpu_pct_at_target"] = out["cpu_pct"] * (TARGET_RUNS / args.runs)  # linear projection, for --runs != 2000
    out["spool_backlog_max"] = max(samples) if samples else None
    out["spool_backlog_median"] = median([float(x) for x in samples]) if samples else None
    out["spool_samples"] = len(samples)
    out["rate_ok"] = out["stored_per_s"] >= RATE_MIN_SHARE * nominal
    out["drained_ok"] = (c["spool_rows_at_window_end"] <= nominal * args.heartbeat and c["close_drained"]
                         and out["spool_rows_after"] == 0 and out["stream_started"] == args.runs
                         and out["stream_exited"] == args.runs)
    out["cpu_ok"] = out["cpu_pct_at_target"] < CPU_TARGET_PCT
    out["pass"] = out["cpu_ok"] and out["rate_ok"] and out["drained_ok"]
    return out


def profile_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Top functions by own time, and own time grouped by area, from a cProfile dump."""
    import pstats

    st = pstats.Stats(str(path))
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0

    def area(file: str, func: str) -> str:
        if file == "~":
            return f"builtin {func.strip('<>')}" if "method" not in func else "builtin methods"
        for key in ("ledger/", "aiosqlite", "nats/", "asyncio/", "ulid", "msgspec", "threading", "queue",
                    "selectors", "datetime", "json", "sqlite3"):
            if key in file:
                return key.rstrip("/")
        return Path(file).name

    areas: dict[str, float] = defaultdict(float)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in raw.items():
        areas[area(file, func)] += tt
        short = file
        for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
            if marker in short:
                short = short.split(marker, 1)[1]
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct,
                     "own_pct": 100 * tt / total})
    rows.sort(key=lambda r: -r["tottime_s"])
    cum = sorted(rows, key=lambda r: -r["cumtime_s"])
    return {"total_s": total, "top_own": rows[:top],
            "top_cumulative": [dict(r, cum_pct=100 * r["cumtime_s"] / total) for r in cum[:top]],
            "by_area_pct": dict(sorted(((k, 100 * v / total) for k, v in areas.items()), key=lambda x: -x[1]))}


# --------------------------------------------------------------------------- driver

def render_heartbeat(h: dict[str, Any]) -> list[str]:
    c = h["client"]
    wall = c["wall_s"]
    per_run = (h["rss_started_kib"] - h["rss_connected_kib"]) / h["runs"]
    lines = [
        (f"   start : {h['runs']:,} start_run() one after another in {h['start_s']:.1f} s "
         f"({h['runs'] / h['start_s']:,.0f}/s), then {h['settle_s']:g} s to settle"),
        (f"   CPU   : user {c['user_s']:.2f} s + sys {c['sys_s']:.2f} s over {wall:.1f} s = {h['cpu_pct']:.1f}% of one "
         f"core (process_time {100 * c['process_time_s'] / wall:.1f}%, /proc from outside "
         f"{h['client_cpu_pct_outside']:.1f}%); {h['cpu_us_per_heartbeat']:.0f} us per stored heartbeat"),
        (f"           event-loop thread {100 * c['main_thread_cpu_s'] / wall:.1f}%, {c['threads'] - 1} other "
         f"thread(s) (aiosqlite's) {100 * c['other_threads_cpu_s'] / wall:.1f}%; context switches "
         f"{c['vol_ctx_switches'] / wall:,.0f}/s voluntary, {c['invol_ctx_switches'] / wall:,.0f}/s involuntary; "
         f"writes {c['write_syscalls'] / wall:,.0f} syscalls/s, {c['write_bytes'] / wall / 1e6:.1f} MB/s to disk"),
    ]
    lag = c["loop_lag_ms"]
    if lag:
        lines.append(f"           event-loop lag (a 50 ms sleeper woken late by): p50 {lag['p50']:.1f} ms, p99 "
                     f"{lag['p99']:.1f} ms, max {lag['max']:.1f} ms ({lag['samples']} samples)")
    lines += [
        (f"   memory: RSS {h['rss_connected_kib'] / 1024:.1f} MiB connected, {h['rss_started_kib'] / 1024:.1f} MiB "
         f"with {h['runs']:,} runs ({per_run:.1f} KiB/run), {c['rss']['VmRSS'] / 1024:.1f} MiB at window end, "
         f"peak {c['rss']['VmHWM'] / 1024:.1f} MiB"),
        (f"   rate  : {h['stored_in_window']:,} heartbeats stored ({h['stored_per_s']:,.0f}/s of {h['nominal_per_s']:,.0f}"
         f" nominal; the outbox counted {c['sent_in_window']:,} sent in the client's window); nats-server used "
         f"{h['server_cpu_pct']:.1f}% of a core"),
        (f"   spool : backlog sampled {h['spool_samples']} times from outside: median {h['spool_backlog_median']:.0f}, "
         f"max {h['spool_backlog_max']} rows; {c['spool_rows_at_window_end']} at window end; all runs exited 0 in "
         f"{c['exit_all_s']:.2f} s; close drained={c['close_drained']} in {c['close_s']:.2f} s"),
    ]
    return lines


def render(s: dict[str, Any]) -> str:
    m, p = s["machine"], s["params"]
    out: list[str] = []
    add = out.append

    def figure(label: str, value: str, target: str, ok: bool, detail: str) -> None:
        add(f"{label:<56}{value:>12}  {target:<18}{verdict(ok):<6}{detail}")

    add("run-ledger jobs benchmark (issue 3: wrapper overhead, heartbeat cost)")
    add(f"command : {s['command']}")
    add(f"machine : nproc={m['nproc']} (affinity {m['affinity']}), {m['cpu']}, {m['platform']}")
    add(f"software: Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}, aiosqlite {m['aiosqlite']}, "
        f"SQLite {m['sqlite']}; temp dir (spools) on {m['tmp_fs']}")
    load0 = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    load1 = ", ".join(f"{x:.2f}" for x in m.get("loadavg_end", ()))
    add(f"load    : loadavg at start {load0}, at end {load1} (other work on this machine shares its cores)")
    add("")
    add(f"{'figure':<56}{'value':>12}  {'target':<18}{'result':<6}detail")
    add("-" * 132)
    w, h = s.get("wrapper"), s.get("heartbeat")
    if w:
        figure("wrapper overhead: ledger run -- true minus true", f"{w['overhead_ms']:.1f} ms",
               f"< {w['target_ms']:.0f} ms", w["pass"],
               f"median {w['median_ms']['ledger run -- true']:.1f} - {w['median_ms']['true']:.1f} ms, "
               f"{p['reps']} reps each after {p['warmup']} warm-up(s)")
    if h:
        at_target = h["runs"] == TARGET_RUNS
        scaled = "" if at_target else f"; projected to {TARGET_RUNS:,} runs from {h['cpu_pct']:.1f}% (linear)"
        figure(f"heartbeat client CPU, {h['runs']:,} runs at {1 / h['heartbeat_s']:g} Hz",
               f"{h['cpu_pct'] if at_target else h['cpu_pct_at_target']:.1f} %", f"< {CPU_TARGET_PCT:.0f}% of 1 core",
               h["cpu_ok"], f"user+sys / wall in the client over {h['client']['wall_s']:.1f} s{scaled}")
        figure("heartbeats stored in the stream", f"{h['stored_per_s']:,.0f} /s",
               f">= {RATE_MIN_SHARE * h['nominal_per_s']:,.0f}/s", h["rate_ok"],
               f"nominal {h['nominal_per_s']:,.0f}/s; {h['stored_in_window']:,} in {h['observed_window_s']:.1f} s")
        c = h["client"]
        figure("spool stayed drained (rows: window end / max sampled)",
               f"{c['spool_rows_at_window_end']} / {h['spool_backlog_max']}", "< 1 s of beats", h["drained_ok"],
               f"0 after close: {h['spool_rows_after']}; stream: {h['stream_started']:,} started, "
               f"{h['stream_exited']:,} exited")
    add("-" * 132)
    if w:
        add("")
        add("1. wrapper: wall time, spawn to reaped (ms); every command once per rep, in a shuffled order")
        add(f"   {'command':<56}{'median':>9}{'min':>9}{'max':>9}")
        for name, value in w["median_ms"].items():
            add(f"   {name:<56}{value:>9.1f}{w['min_ms'][name]:>9.1f}{w['max_ms'][name]:>9.1f}")
        add(f"   ledger = {w['commands']['ledger run -- true']}; LEDGER_NATS_URL at the bench server, LEDGER_SPOOL in "
            "the temp dir, no --run-id (a fresh ULID each time); bytecode cached under the temp dir "
            f"(PYTHONPYCACHEPREFIX; {'ledger/ has .pyc files' if w['tree_has_pyc'] else 'ledger/ itself has no .pyc'})")
        add("")
        add(f"   breakdown: median of {p['breakdown_reps']} runs of `ledger run -- true` under an outside harness "
            f"(total {w['harness_total_ms']:.1f} ms; the phases add up to it)")
        for label, value in w["breakdown_ms"].items():
            add(f"   {label:<56}{value:>9.1f} ms")
        add("")
        add(f"   -X importtime of `ledger run -- true` (median of {p['importtime_reps']}; importtime inflates times): "
            f"{w['importtime_total_ms']:.1f} ms of imports in all")
        add("   own time by package: " + ", ".join(f"{k} {v:.1f}" for k, v in w["importtime_own_by_package_ms"].items()))
        add("   cumulative (incl. what they import first): "
            + ", ".join(f"{k} {v:.1f}" for k, v in w["importtime_cumulative_ms"].items()))
        problems = f"; PROBLEMS: {w['problems'][:3]}" if w["problems"] else ""
        if w["harness_problems"]:
            problems += f"; breakdown harness failed: {w['harness_problems'][:2]}"
        add(f"   checks: {w['wrapper_invocations']} wrapper invocations; the stream got "
            f"{s.get('wrapper_stream_messages', '?')} events from them (run.started + run.exited each); "
            f"spool left: {s.get('wrapper_spool_rows', '?')} rows{problems}")
    if h:
        add("")
        add(f"2. heartbeat: one client process (pid {h['client_pid']}), one AsyncLedger, {h['runs']:,} runs started "
            f"with heartbeat={h['heartbeat_s']:g}")
        out.extend(render_heartbeat(h))
        wi = h.get("what_if")
        if wi:
            add("")
            add(f"2b. WHAT-IF, not the project as it is: the same with Spool.remove patched in the client process to "
                f"delete a batch in one transaction (pid {wi['client_pid']})")
            add(f"   CPU {wi['cpu_pct']:.1f}% of one core, {wi['stored_per_s']:,.0f} heartbeats/s stored, spool rows at "
                f"window end {wi['client']['spool_rows_at_window_end']} / max sampled {wi['spool_backlog_max']}: "
                f"would be {verdict(wi['pass'])}")
            out.extend(render_heartbeat(wi))
    prof = s.get("profile")
    if prof:
        total = prof["total_s"]
        add("")
        add(f"3. profile: cProfile of the client's event-loop thread over a {prof['window_s']:g} s window "
            f"({total:.2f} s of own time; CPU under the profiler {prof['cpu_pct']:.0f}%)")
        add("   own time by area: " + ", ".join(f"{k} {v:.1f}%" for k, v in list(prof["by_area_pct"].items())[:12]))
        for title, key in (("by own time", "top_own"), ("by cumulative time", "top_cumulative")):
            add(f"   {'top functions ' + title:<90}{'calls':>9}{'own %':>8}{'cum %':>8}")
            for r in prof[key][:20]:
                add(f"   {r['function'][:90]:<90}{r['calls']:>9,}{r['own_pct']:>8.1f}{100 * r['cumtime_s'] / total:>8.1f}")
    add("")
    add(f"wall    : {s['wall_seconds']:.0f} s")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="timed runs of each command (default 20; quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs of each command first (default 2; quick 1)")
    ap.add_argument("--breakdown-reps", type=int, default=None, help="instrumented wrapper runs (default 10; quick 3)")
    ap.add_argument("--importtime-reps", type=int, default=None, help="-X importtime runs (default 5; quick 1)")
    ap.add_argument("--runs", type=int, default=None, help="concurrent heartbeating runs (default 2000; quick 500)")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat period of each run, s (default 1)")
    ap.add_argument("--window", type=float, default=None, help="steady-state window, s (default 20; quick 5)")
    ap.add_argument("--settle", type=float, default=None, help="wait after the last start, s (default 3; quick 2)")
    ap.add_argument("--only", choices=["wrapper", "heartbeat"], default=None, help="run one part only")
    ap.add_argument("--profile", action="store_true",
                    help="also run a second heartbeat window under cProfile and print where the client's time goes")
    ap.add_argument("--what-if", action="store_true",
                    help="also run the heartbeat part with Spool.remove patched (in the client only) to delete a "
                         "batch in one transaction, to size that fix")
    ap.add_argument("--seed", type=int, default=20250303, help="seed of the interleaving order")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer reps, 500 runs, 5 s window")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--_client", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = ({"reps": 5, "warmup": 1, "breakdown_reps": 3, "importtime_reps": 1, "runs": 500, "window": 5.0,
                 "settle": 2.0} if args.quick else
                {"reps": 20, "warmup": 2, "breakdown_reps": 10, "importtime_reps": 5, "runs": 2000, "window": 20.0,
                 "settle": 3.0})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.reps, args.runs, args.breakdown_reps, args.importtime_reps) < 1 or args.window <= 0 \
            or args.heartbeat <= 0 or args.warmup < 0 or args.settle < 0:
        ap.error("counts and durations must be positive")
    return args


async def setup_stream(url: str) -> None:
    from ledger.nats.stream import connect, ensure_stream

    nc = await connect(url, name="ledger-bench-jobs", reconnect=False)
    try:
        await ensure_stream(nc.jetstream())
    finally:
        await nc.close()


async def stream_messages(url: str) -> int:
    from ledger.nats.stream import connect

    nc = await connect(url, name="ledger-bench-jobs", reconnect=False)
    try:
        return int((await nc.jetstream().stream_info("LEDGER")).state.messages)
    finally:
        await nc.close()


async def heartbeat_phase(args: argparse.Namespace, url: str, work: Path, server_pid: int, say: Any,
                          on_interrupt: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    cancel_on_interrupt(on_interrupt)
    result = await run_heartbeat_client(args, url, work, server_pid, say)
    if args.what_if:
        say("heartbeat: again, with the what-if Spool.remove (one transaction per batch) patched into the client")
        result["what_if"] = await run_heartbeat_client(args, url, work, server_pid, say, what_if_remove=True)
    prof = None
    if args.profile:
        path = work / "client.prof"
        window = min(args.window, 10.0)
        profiled = await run_heartbeat_client(args, url, work, server_pid, say, profile=path, window=window)
        prof = {**profile_summary(path), "window_s": window, "cpu_pct": profiled["cpu_pct"]}
    return result, prof


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._client is not None:
        return client_main(args._client)
    from ledger.nats.server import EmbeddedNats, free_port

    started = time.perf_counter()
    say = progress_printer(started)

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/jobs.py", *argv])

    # Ctrl-C / SIGTERM: outside the event loop the first one raises KeyboardInterrupt; inside it,
    # heartbeat_phase's handlers cancel the task so every finally block runs. Later ones are ignored.
    interrupts = Interrupts()
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-jobs-"))
    nats = EmbeddedNats(work / "nats", port=free_port())
    try:
        info = machine_info(work, ("nats-py", "aiosqlite"))
        url = nats.start()
        assert nats.process is not None
        asyncio.run(setup_stream(url))
        say(f"nats-server at {url} (pid {nats.process.pid}), data in {work}")
        summary: dict[str, Any] = {"command": command, "machine": info,
                                   "params": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
        if args.only in (None, "wrapper"):
            before = asyncio.run(stream_messages(url))
            summary["wrapper"] = bench_wrapper(args, url, work, say)
            summary["wrapper_stream_messages"] = asyncio.run(stream_messages(url)) - before
            summary["wrapper_spool_rows"] = spool_rows(work / "wrapper-spool.db")
            expected = 2 * summary["wrapper"]["wrapper_invocations"]
            if summary["wrapper_stream_messages"] != expected or summary["wrapper_spool_rows"]:
                summary["wrapper"]["problems"].append(
                    f"stream got {summary['wrapper_stream_messages']} events from the wrappers, expected {expected}; "
                    f"spool left {summary['wrapper_spool_rows']} rows")
                summary["wrapper"]["pass"] = False
        if args.only in (None, "heartbeat"):
            hb, prof = asyncio.run(heartbeat_phase(args, url, work, nats.process.pid, say, interrupts.first))
            interrupts.rearm()  # asyncio.run put the defaults back
            summary["heartbeat"] = hb
            if prof:
                summary["profile"] = prof
        summary["machine"]["loadavg_end"] = os.getloadavg()
        summary["wall_seconds"] = time.perf_counter() - started
        passed = [part["pass"] for part in (summary.get("wrapper"), summary.get("heartbeat")) if part]
        summary["pass"] = all(passed)
        print(json.dumps(summary) if args.json else render(summary))
        return 0 if summary["pass"] else 1
    except BaseException:
        if not interrupts.interrupted:
            raise
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with interrupts.cleaning_up():
            nats.stop()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
