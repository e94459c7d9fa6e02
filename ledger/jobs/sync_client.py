"""The synchronous Python client: the same concepts as ``AsyncLedger``, for
ordinary (non-async) training scripts. An event loop runs in a daemon thread;
``heartbeat`` returns at once (checked first: a heartbeat the ledger would
refuse is InvalidEvent in the caller), the rest waits a bounded time.

    ledger = Ledger.connect()
    with ledger.run("train-42", sweep="s1", resume="allow") as run:
        run.heartbeat(step=10, progress=0.1)

Inside a ``ledger run -- CMD`` wrapper, ``current_run()`` attaches to the
wrapper's run without starting a new one (W&B's preemption pattern)::

    def on_sigterm(signum, frame):
        current_run().mark_preempting()
        sys.exit(128 + signum)
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from ledger.jobs.client import DEFAULT_HEARTBEAT_MIN_INTERVAL_S, AsyncLedger, AsyncRunHandle

T = TypeVar("T")
WAIT_S = 10.0


class RunHandle:
    """One attempt of one run; every method is safe to call from any thread or a signal handler."""

    def __init__(self, ledger: Ledger, handle: AsyncRunHandle) -> None:
        self._ledger = ledger
        self._handle = handle

    @property
    def run_id(self) -> str:
        return self._handle.run_id

    @property
    def attempt(self) -> int | None:
        return self._handle.attempt

    @property
    def sweep_id(self) -> str | None:
        return self._handle.sweep_id

    def heartbeat(self, step: int | None = None, progress: float | None = None, message: str | None = None) -> None:
        """Say the run is alive (with step/progress). Returns at once; never blocks the job.

        Coalesced: at most one heartbeat per ``Ledger.connect(heartbeat_min_interval=...)``
        seconds (1 s by default) goes out, with the latest step, progress and message; the
        last one goes out before the run's exit. A call in between costs a few microseconds.
        InvalidEvent (one line, nothing spooled) for a heartbeat the ledger would refuse.
        """
        event = self._handle.heartbeat_event(step=step, progress=progress, message=message)
        delay = self._handle.offer(event)
        if delay is not None:
            self._ledger._loop.call_soon_threadsafe(self._handle.schedule, delay)

    def mark_preempting(self, wait: float = 5.0) -> None:
        """Mark this attempt as preempting; waits until sent (at most ``wait`` s) or spooled."""
        self._ledger._call(self._handle.mark_preempting(wait=wait), wait + 2)

    def signalled(self, signum: int, handled: bool | None = None) -> None:
        self._ledger._fire(self._handle.signalled(signum, handled=handled))

    def stopping(self) -> None:
        self._ledger._fire(self._handle.stopping())

    def idle(self, reason: str | None = None) -> None:
        self._ledger._fire(self._handle.idle(reason))

    def exited(self, exit_code: int, signal: int | None = None) -> None:
        self._ledger._call(self._handle.exited(exit_code, signal), WAIT_S)


class Ledger:
    """A job-side connection to the ledger, usable without async code."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="run-ledger", daemon=True)
        self._thread.start()
        self._async: AsyncLedger | None = None
        self._closed = False

    @classmethod
    def connect(cls, url: str | None = None, *, spool: str | os.PathLike[str] | None = None,
                timeout: float = 2.0, heartbeat_min_interval: float = DEFAULT_HEARTBEAT_MIN_INTERVAL_S,
                creds: str | None = None, ca: str | None = None) -> Ledger:
        """Open the spool and try NATS (``url``, else ``$LEDGER_NATS_URL``, else the local default).

        At most one heartbeat per run per ``heartbeat_min_interval`` seconds is sent (0: every one).
        ``creds`` / ``ca``: the role's key and the CA file (else ``$LEDGER_NATS_CREDS`` / ``$LEDGER_NATS_CA``).
        """
        ledger = cls()
        ledger._async = ledger._call(AsyncLedger.connect(url, spool=spool, timeout=timeout,
                                                         heartbeat_min_interval=heartbeat_min_interval,
                                                         creds=creds, ca=ca),
                                     timeout + WAIT_S)
        atexit.register(ledger.close)
        return ledger

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _fire(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def aio(self) -> AsyncLedger:
        assert self._async is not None, "use Ledger.connect()"
        return self._async

    def start_run(self, run_id: str | None = None, **options: Any) -> RunHandle:
        """Publish ``run.started`` under the resume rules (see AsyncLedger.start_run)."""
        return RunHandle(self, self._call(self.aio.start_run(run_id, **options), WAIT_S * 3))

    def queue_run(self, run_id: str | None = None, **options: Any) -> str:
        return self._call(self.aio.queue_run(run_id, **options), WAIT_S * 3)

    @contextmanager
    def run(self, run_id: str | None = None, **options: Any) -> Iterator[RunHandle]:
        """Start a run for the block; exit 0 on a clean exit, non-zero when the block raises."""
        handle = self.start_run(run_id, **options)
        try:
            yield handle
        except SystemExit as exc:
            handle.exited(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
            raise
        except BaseException:
            handle.exited(1)
            raise
        else:
            handle.exited(0)

    def attach(self, run_id: str, *, attempt: int | None = None, sweep: str | None = None) -> RunHandle:
        return RunHandle(self, self.aio.attach(run_id, attempt=attempt, sweep=sweep))

    def close(self, drain: float = 5.0) -> bool:
        """Send what is spooled (at most ``drain`` s) and stop the background loop."""
        if self._closed:
            return True
        self._closed = True
        sent = self._call(self.aio.close(drain), drain + WAIT_S) if self._async is not None else True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        return sent


_current: RunHandle | None = None
_current_lock = threading.Lock()


def current_run() -> RunHandle | None:
    """The run of the enclosing ``ledger run`` wrapper (from ``LEDGER_RUN_ID``), or None outside one."""
    global _current
    run_id = os.environ.get("LEDGER_RUN_ID")
    if not run_id:
        return None
    with _current_lock:
        if _current is None or _current.run_id != run_id:
            attempt = os.environ.get("LEDGER_ATTEMPT")
            ledger = Ledger.connect()
            _current = ledger.attach(run_id, attempt=int(attempt) if attempt and attempt.isdigit() else None,
                                     sweep=os.environ.get("LEDGER_SWEEP_ID") or None)
        return _current
