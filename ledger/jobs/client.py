"""The asynchronous Python client: a job attaches to the ledger and publishes
its own lifecycle.

    async with await AsyncLedger.connect() as ledger:
        async with ledger.run("train-42", sweep="s1", resume="allow") as run:
            await run.heartbeat(step=10, progress=0.1)

Events go through the durable spool (``ledger.jobs.spool``): publishing never
blocks the job, and NATS being down costs nothing but delay. Starts are
checked against the resume table atomically, with an expected-sequence append.

Heartbeats are coalesced (CONTRACT section 9): at most one per run per
``heartbeat_min_interval`` seconds (1 s by default; 0 sends every one) goes
out; calls in between only update the pending one (the latest step,
progress and message win), which goes out when the interval is up, and in
any case before the run's next other event (so before ``run.exited``) and
when the ledger closes. A loop calling ``run.heartbeat(step=i)`` a thousand
times a second sends one heartbeat a second. The background heartbeats of
``start_run(heartbeat=...)`` (``ledger run --heartbeat``) keep their own
interval: each takes the pending fields along and goes out at once.

An event the ledger would refuse (too large, invalid) is InvalidEvent at
once and is never spooled; every wait is bounded (``publish(wait=...)``,
``close(drain=...)``), whatever the spool or NATS does.
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from ledger.core import events as ev
from ledger.core.decide import decide_queue, decide_start
from ledger.core.events import ResumeMode, check_entity_id
from ledger.errors import ConcurrencyConflict, LedgerError, StreamUnavailable
from ledger.ids import new_id
from ledger.jobs.spool import (
    HOST,
    Outbox,
    Report,
    Spool,
    check_spoolable,
    owner_of,
    report_to_stderr,
)
from ledger.nats.connection import Connection
from ledger.nats.entity import load_run, load_sweep
from ledger.nats.stream import DEFAULT_NATS_URL

DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_HEARTBEAT_MIN_INTERVAL_S = 1.0
"""At most one heartbeat per run per this many seconds leaves a client (CONTRACT section 9)."""
DEFAULT_FRESH_WITHIN_S = 300.0
START_RETRIES = 8
START_WAIT_S = 60.0
"""How long a start waits for a stream that does not answer while NATS is connected (a cluster's leader
election takes seconds) before it gives up."""
CLOSE_S = 5.0
"""The longest closing the NATS connection may take (a dead server must not hold a job)."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def resolve_url(url: str | None) -> str:
    return url or os.environ.get("LEDGER_NATS_URL") or DEFAULT_NATS_URL


