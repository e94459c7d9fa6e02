#!/usr/bin/env python
"""Start-up cost of the job path: ``ledger run -- true`` against ``python -c pass``, and what it imports.

Starts its own embedded nats-server (temp dir, free port, the LEDGER stream)
and times, as wall time from spawn to reaped, interleaved in a shuffled order
per rep (medians of ``--reps`` after ``--warmup`` warm-ups):

- ``python -c pass`` (this venv's interpreter: the floor),
- ``python -c "import ledger.cli"`` (the group, no verb loaded),
- ``python -c "from ledger.jobs.client import AsyncLedger"`` (the Python client),
- ``ledger --help`` (every verb's module loaded, to list them),
- ``ledger run -- true`` (the console script, a fresh run id each time, its
  spool in the temp dir): connect, check the start, spawn the child behind
  its gate, publish run.started and run.exited, wait for the acks.

Each also with its CPU time (user + sys of the process and the children it
reaped, from ``getrusage``), which other work on the machine hardly changes.
The figure is ``ledger run -- true`` minus ``python -c pass`` in wall time
(target < 150 ms); on a busy machine read the CPU figures beside it.
Then one ``python -X importtime`` run of ``ledger run -- true``: the top own
import costs by top-level package, and a check that nothing from the server,
tables or audit side (``IMPORTS_NOT_ON_THE_JOB_PATH``) was imported.

Usage:
    .venv/bin/python bench/startup.py              # 15 reps (~30 s)
    .venv/bin/python bench/startup.py --reps 30
    .venv/bin/python bench/startup.py --json

Exit status: 0 when the target is met and the job path is light, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import machine_info, median, verdict

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_MS = 150.0
IMPORTS_NOT_ON_THE_JOB_PATH = ("litestar", "uvicorn", "rich", "prometheus_client", "httpx", "projections",
                               "ledger.nats.archive", "ledger.cli.tables", "ledger.cli.audit", "ledger.cli.serve",
                               "ledger.cli.query", "ledger.cli.events", "ledger.cli.sweep")


def ledger_script() -> str:
    script = Path(sys.executable).parent / "ledger"
    if not script.exists():
        sys.exit(f"no ledger console script beside {sys.executable}: pip install -e . first")
    return str(script)


def timed_ms(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall ms from spawn to reaped, and the CPU ms (user + sys) of the process and the children it reaped.

    CPU time hardly moves when other work shares the cores; wall time does.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter_ns()
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    elapsed = (time.perf_counter_ns() - t0) / 1e6
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return elapsed, cpu


def import_costs(env: dict[str, str]) -> tuple[dict[str, float], float, list[str]]:
    """One ``-X importtime`` run of ``ledger run -- true``: own ms by top-level package, total ms, modules seen."""
    code = "import sys; from ledger.cli import main; sys.argv[0] = 'ledger'; sys.exit(main())"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, "run", "--", "true"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    own: dict[str, float] = defaultdict(float)
    modules: list[str] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:"):].split("|"))
        modules.append(name)
        own[name.split(".")[0]] += int(self_us) / 1000
    return dict(sorted(own.items(), key=lambda kv: -kv[1])), sum(own.values()), modules


async def make_stream(url: str) -> None:
    from ledger.nats.stream import connect, ensure_stream

    nc = await connect(url, reconnect=False)
    try:
        await ensure_stream(nc.jetstream())
    finally:
        await nc.close()


def measure(args: argparse.Namespace, work: Path, url: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"LEDGER_NATS_URL": url, "LEDGER_SPOOL": str(work / "spool.db"),
                "PYTHONPYCACHEPREFIX": str(work / "pycache")})  # bytecode compiled once, then cached, as a user has it
    py = sys.executable
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "import ledger.cli": [py, "-c", "import ledger.cli"],
        "import ledger.jobs.client": [py, "-c", "from ledger.jobs.client import AsyncLedger"],
        "ledger --help": [ledger_script(), "--help"],
        "ledger run -- true": [ledger_script(), "run", "--", "true"],
    }
    for _ in range(args.warmup):
        for cmd in commands.values():
            timed_ms(cmd, env)
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.reps):
        order = list(commands.items())
        random.shuffle(order)
        for name, cmd in order:
            wall, used = timed_ms(cmd, env)
            times[name].append(wall)
            cpu[name].append(used)
        print(f"rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    medians = {name: median(times[name]) for name in commands}
    cpu_medians = {name: median(cpu[name]) for name in commands}
    own, total, modules = import_costs(env)
    heavy = sorted({m for m in modules for bad in IMPORTS_NOT_ON_THE_JOB_PATH if m == bad or m.startswith(bad + ".")})
    overhead = medians["ledger run -- true"] - medians["python -c pass"]
    return {"reps": args.reps, "medians_ms": medians, "cpu_medians_ms": cpu_medians, "overhead_ms": overhead,
            "cpu_overhead_ms": cpu_medians["ledger run -- true"] - cpu_medians["python -c pass"],
            "loadavg_end": os.getloadavg(), "target_ms": TARGET_MS,
            "importtime_total_ms": total, "importtime_own_by_package_ms": dict(list(own.items())[:12]),
            "heavy_imports": heavy, "pass": overhead < TARGET_MS and not heavy}


def render(result: dict[str, Any], machine: dict[str, Any]) -> str:
    load = machine.get("loadavg_start", ["?"])[0]
    lines = ["run-ledger start-up benchmark (the job path)",
             f"machine: {machine.get('cpu', '?')}, {machine.get('nproc', '?')} CPUs, load {load}, "
             f"python {machine.get('python', '?')}",
             f"median of {result['reps']}:     wall (spawn to reaped)   CPU (user + sys, with children)"]
    lines += [f"  {name:<24} {ms:7.1f} ms {result['cpu_medians_ms'][name]:21.1f} ms"
              for name, ms in result["medians_ms"].items()]
    lines.append(f"ledger run -- true over python -c pass: {result['overhead_ms']:.1f} ms wall "
                 f"(target < {result['target_ms']:g} ms)  {verdict(result['overhead_ms'] < result['target_ms'])}; "
                 f"{result['cpu_overhead_ms']:.1f} ms CPU")
    lines.append(f"load average at the end: {result['loadavg_end'][0]:.2f} (wall times stretch with it)")
    lines.append(f"-X importtime of ledger run -- true: {result['importtime_total_ms']:.1f} ms own time in all; "
                 "top packages:")
    lines += [f"  {name:<24} {ms:7.1f} ms" for name, ms in result["importtime_own_by_package_ms"].items()]
    lines.append("server/tables/audit modules on the job path: "
                 + (", ".join(result["heavy_imports"]) if result["heavy_imports"] else "none  PASS"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed runs of each command (>= 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if args.reps < 10:
        parser.error("--reps must be at least 10")
    from ledger.nats.server import EmbeddedNats, free_port

    work = Path(tempfile.mkdtemp(prefix="ledger-bench-startup-"))
    server = EmbeddedNats(work / "nats", port=free_port())
    try:
        url = server.start()
        asyncio.run(make_stream(url))
        machine = machine_info(work)
        result = measure(args, work, url)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"machine": machine, **result}, indent=2) if args.json else render(result, machine))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
