"""The NATS/JetStream adapter: connecting, provisioning the ``LEDGER`` stream,
and reading it in order from a sequence.

Library errors are translated here into the ledger's error tree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Final

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ledger.errors import StreamUnavailable

STREAM: Final = "LEDGER"
SUBJECTS: Final = ["ledger.>"]
DUPLICATE_WINDOW_S: Final = 120.0
MAX_MSG_BYTES: Final = 1024 * 1024
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"


async def connect(url: str, *, name: str = "run-ledger", reconnect: bool = True, timeout: float = 2.0,
                  reconnected_cb: Callable[[], Awaitable[None]] | None = None) -> NATS:
    """Connect to NATS; a server that cannot be reached is StreamUnavailable."""
    try:
        nc = await nats.connect(
            url,
            name=name,
            connect_timeout=timeout,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # a first connect gives up after two quick tries (nats-py
            reconnect_time_wait=0.01,  # would otherwise retry it 60 times, or forever with -1)
            error_cb=_quiet,
            disconnected_cb=_quiet_cb,
            reconnected_cb=reconnected_cb or _quiet_cb,
            closed_cb=_quiet_cb,
        )
    except Exception as exc:  # nats-py raises several unrelated types on connect
        raise StreamUnavailable(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from exc
    if reconnect:  # once connected, reconnect forever (nats-py reads these at disconnect time)
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
    return nc


async def _quiet(exc: Exception) -> None:
    """nats-py logs every error to stderr by default; the ledger reports them itself."""


async def _quiet_cb() -> None:
    return None


def stream_config(name: str = STREAM) -> api.StreamConfig:
    """The stream's configuration: file storage, kept forever, a duplicate window."""
    return api.StreamConfig(
        name=name,
        subjects=SUBJECTS,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=MAX_MSG_BYTES,
        allow_direct=True,
    )


async def ensure_stream(js: JetStreamContext, name: str = STREAM) -> api.StreamInfo:
    """Create the stream, or bring an existing one to the expected config. Idempotent."""
    config = stream_config(name)
    try:
        await js.stream_info(name)
    except NotFoundError:
        return await js.add_stream(config)
    return await js.update_stream(config)


async def stream_last_seq(js: JetStreamContext, name: str = STREAM) -> int:
    """The sequence of the stream's last message (0 when empty)."""
    info = await js.stream_info(name)
    return int(info.state.last_seq)


class StreamMessage:
    """One message read from the stream: sequence, stream time, subject, raw payload."""

    __slots__ = ("seq", "recorded_at", "subject", "data", "headers", "pending")

    def __init__(self, seq: int, recorded_at: datetime, subject: str, data: bytes,
                 headers: dict[str, str] | None, pending: int) -> None:
        self.seq = seq
        self.recorded_at = recorded_at
        self.subject = subject
        self.data = data
        self.headers = headers
        self.pending = pending


def parse_js_reply(reply: str) -> tuple[int, int, int]:
    """Stream sequence, stream time (ns) and pending count from a JetStream ack subject."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4  # $JS.ACK.<stream>... or $JS.ACK.<domain>.<hash>.<stream>...
    return int(tokens[base + 3]), int(tokens[base + 5]), int(tokens[base + 6])


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)


def ns_to_datetime(ns: int) -> datetime:
    """A stream timestamp (ns since the epoch) as a UTC datetime, to the microsecond (truncated)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


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


# --------------------------------------------------------------------------- ordered pull reader