class AsyncRunHandle:
    """One attempt of one run, as its own process publishes it."""

    def __init__(self, ledger: AsyncLedger, run_id: str, attempt: int | None, sweep_id: str | None,
                 *, heartbeat_every: float | None = None) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.attempt = attempt
        self.sweep_id = sweep_id
        self.heartbeat_every = heartbeat_every
        self.started_seq = 0
        """The stream sequence of this attempt's run.started (0 when it was spooled unchecked)."""
        self.min_interval = ledger.heartbeat_min_interval
        """At most one heartbeat per this many seconds; the calls in between are coalesced."""
        self._beats: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # the sync client offers heartbeats from the job's threads
        self._pending: ev.RunHeartbeat | None = None
        self._scheduled = False
        self._last_sent = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        ledger._handles.append(self)

    def _event(self, kind: type[ev.RunEvent], **fields: Any) -> ev.AnyRunEvent:
        return kind(id=new_id(), at=now(), run_id=self.run_id, attempt=self.attempt, **fields)  # type: ignore[return-value]

    def heartbeat_event(self, step: int | None = None, progress: float | None = None,
                        message: str | None = None) -> ev.AnyRunEvent:
        """A heartbeat of this attempt, checked: InvalidEvent (one line) if the ledger would refuse it."""
        event = self._event(ev.RunHeartbeat, step=step, progress=progress, message=message)
        check_spoolable(ev.subject_of(event), ev.encode_event(event))
        return event

    async def publish_event(self, event: ev.AnyRunEvent) -> None:
        """Publish an event built by this handle (a heartbeat from ``heartbeat_event`` is coalesced); never blocks."""
        if type(event) is ev.RunHeartbeat:
            self.schedule(self.offer(event))
        else:
            await self._publish(event, wait=None)

    async def _publish(self, event: ev.AnyRunEvent, *, wait: float | None) -> None:
        self.flush()  # a pending heartbeat goes before any other event of the run
        await self.ledger.publish(event, wait=wait)

    async def heartbeat(self, step: int | None = None, progress: float | None = None,
                        message: str | None = None) -> None:
        """Say the run is alive, optionally with its step and progress (0..1). Never blocks.

        Coalesced: at most one heartbeat per ``min_interval`` seconds goes out, the latest
        fields win. InvalidEvent (nothing spooled) for a heartbeat the ledger would refuse
        (a huge message).
        """
        self.schedule(self.offer(self.heartbeat_event(step=step, progress=progress, message=message)))

    def offer(self, event: ev.AnyRunEvent) -> float | None:
        """Make ``event`` the pending heartbeat, from any thread (the latest step, progress and message
        win over the pending one's). Returns in how many seconds the pending one is due when a send must
        be scheduled (``schedule``, on the ledger's loop), None when one is scheduled already."""
        assert type(event) is ev.RunHeartbeat
        with self._lock:
            old = self._pending
            if old is not None:
                event = msgspec.structs.replace(
                    event, step=event.step if event.step is not None else old.step,
                    progress=event.progress if event.progress is not None else old.progress,
                    message=event.message if event.message is not None else old.message)
            self._pending = event
            if self._scheduled:
                return None
            self._scheduled = True
            return self._last_sent + self.min_interval - time.monotonic()

    def schedule(self, delay: float | None) -> None:
        """On the ledger's loop: send the pending heartbeat now (``delay`` <= 0) or when it is due."""
        if delay is None:
            return
        if delay <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        with self._lock:
            wait = self._last_sent + self.min_interval - time.monotonic()
        if wait > 0:  # another event flushed meanwhile: wait for the next slot
            self._timer = asyncio.get_running_loop().call_later(wait, self._due)
        else:
            self.flush()

    def flush(self) -> None:
        """On the ledger's loop: send the pending heartbeat now, if there is one."""
        with self._lock:
            event, self._pending = self._pending, None
            self._scheduled = False
            if event is not None:
                self._last_sent = time.monotonic()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if event is not None:
            self.ledger.enqueue(event)

    async def mark_preempting(self, *, wait: float = 5.0) -> None:
        """Mark this attempt as being preempted; a non-zero exit then ends the run ``preempted``.

        Waits (at most ``wait`` s) until the mark is sent, so that it precedes the exit.
        """
        await self._publish(self._event(ev.RunPreempting), wait=wait)

    async def signalled(self, signum: int, *, handled: bool | None = None) -> None:
        """Record a signal the process received."""
        name = signals.Signals(signum).name if signum in signals.Signals._value2member_map_ else None
        await self._publish(self._event(ev.RunSignalled, signal=signum, name=name, handled=handled), wait=None)

    async def stopping(self) -> None:
        await self._publish(self._event(ev.RunStopping), wait=None)

    async def idle(self, reason: str | None = None) -> None:
        await self._publish(self._event(ev.RunIdle, reason=reason), wait=None)

    async def exited(self, exit_code: int, signal: int | None = None, *, wait: float = 5.0,
                     reason: str | None = None) -> None:
        """Record the end of the process (and why, when known); waits (bounded) until it is sent or spooled."""
        await self.stop_heartbeats()
        await self._publish(self._event(ev.RunExited, exit_code=exit_code, signal=signal, reason=reason), wait=wait)
        if self in self.ledger._handles:  # nothing pending any more: close() need not flush this one
            self.ledger._handles.remove(self)

    def start_heartbeats(self) -> None:
        if self.heartbeat_every and self._beats is None:
            self._beats = asyncio.get_running_loop().create_task(self._beat_loop(self.heartbeat_every))

    async def _beat_loop(self, every: float) -> None:
        """The background heartbeat, one per ``every`` seconds whatever ``min_interval`` says (``ledger
        run --heartbeat``): it takes the pending fields along and goes out at once."""
        while True:
            await asyncio.sleep(every)
            self.offer(self.heartbeat_event())
            self.flush()

    async def stop_heartbeats(self) -> None:
        task, self._beats = self._beats, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class AsyncLedger:
    """A job-side connection to the ledger: the spool, its outbox, and NATS when it is there."""

    def __init__(self, url: str, spool: Spool, *, owner: str | None = None, report: Report = report_to_stderr,
                 heartbeat_min_interval: float = DEFAULT_HEARTBEAT_MIN_INTERVAL_S, creds: str | None = None,
                 ca: str | None = None) -> None:
        self.url = url
        self.spool = spool
        self.connection = Connection(url, creds=creds, ca=ca)
        self.outbox = Outbox(spool, owner or owner_of(os.getpid()), self.connection, report=report)
        self.heartbeat_min_interval = max(0.0, heartbeat_min_interval)
        self._tasks: list[asyncio.Task[None]] = []
        self._handles: list[AsyncRunHandle] = []

    @classmethod
    async def connect(cls, url: str | None = None, *, spool: str | os.PathLike[str] | None = None,
                      timeout: float = 2.0, report: Report = report_to_stderr,
                      heartbeat_min_interval: float = DEFAULT_HEARTBEAT_MIN_INTERVAL_S, creds: str | None = None,
                      ca: str | None = None) -> AsyncLedger:
        """Open the spool and try NATS (``url``, else ``$LEDGER_NATS_URL``, else the local default).

        ``creds``: the role's key file (else ``$LEDGER_NATS_CREDS``); ``ca``: the CA file of a ``tls://``
        server (else ``$LEDGER_NATS_CA``). Credentials the server refuses count as NATS unreachable.

        NATS being unreachable is not an error: events wait in the spool.
        ``report`` gets one line per event the server refused for good and per
        failing spool write (default: stderr). At most one heartbeat per run per
        ``heartbeat_min_interval`` seconds is sent (0: every one); the rest are coalesced.
        """
        ledger = cls(resolve_url(url), await Spool(spool).open(), report=report,
                     heartbeat_min_interval=heartbeat_min_interval, creds=creds, ca=ca)
        ledger.connection.on_connect(ledger._on_connect)
        await ledger.connection.try_connect(timeout)
        loop = asyncio.get_running_loop()
        ledger._tasks.append(loop.create_task(ledger.outbox.run()))
        if ledger.connection.nc is None:
            ledger._tasks.append(loop.create_task(ledger.connection.keep_trying()))
        return ledger

    async def _on_connect(self) -> None:
        self.outbox.kick()

    @property
    def connected(self) -> bool:
        return self.connection.publisher is not None

    async def publish(self, event: ev.AnyEvent, *, wait: float | None = None) -> None:
        """Spool the event and send it in order; with ``wait``, wait until sent (at most ``wait`` s).

        InvalidEvent at once (nothing spooled) for an event the ledger would
        refuse; with ``wait``, a LedgerError if the spool could not be written
        in that time (the event stays queued and is tried again).
        """
        durable = self.enqueue(event)
        if wait is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        try:
            async with asyncio.timeout(max(wait, 0.0) + 5.0):  # spooling gets its own few seconds, even with wait=0
                await durable
        except TimeoutError as exc:
            raise LedgerError(f"the spool {self.spool.path} took no event for {wait + 5.0:g} s") from exc
        await self.outbox.drain(max(deadline - loop.time(), 0.0))

    def enqueue(self, event: ev.AnyEvent) -> asyncio.Future[None]:
        """Queue the event to be spooled and sent, in order (on the ledger's loop); the future is done once spooled."""
        return self.outbox.put(ev.subject_of(event), ev.encode_event(event), event.id)

    async def start_run(self, run_id: str | None = None, *, sweep: str | None = None, resume: ResumeMode = "never",
                        force: bool = False, heartbeat: float | None = DEFAULT_HEARTBEAT_S,
                        fresh_within: float = DEFAULT_FRESH_WITHIN_S, config: dict[str, Any] | None = None,
                        command: list[str] | None = None, pid: int | None = None,
                        attempt: int | None = None, scheduler: dict[str, Any] | None = None) -> AsyncRunHandle:
        """Publish ``run.started`` under the resume rules and return the run's handle.

        Raises ResumeRefused (nothing appended) when the resume table, a live
        twin, or a closed sweep forbids the start. With NATS unreachable the
        start is spooled unchecked (there is nothing to check against). ``attempt`` and
        ``scheduler`` come from a batch scheduler (``ledger.jobs.schedulers``): the attempt it
        knows, and what it says of the job.
        """
        run_id = check_entity_id(run_id or new_id(), "run id")
        if sweep is not None:
            check_entity_id(sweep, "sweep id")
        fields = {"sweep_id": sweep, "resume": resume, "host": HOST, "pid": pid if pid is not None else os.getpid(),
                  "command": command if command is not None else list(sys.argv), "config": config,
                  "scheduler": scheduler}
        js = self.connection.js if self.connected else None
        if js is None:
            event = ev.RunStarted(id=new_id(), at=now(), run_id=run_id, attempt=attempt,
                                  **fields)  # type: ignore[arg-type]
            await self.publish(event, wait=0)
            handle = AsyncRunHandle(self, run_id, attempt, sweep, heartbeat_every=heartbeat)
        else:
            handle = await self._checked_start(js, run_id, sweep, resume, force, fresh_within, fields, heartbeat,
                                               attempt)
        handle.start_heartbeats()
        return handle

    async def _checked_start(self, js: Any, run_id: str, sweep: str | None, resume: ResumeMode, force: bool,
                             fresh_within: float, fields: dict[str, Any], heartbeat: float | None,
                             requested: int | None = None) -> AsyncRunHandle:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT_S
        conflicts = 0
        while conflicts < START_RETRIES:
            publisher = self.connection.publisher
            if publisher is None:
                raise StreamUnavailable(f"lost NATS at {self.url} while starting run {run_id!r}")
            try:
                run, last = await load_run(js, run_id)
                sweep_state = (await load_sweep(js, sweep))[0] if sweep is not None else None
            except StreamUnavailable:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)  # a cluster electing the stream's leader: wait (bounded) and read again
                continue
            attempt = decide_start(run, run_id, resume, sweep=sweep_state, now=now(),
                                   fresh_within=timedelta(seconds=fresh_within), force=force, attempt=requested)
            event = ev.RunStarted(id=new_id(), at=now(), run_id=run_id, attempt=attempt, **fields)
            try:
                seq = await self._publish_start(publisher, event, last, run_id, deadline)
            except ConcurrencyConflict:
                conflicts += 1
                continue  # another event of this run landed first: decide again on the new history
            handle = AsyncRunHandle(self, run_id, attempt, sweep or (run.sweep_id if run else None),
                                    heartbeat_every=heartbeat)
            handle.started_seq = seq
            return handle
        raise ConcurrencyConflict(f"run {run_id!r} kept changing while starting; gave up after {START_RETRIES} tries")

    @staticmethod
    async def _publish_start(publisher: Any, event: ev.RunStarted, last: int, run_id: str, deadline: float) -> int:
        """Publish ``run.started`` after ``last``; an unanswered publish (a leader election) is sent again, the
        same event: if the first one landed, its id makes the second a duplicate that answers its sequence."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return int(await publisher.publish(event, expect_last_subject_seq=last,
                                                   expect_subject=f"ledger.run.{run_id}.>"))
            except StreamUnavailable:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def queue_run(self, run_id: str | None = None, *, sweep: str | None = None,
                        config: dict[str, Any] | None = None, reproduced_from: str | None = None) -> str:
        """Publish ``run.queued`` for a new run (refused into a closed sweep); returns the run id."""
        run_id = check_entity_id(run_id or new_id(), "run id")
        js = self.connection.js if self.connected else None
        publisher = self.connection.publisher
        if js is None or publisher is None:
            raise StreamUnavailable(f"cannot queue a run while NATS at {self.url} is unreachable")
        for _ in range(START_RETRIES):
            run, last = await load_run(js, run_id)
            sweep_state = (await load_sweep(js, sweep))[0] if sweep is not None else None
            decide_queue(run, run_id, sweep_state)
            event = ev.RunQueued(id=new_id(), at=now(), run_id=run_id, attempt=1, sweep_id=sweep, config=config,
                                 reproduced_from=reproduced_from)
            try:
                await publisher.publish(event, expect_last_subject_seq=last, expect_subject=f"ledger.run.{run_id}.>")
            except ConcurrencyConflict:
                continue
            return run_id
        raise ConcurrencyConflict(f"run {run_id!r} kept changing while queueing it")

    def attach(self, run_id: str, *, attempt: int | None = None, sweep: str | None = None) -> AsyncRunHandle:
        """A handle on a run started elsewhere (e.g. by the ``ledger run`` wrapper): publishes nothing."""
        return AsyncRunHandle(self, check_entity_id(run_id, "run id"), attempt, sweep)

    @asynccontextmanager
    async def run(self, run_id: str | None = None, **options: Any) -> AsyncIterator[AsyncRunHandle]:
        """Start a run for the block: heartbeats in the background, exit 0 on a clean
        exit, non-zero when the block raises (the code of a SystemExit is kept)."""
        handle = await self.start_run(run_id, **options)
        try:
            yield handle
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            await handle.exited(code)
            raise
        except BaseException:
            await handle.exited(1)
            raise
        else:
            await handle.exited(0)

    async def close(self, drain: float = 5.0) -> bool:
        """Send what is spooled (at most ``drain`` s), then stop. False if some is left in the spool."""
        for handle in self._handles:
            handle.flush()  # coalesced heartbeats still pending go too
        sent = await self.outbox.drain(drain) if drain > 0 else False
        if self.outbox.unspooled:
            self.outbox.report(f"{self.outbox.unspooled} event(s) could neither be spooled nor sent and are lost "
                               f"(the spool: {self.outbox.last_error})")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.connection.close(CLOSE_S)
        try:
            async with asyncio.timeout(CLOSE_S):
                await self.spool.close()
        except Exception:
            pass  # a spool whose disk went away: what it holds is durable already
        return sent

    async def __aenter__(self) -> AsyncLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
