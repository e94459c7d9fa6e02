"""Helpers shared by the benchmark scripts in bench/ (foundation, jobs, sweeps, replay).

The scripts run as ``python bench/NAME.py``, so this directory is on ``sys.path``
(also in their children: a subprocess running a bench script, or a
multiprocessing 'spawn' child, which gets the parent's ``sys.path``).
Only the standard library is imported at module level (modules the scripts
loaded before anyway); the project's and third-party imports stay inside the
functions that need them, so a child that reports its memory loads nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- statistics

def median(xs: list[float]) -> float:
    """The median, or NaN for no values."""
    return float(statistics.median(xs)) if xs else float("nan")


def nearest_rank(xs: list[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank method (``xs`` need not be sorted), or NaN for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def verdict(ok: bool) -> str:
    """A target met or missed, as the reports print it."""
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------- progress and interrupts

def progress_printer(started: float | None, console: Any = None) -> Callable[[str], None]:
    """``say(msg)``: one progress line on stderr, after the seconds since ``started`` (perf_counter)
    unless that is None. Through ``console`` (a rich Console on stderr) when given: the seconds
    dimmed, the message escaped (a console needs ``started``)."""
    if console is not None:
        from rich.markup import escape

        assert started is not None

        def say_rich(msg: str) -> None:
            console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/dim] {escape(msg)}")

        return say_rich

    def say(msg: str) -> None:
        if started is None:
            print(msg, file=sys.stderr, flush=True)
        else:
            print(f"{time.perf_counter() - started:6.1f}s {msg}", file=sys.stderr, flush=True)

    return say


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """Ctrl-C / SIGTERM for a benchmark's main(), handled from construction on.

    Outside an event loop the first one raises KeyboardInterrupt; later ones are ignored
    (``interrupted`` stays True, so main() can tell an interrupt from a failure). Inside a
    loop, ``cancel_on_interrupt(interrupts.first)`` cancels the running task instead, so
    every finally block runs. ``asyncio.run`` puts the default handlers back: ``rearm()``
    after it; main()'s final cleanup runs ``with interrupts.cleaning_up():``.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in INTERRUPT_SIGNALS}

    def first(self) -> bool:
        """Record an interrupt; True for the first one only."""
        first, self.interrupted = not self.interrupted, True
        return first

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.first():
            raise KeyboardInterrupt

    def rearm(self) -> None:
        """Handle the signals again (after ``asyncio.run``, which put the defaults back)."""
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, self._on_signal)

    @contextlib.contextmanager
    def cleaning_up(self) -> Iterator[None]:
        """For main()'s final cleanup: the signals ignored during the block, then the handlers
        there were before put back."""
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)


def cancel_on_interrupt(on_interrupt: Callable[[], bool]) -> None:
    """Called from a task in a running loop: SIGINT/SIGTERM cancel that task when ``on_interrupt()`` says True."""
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if on_interrupt():
            me.cancel()  # type: ignore[union-attr]

    for sig in INTERRUPT_SIGNALS:
        loop.add_signal_handler(sig, interrupt)


# --------------------------------------------------------------------------- this machine and process

def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def nats_server_version(*, timeout: float | None = 10, best_effort: bool = True) -> str:
    """``nats-server --version``; when ``best_effort``, "unknown (why)" rather than an exception."""
    from ledger.nats.server import nats_server_binary

    try:
        return subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                              timeout=timeout, check=False).stdout.strip()
    except Exception as exc:  # machine info is best effort, unless told otherwise
        if not best_effort:
            raise
        return f"unknown ({exc})"


def filesystem_of(path: Path) -> str:
    """The file system type of ``path`` (``df -T``), or "unknown"."""
    try:
        df = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=5, check=False)
        return df.stdout.splitlines()[-1].split()[1]
    except Exception:  # noqa: BLE001 - machine info is best effort
        return "unknown"


def machine_info(work: Path, packages: tuple[str, ...] = ("nats-py",)) -> dict[str, Any]:
    """The machine and software a report names: cores, CPU, versions (``packages``: distributions,
    keyed with "_" for "-"), the file system of ``work`` and the load average now."""
    from importlib.metadata import version

    nats_v = nats_server_version()
    cpu = cpu_model()
    fs = filesystem_of(work)
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "python": platform.python_version(),
        "nats_server": nats_v,
        **{name.replace("-", "_"): version(name) for name in packages},
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "tmp_fs": fs,
        "loadavg_start": os.getloadavg(),
    }