class PullReader:
    """An ordered pull consumer from ``start_seq``, with real backpressure.

    An ephemeral, in-memory, no-ack pull consumer filtered on ``subject``: the
    reader asks the server for more only while fewer than ``max_buffer``
    messages are buffered or on their way, so memory stays bounded however far
    behind it is. (A push consumer whose callback waits does not hold the
    server back with nats-py: it answers flow control on receipt, and a long
    backlog overflows the subscription, dropping messages unseen.) A gap in
    the consumer sequence (messages lost in a reconnect) or a lost consumer
    recreates the consumer just after the last message taken in: the order
    is kept and nothing is skipped.

    The same interface as ``OrderedReader``: ``start``, ``next_batch``, ``stop``.
    """

    def __init__(self, js: JetStreamContext, start_seq: int, *, stream: str = STREAM,
                 subject: str = "ledger.>", max_buffer: int = 20_000, request_batch: int = 2_000,
                 expires: float = 30.0) -> None:
        self.js = js
        self.nc: NATS = js._nc
        self.stream = stream
        self.subject = subject
        self.max_buffer = max(2, max_buffer)
        self.request_batch = max(1, min(request_batch, self.max_buffer // 2))
        self.expires = expires
        self.last_pending = -1
        self._next_seq = max(1, start_seq)  # the first stream sequence not taken in yet
        self._buffer: deque[StreamMessage] = deque()
        self._arrived = asyncio.Event()
        self._requests: deque[list[float]] = deque()  # [messages still due, deadline], oldest first
        self._consumer = ""
        self._next_subject = ""
        self._dseq = 0
        self._broken = False
        self._inbox = ""
        self._sub: object | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            self._inbox, cb=self._on_msg,
            pending_msgs_limit=4 * self.max_buffer, pending_bytes_limit=512 * 1024 * 1024)
        await self._create()

    async def _create(self) -> None:
        old, self._consumer = self._consumer, ""
        self._requests.clear()
        self._dseq = 0
        self._broken = False
        if old:
            await self._delete(old)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_seq,
            ack_policy=api.AckPolicy.NONE, filter_subject=self.subject, mem_storage=True,
            num_replicas=1, inactive_threshold=max(60.0, 2 * self.expires), max_deliver=1,
        )
        try:
            info = await self.js.add_consumer(self.stream, config)
        except Exception as exc:
            raise StreamUnavailable(f"cannot read stream {self.stream}: {exc or type(exc).__name__}") from exc
        self._consumer = info.name
        self._next_subject = f"{self.js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
        await self._pump()

    async def _delete(self, name: str) -> None:
        try:
            async with asyncio.timeout(2.0):  # not wait_for: on 3.11 it can swallow a cancellation
                await self.js.delete_consumer(self.stream, name)
        except Exception:  # gone already, or the server is away: it expires on its own
            pass

    async def _pump(self) -> None:
        """Ask for more while the buffer and the messages on their way leave room."""
        if not self._consumer or self._broken:
            return
        now = time.monotonic()
        while self._requests and self._requests[0][1] < now:
            self._requests.popleft()  # its expiry status never came (a reconnect): stop counting on it
        due = sum(int(r[0]) for r in self._requests)
        room = self.max_buffer - len(self._buffer) - due
        while room >= self.request_batch:
            request = {"batch": self.request_batch, "expires": int(self.expires * 1e9)}
            self._requests.append([self.request_batch, now + self.expires + 2.0])
            room -= self.request_batch
            try:
                await self.nc.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)
            except Exception:  # disconnected: the request deadline and the stall checks take over
                self._requests.pop()
                return

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if not msg.reply and headers and "Status" in headers:
            status = headers.get("Status")
            if status in ("404", "408", "409"):
                if self._requests:
                    self._requests.popleft()  # that request is over
                if status == "409" and "Deleted" in headers.get("Description", ""):
                    self._broken = True
                    self._arrived.set()
                    return
                await self._pump()
            return
        tokens = msg.reply.split(".")
        base = 2 if len(tokens) == 9 else 4
        if tokens[base + 1] != self._consumer or self._broken:
            return  # left over from a consumer replaced since
        dseq = int(tokens[base + 4])
        if dseq != self._dseq + 1:
            self._broken = True  # lost messages: start over from the last one taken in
            self._arrived.set()
            return
        self._dseq = dseq
        seq = int(tokens[base + 3])
        self._next_seq = seq + 1
        self._buffer.append(StreamMessage(seq, ns_to_datetime(int(tokens[base + 5])), msg.subject, msg.data,
                                          msg.headers, int(tokens[base + 6])))
        if self._requests:
            self._requests[0][0] -= 1
            if self._requests[0][0] <= 0:
                self._requests.popleft()
        self._arrived.set()

    async def next_batch(self, max_size: int, timeout: float | None) -> list[StreamMessage]:
        """Up to ``max_size`` messages in stream order; [] when none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer:
            if self._broken:
                await self._create()
            else:
                await self._pump()
            self._arrived.clear()
            if self._buffer:
                break
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return []
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
            except TimeoutError:
                pass  # wake up at least each second: request deadlines, a broken consumer
        buf = self._buffer
        pop = buf.popleft
        out = [pop() for _ in range(min(max_size, len(buf)))]
        self.last_pending = out[-1].pending
        await self._pump()
        return out

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()  # type: ignore[attr-defined]
            except Exception:  # the connection may already be gone
                pass
        if self._consumer and not self.nc.is_closed:
            await self._delete(self._consumer)
        self._consumer = ""


# --------------------------------------------------------------------------- bounded reads (audit, replay, export)

RECORDED_AT_HEADER: Final = "Ledger-Recorded-At"
"""Set by ``ledger events import``: when the ledger first recorded the message (its original stream time)."""
IMPORT_SEQ_HEADER: Final = "Ledger-Import-Seq"
"""Set by ``ledger events import``: the message's sequence in the export it came from (the resume position)."""


