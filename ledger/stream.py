"""The NATS/JetStream adapter: connecting, provisioning the ``LEDGER`` stream,
and reading it in order from a sequence.

Library errors are translated here into the ledger's error tree.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime, timezone
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


async def connect(url: str, *, name: str = "run-ledger", reconnect: bool = True, timeout: float = 2.0) -> NATS:
    """Connect to NATS; a server that cannot be reached is StreamUnavailable."""
    try:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=timeout,
            allow_reconnect=reconnect,
            max_reconnect_attempts=-1 if reconnect else 0,
            reconnect_time_wait=0.5,
            error_cb=_quiet,
            disconnected_cb=_quiet_cb,
            reconnected_cb=_quiet_cb,
            closed_cb=_quiet_cb,
        )
    except Exception as exc:  # nats-py raises several unrelated types on connect
        raise StreamUnavailable(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from exc


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


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc).replace(microsecond=(ns // 1000) % 1_000_000)


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
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
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