def rss_kib() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in KiB, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def ledger_command() -> list[str]:
    """``ledger`` as a user runs it: the venv's console script, else ``python -m ledger.cli``."""
    script = Path(sys.executable).parent / "ledger"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ledger.cli"]


# --------------------------------------------------------------------------- the raw projection ceiling

RAW_BATCH = 5000


class RawCeiling:
    """The raw projection ceiling: ordered read + ``msgspec`` decode + stdlib ``sqlite3.executemany``
    of one raw row per event (seq, entity id, type, payload) into one table, RAW_BATCH per transaction.

    Construction (untimed) makes the decoder and the database file (WAL, synchronous=NORMAL: the
    durability the project's views use); ``run`` is the timed part; ``close`` closes the database.
    """

    @staticmethod
    def modules() -> tuple[Any, Any]:
        """``msgspec`` and ``ledger.core.events``, imported (replay.py's ceiling child imports them first
        thing, before it connects, as its memory after imports has always been measured)."""
        import msgspec

        from ledger.core import events

        return msgspec, events

    def __init__(self, db_path: Path) -> None:
        msgspec, events = self.modules()
        self.decode = msgspec.json.Decoder(events.AnyEvent).decode
        self.con = sqlite3.connect(db_path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, entity_id TEXT NOT NULL, "
                         "type TEXT NOT NULL, payload BLOB NOT NULL)")

    async def run(self, js: Any, total: int, reader_cls: type, timeout: float,
                  stalled: Callable[[int], Exception]) -> tuple[float, int]:
        """Read seqs 1..``total`` with ``reader_cls(js, 1)`` into the table: (seconds from the reader's
        creation to the last commit, last seq committed). An empty batch after ``timeout`` s raises
        ``stalled(last seq committed)``."""
        from ledger.core.events import RunEvent

        decode, con = self.decode, self.con
        insert = "INSERT INTO events (seq, entity_id, type, payload) VALUES (?, ?, ?, ?)"
        t0 = time.perf_counter()
        reader = reader_cls(js, 1)
        await reader.start()
        try:
            rows: list[tuple[int, str, str, bytes]] = []
            done = 0
            while done < total:
                batch = await reader.next_batch(RAW_BATCH - len(rows), timeout)
                if not batch:
                    raise stalled(done)
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
        return elapsed, done

    def count(self) -> int:
        """Rows in the table."""
        return int(self.con.execute("SELECT count(*) FROM events").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self.con.close()


# --------------------------------------------------------------------------- a ceiling's reader

from collections import deque  # noqa: E402

from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext, api  # noqa: E402

from ledger.nats.stream import STREAM, StreamMessage, ns_to_datetime, parse_js_reply  # noqa: E402


class OrderedReader:
    """An ordered push consumer from ``start_seq``, buffered into batches.

    Messages arrive in stream order; the buffer holds at most ``max_buffer``
    messages, beyond which the subscription callback waits (flow control
    then holds the server back).
    """

    def __init__(self, js: JetStreamContext, start_seq: int, *, stream: str = STREAM,
                 subject: str = "ledger.>", max_buffer: int = 20_000) -> None:
        self.js = js
        self.start_seq = max(1, start_seq)
        self.stream = stream
        self.subject = subject
        self.max_buffer = max_buffer
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None
        self.last_pending = -1

    async def start(self) -> None:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start_seq,
        )
        self._sub = await self.js.subscribe(
            self.subject, stream=self.stream, ordered_consumer=True, config=config,
            cb=self._on_msg, idle_heartbeat=2.0,
            pending_msgs_limit=4 * self.max_buffer, pending_bytes_limit=256 * 1024 * 1024,
        )

    async def _on_msg(self, msg: Msg) -> None:
        self._buffer.append(msg)
        self._arrived.set()
        while len(self._buffer) >= self.max_buffer:
            self._drained.clear()
            await self._drained.wait()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def next_batch(self, max_size: int, timeout: float | None) -> list[StreamMessage]:
        """Up to ``max_size`` messages in stream order; [] when none came within ``timeout``."""
        if not self._buffer:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
        buf = self._buffer
        out: list[StreamMessage] = []
        for _ in range(min(max_size, len(buf))):
            msg = buf.popleft()
            seq, ns, pending = parse_js_reply(msg.reply)
            out.append(StreamMessage(seq, ns_to_datetime(ns), msg.subject, msg.data, msg.headers, pending))
        if out:
            self.last_pending = out[-1].pending
        self._drained.set()
        return out

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        self._drained.set()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be gone; nothing to clean then
                pass