def recorded_at_of(msg: StreamMessage) -> datetime:
    """When the ledger recorded ``msg``: its original stream time if it was imported, else the stream's."""
    headers = msg.headers
    if headers:
        original = headers.get(RECORDED_AT_HEADER)
        if original:
            try:
                value = datetime.fromisoformat(original)
            except ValueError:
                return msg.recorded_at
            if value.tzinfo is not None:
                return value.astimezone(timezone.utc)
    return msg.recorded_at


async def last_seq_on(js: JetStreamContext, subject: str = "ledger.>", *, name: str = STREAM) -> int:
    """The sequence of the last message on ``subject`` (wildcards allowed); 0 when there is none."""
    if subject in SUBJECTS:
        return await stream_last_seq(js, name)
    try:
        msg = await js.get_last_msg(name, subject)
    except NotFoundError:
        return 0
    except Exception as exc:  # a server without wildcard last-by-subject: ask for the subjects' counts
        try:
            info = await js.stream_info(name, subjects_filter=subject)
        except Exception as exc2:
            raise StreamUnavailable(f"cannot read stream {name}: {exc2 or type(exc2).__name__}") from exc
        return int(info.state.last_seq) if info.state.subjects else 0
    return int(msg.seq or 0)


async def read_range(js: JetStreamContext, *, start_seq: int = 1, stop_seq: int | None = None,
                     subject: str = "ledger.>", batch_size: int = 5000, follow: bool = False,
                     stall_timeout: float = 10.0, name: str = STREAM,
                     max_buffer: int = 20_000) -> AsyncGenerator[list[StreamMessage], None]:
    """The messages on ``subject`` from ``start_seq``, in stream order, in batches.

    Without ``follow`` it ends after the last message on ``subject`` at or below
    ``stop_seq`` that exists when it starts (an ordered consumer filtered on
    ``subject``; never a full read for a filtered subject). With ``follow`` it
    goes on until cancelled. No message for ``stall_timeout`` seconds while more
    are due is StreamUnavailable.
    """
    stop = 0
    if not follow:
        stop = await last_seq_on(js, subject, name=name)
        if stop_seq is not None:
            stop = min(stop, stop_seq)
        if stop < max(1, start_seq):
            return
    reader = PullReader(js, start_seq, stream=name, subject=subject, max_buffer=max_buffer)
    try:
        await reader.start()
    except Exception as exc:
        raise StreamUnavailable(f"cannot read stream {name}: {exc or type(exc).__name__}") from exc
    try:
        while True:
            batch = await reader.next_batch(batch_size, 1.0 if follow else stall_timeout)
            if follow:
                if batch:
                    yield batch
                continue
            if not batch:
                raise StreamUnavailable(f"stream {name} sent nothing for {stall_timeout:g} s (reading up to seq {stop})")
            last = batch[-1]
            if last.seq >= stop or last.pending == 0:
                batch = [m for m in batch if m.seq <= stop]
                if batch:
                    yield batch
                return
            yield batch
    finally:
        await reader.stop()
