"""The NATS/JetStream adapter: connecting, provisioning the ``LEDGER`` stream
(``ensure_stream``, for ``ledger up`` and admin verbs) or only checking it
(``check_stream``, for read verbs: ``stream_info``, never ``update_stream``),
and reading it in order from a sequence. ``ImportedSeqs`` says which messages
an import wrote: the only ones whose ``Ledger-Recorded-At`` is honoured.

Library errors are translated here into the ledger's error tree.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final
from weakref import WeakKeyDictionary

from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR

from ledger.errors import CredentialsRefused, PermissionDenied, StreamUnavailable
from ledger.nats.auth import is_jwt_creds

STREAM: Final = "LEDGER"
SUBJECTS: Final = ["ledger.>"]
DUPLICATE_WINDOW_S: Final = 120.0
MAX_MSG_BYTES: Final = 1024 * 1024
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"


def server_urls(url: str) -> list[str]:
    """The servers of a ``--nats-url``: one URL, or a comma-separated list of a cluster's (contract section 6)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise StreamUnavailable(f"no NATS server URL in {url!r}")
    return urls


async def connect(url: str, *, name: str = "run-ledger", reconnect: bool = True, timeout: float = 2.0,
                  reconnected_cb: Callable[[], Awaitable[None]] | None = None,
                  disconnected_cb: Callable[[], Awaitable[None]] | None = None,
                  creds: str | None = None, ca: str | None = None) -> NATS:
    """Connect to NATS; a server that cannot be reached is StreamUnavailable.

    ``url`` may list several servers of a cluster, comma-separated: the first
    connect tries each, and a lost connection fails over to any of them (and
    to the servers the cluster announces). Once connected it reconnects forever; ``disconnected_cb`` and ``reconnected_cb`` hear of each loss and return.
    ``creds``: the role's key file (a bare nkey seed, or a JWT ``.creds`` file), default ``$LEDGER_NATS_CREDS``;
    ``ca``: a CA file to check a ``tls://`` server against, default ``$LEDGER_NATS_CA``. A server that
    refuses the credentials is CredentialsRefused; a permission the server refuses later fails what asked
    for it with PermissionDenied (``on_denied``).
    """
    creds = creds or os.environ.get(CREDS_ENV) or None
    ca = ca or os.environ.get(CA_ENV) or None
    options: dict[str, Any] = {}
    if creds:
        try:
            text = Path(creds).read_text()
        except OSError as exc:
            raise CredentialsRefused(f"cannot read the NATS credentials file {creds}: {exc.strerror}") from exc
        options["user_credentials" if is_jwt_creds(text) else "nkeys_seed"] = creds
    if ca:
        import ssl

        try:
            options["tls"] = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise StreamUnavailable(f"cannot use the CA file {ca}: {exc}") from exc
    holder: list[NATS] = []

    async def on_error(exc: Exception) -> None:
        if holder and PERMISSIONS_ERR in str(exc).lower():
            _denied(holder[0], str(exc))

    servers = server_urls(url)
    nc = NATS()
    try:
        await nc.connect(servers, **{
            "name": name,
            "connect_timeout": timeout,
            "allow_reconnect": len(servers) > 1,  # nats-py's first connect tries the next server only if set;
            "max_reconnect_attempts": 1,  # then it gives up after two quick tries of each (nats-py
            "reconnect_time_wait": 0.01,  # would otherwise retry it 60 times, or forever with -1)
            "error_cb": on_error,
            "disconnected_cb": disconnected_cb or _quiet_cb,
            "reconnected_cb": reconnected_cb or _quiet_cb,
            "closed_cb": _quiet_cb,
            **options,
        })
    except Exception as exc:  # nats-py raises several unrelated types on connect
        with contextlib.suppress(Exception):  # a refused first connect leaves its transport open otherwise;
            async with asyncio.timeout(1.0):  # a failed TLS handshake's never finishes closing
                await nc.close()
        if _auth_refused(exc):
            raise CredentialsRefused(f"NATS at {url} refused the credentials "
                                     f"({creds or f'none given: --nats-creds / {CREDS_ENV}'})") from exc
        raise StreamUnavailable(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from exc
    nc.options["allow_reconnect"] = False
    holder.append(nc)
    if reconnect:  # once connected, reconnect forever (nats-py reads these at disconnect time)
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
    return nc


CREDS_ENV: Final = "LEDGER_NATS_CREDS"
CA_ENV: Final = "LEDGER_NATS_CA"


def _auth_refused(exc: BaseException) -> bool:
    """Whether a failed connect was the server refusing the credentials (nats-py's error class, in the chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, nats_errors.AuthorizationError) or AUTHORIZATION_VIOLATION in str(seen).lower():
            return True  # nats-py raises its plain Error with the server's words on a first connect
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------- permission refusals

_listeners: WeakKeyDictionary[NATS, list[Callable[[str, PermissionDenied], None]]] = WeakKeyDictionary()
_DENIAL: Final = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.IGNORECASE)


def on_denied(nc: NATS, listener: Callable[[str, PermissionDenied], None]) -> None:
    """Call ``listener(subject, error)`` whenever the server refuses a publish of ``nc`` to ``subject``."""
    _listeners.setdefault(nc, []).append(listener)


def off_denied(nc: NATS, listener: Callable[[str, PermissionDenied], None]) -> None:
    """Stop calling ``listener`` (a closed publisher)."""
    listeners = _listeners.get(nc, [])
    if listener in listeners:
        listeners.remove(listener)


def describe_denial(text: str) -> tuple[str, str, str]:
    """``(op, subject, words)`` of the server's permission violation: what was refused, in words.

    nats-py hands the violation over in lower case: the subject is lower case (JetStream API subjects are
    given back in their own upper case; a publisher names its own subject with ``denial_words``).
    """
    found = _DENIAL.search(text)
    if found is None:
        return "", "", text.removeprefix("nats: ").strip()
    op, subject = found.group(1).lower(), found.group(2)
    if subject.lower().startswith("$js."):
        subject = subject.upper()
    return op, subject, denial_words(op, subject)


def denial_words(op: str, subject: str) -> str:
    """What a refused ``op`` (``publish`` or ``subscription``) on ``subject`` would have done, in words."""
    if op == "subscription":
        return f"subscribe to {subject}"
    parts = subject.split(".")
    if parts[0] == "ledger" and len(parts) == 4:
        return f"append {parts[1]}.{parts[3]} to {parts[1]} {parts[2]} (publish to {subject})"
    api = subject.removeprefix("$JS.API.")
    for prefix, words in _API_WORDS:
        if api.startswith(prefix):
            rest = api[len(prefix):].lstrip(".")
            return f"{words} {rest}".strip() + f" (publish to {subject})"
    return f"publish to {subject}"


_API_WORDS: Final = (
    ("STREAM.MSG.DELETE", "delete a message of stream"),
    ("STREAM.MSG.GET", "read a message of stream"),
    ("STREAM.PURGE", "purge stream"),
    ("STREAM.DELETE", "delete stream"),
    ("STREAM.UPDATE", "update stream"),
    ("STREAM.CREATE", "create stream"),
    ("STREAM.INFO", "read the info of stream"),
    ("DIRECT.GET", "read messages of stream"),
    ("CONSUMER.DELETE", "delete consumer"),
    ("CONSUMER.CREATE", "create a consumer on"),
    ("CONSUMER.DURABLE.CREATE", "create a durable consumer on"),
    ("CONSUMER.MSG.NEXT", "read from consumer"),
)


def _denied(nc: NATS, text: str) -> None:
    op, subject, words = describe_denial(text)
    error = PermissionDenied(f"permission denied: {words}")
    for listener in list(_listeners.get(nc, ())):
        listener(subject, error)
    if op == "publish":  # a request the server dropped (JetStream API, js.publish): fail it now, not at its timeout
        # nats-py's pending requests do not say their subject: all of this connection's fail (the Publisher's
        # own appends are told apart by subject above and never wait here)
        for future in list(getattr(nc, "_resp_map", {}).values()):
            if not future.done():
                future.set_exception(error)


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


async def ensure_stream(js: JetStreamContext, name: str = STREAM, *, replicas: int | None = None,
                        say: Callable[[str], None] | None = None) -> api.StreamInfo:
    """Create the stream, or bring an existing one to the expected config. Idempotent.

    For ``ledger up``, the projector and admin verbs only (it needs the right
    to create and update the stream); read verbs use ``check_stream``. An
    existing stream whose config already matches is left alone, and its
    metadata (the import marks, the server's own keys) is always kept.

    ``replicas``: a new stream gets that many (default: 3 on a cluster of 3 or
    more servers, else 1). An existing stream's replicas are never lowered
    (an operator chose them); a higher ``replicas`` raises them, and ``say``
    hears of it, and of a request to lower them that was not followed.
    """
    config = stream_config(name)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        config.num_replicas = replicas or default_replicas(js)
        return note_stream(await js.add_stream(config))
    have = info.config
    current = have.num_replicas or 1
    raise_to = replicas if replicas is not None and replicas > current else None
    if replicas is not None and replicas < current and say is not None:
        say(f"stream {name} keeps its {current} replicas (asked for {replicas}: replicas are never lowered)")
    if raise_to is None and all(getattr(have, field) == getattr(config, field) for field in _MANAGED):
        return note_stream(info)
    for field in _MANAGED:
        setattr(have, field, getattr(config, field))
    if raise_to is not None:
        have.num_replicas = raise_to
    updated = note_stream(await js.update_stream(have))
    if raise_to is not None and say is not None:
        say(f"stream {name} raised from {current} to {raise_to} replicas")
    return updated


def default_replicas(js: JetStreamContext) -> int:
    """3 on a cluster of 3 or more servers (the ones its INFO announces), else 1 (contract section 6)."""
    info = js._nc._server_info or {}
    if not info.get("cluster"):
        return 1
    return 3 if len(set(info.get("connect_urls") or [])) >= 3 else 1


_MANAGED: Final = ("subjects", "storage", "retention", "discard", "duplicate_window", "max_msg_size", "allow_direct")
"""The fields of the stream's config ``ensure_stream`` sets; the rest (metadata among them) is left as it is."""


async def check_stream(js: JetStreamContext, name: str = STREAM) -> api.StreamInfo:
    """The stream's info, for read verbs: never creates or changes it (``stream_info`` only).

    A stream that does not exist is StreamUnavailable, in one line.
    """
    try:
        info = await js.stream_info(name)
    except NotFoundError as exc:
        raise StreamUnavailable(f"stream {name} does not exist on this NATS server: nothing was ever recorded "
                                "there (start `ledger up` against it first)") from exc
    except PermissionDenied:
        raise
    except Exception as exc:
        raise StreamUnavailable(f"cannot read stream {name}: {exc or type(exc).__name__}") from exc
    return note_stream(info)


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


# --------------------------------------------------------------------------- ordered pull reader

_NO_MESSAGES: Final = "404"
_REQUEST_TIMEOUT: Final = "408"
_CONFLICT: Final = "409"
_NO_RESPONDERS: Final = "503"

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

    The consumer counts as lost when a pull request is answered by status 503
    (no responders: the server restarted and forgot it) or 409 (deleted,
    leadership change), or when the connection reconnected since it was made
    (a restarted server, or one whose memory consumer may be gone). While NATS
    is away the reader waits and tries again; ``lost`` says since when it has
    had no consumer (None while it has one).

    Interface: ``start``, ``next_batch``, ``stop``.
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
        self._gone = False  # the broken consumer is gone with the server: no point deleting it
        self._reconnects = 0
        self.lost: float | None = None  # monotonic time since which there is no consumer
        self.error: str | None = None  # why the last attempt to recreate it failed
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
        if old and not self._gone:
            await self._delete(old)
        self._gone = False
        self._reconnects = self.nc.stats["reconnects"]
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_seq,
            ack_policy=api.AckPolicy.NONE, filter_subject=self.subject, mem_storage=True,
            num_replicas=1, inactive_threshold=max(60.0, 2 * self.expires), max_deliver=1,
        )
        try:
            info = await self.js.add_consumer(self.stream, config)
        except PermissionDenied:
            raise
        except Exception as exc:
            raise StreamUnavailable(f"cannot read stream {self.stream}: {exc or type(exc).__name__}") from exc
        self._consumer = info.name
        self._next_subject = f"{self.js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
        self.lost = self.error = None
        await self._pump()

    def _lose(self, *, gone: bool) -> None:
        """The consumer is of no more use: the next ``next_batch`` makes a new one after the last message taken in."""
        if not self._broken:
            self._broken = True
            self._gone = gone
            self.lost = time.monotonic()
        self._arrived.set()

    async def _recreate(self) -> bool:
        """Make the consumer again; False (and ``error`` set) while NATS is away or refuses."""
        if not self.nc.is_connected:
            self.error = "not connected to NATS"
            return False
        try:
            await self._create()
        except StreamUnavailable as exc:
            self._broken = True
            self._gone = True
            self.error = str(exc)
            return False
        return True

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
        if not msg.reply and headers and api.Header.STATUS in headers:
            status = headers.get(api.Header.STATUS)
            if status in (_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT, _NO_RESPONDERS) and self._requests:
                self._requests.popleft()  # that request is over
            if status in (_NO_MESSAGES, _REQUEST_TIMEOUT):
                await self._pump()
            elif status == _CONFLICT:  # consumer deleted, leadership change: this consumer is done
                self._lose(gone=False)
            elif status == _NO_RESPONDERS:  # nobody serves the consumer: the server forgot it (a restart)
                self._lose(gone=True)
            return
        tokens = msg.reply.split(".")
        base = 2 if len(tokens) == 9 else 4
        if tokens[base + 1] != self._consumer or self._broken:
            return  # left over from a consumer replaced since
        dseq = int(tokens[base + 4])
        if dseq != self._dseq + 1:
            self._lose(gone=False)  # lost messages: start over from the last one taken in
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
            if not self._broken and self.nc.stats["reconnects"] != self._reconnects:
                self._lose(gone=True)  # a reconnect: the server may have restarted without our consumer
            if self._broken:
                await self._recreate()
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
"""Set by ``ledger events import``: when the ledger first recorded the message (its original stream time).
Honoured only on the sequences the stream's metadata marks as imported (``ImportedSeqs``)."""
IMPORT_SEQ_HEADER: Final = "Ledger-Import-Seq"
"""Set by ``ledger events import``: the message's sequence in the export it came from (the resume position)."""
IMPORTED_KEY: Final = "ledger_imported"
"""The key, in the stream config's ``metadata``, of the sequences ``ledger events import`` wrote."""


class ImportedSeqs:
    """The stream sequences written by ``ledger events import``, as sorted, disjoint ranges.

    The ledger's clock is its own (contract section 1): the time a message was
    recorded is its stream time, and a ``Ledger-Recorded-At`` header is
    honoured only on a message an import wrote. Any publisher can set a
    header, so the header alone proves nothing; the mark is kept where an
    ordinary publisher cannot write: the stream's own config ``metadata``
    (``ledger_imported``: ``"1-5000,5003-9000"``), changed only by
    ``update_stream``, an admin right. The import records the sequences its
    publishes were acknowledged at (as it goes, and when it ends), and readers
    honour the header only for those. A forged header on any other message
    (or on a message published while an import runs, which the import's acks
    never name) is ignored: that message shows its stream time.

    Readers learn the marks from ``check_stream`` / ``ensure_stream`` (which
    every reading verb and ``ledger up`` call first) or pass them explicitly.
    A projector already running when an import wrote keeps the marks it read
    at its start, so it folds those messages at their stream time, the time
    this ledger recorded them; ``ledger replay`` rebuilds with the import's.
    """

    __slots__ = ("ranges",)

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.ranges = _merged(ranges or [])

    @classmethod
    def parse(cls, text: str | None) -> ImportedSeqs:
        """Read the metadata value; anything unreadable marks nothing (the header is then never honoured)."""
        ranges: list[tuple[int, int]] = []
        for part in (text or "").split(","):
            lo, _, hi = part.strip().partition("-")
            if lo.isdigit() and (hi or lo).isdigit():
                ranges.append((int(lo), int(hi or lo)))
        return cls(ranges)

    @classmethod
    def of(cls, info: api.StreamInfo) -> ImportedSeqs:
        return cls.parse((info.config.metadata or {}).get(IMPORTED_KEY))

    def with_seqs(self, seqs: list[int]) -> ImportedSeqs:
        """These marks and ``seqs``."""
        return ImportedSeqs(self.ranges + [(seq, seq) for seq in seqs])

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        at = bisect.bisect_right(self.ranges, (seq, _MAX_SEQ)) - 1
        return at >= 0 and self.ranges[at][0] <= seq <= self.ranges[at][1]

    def __str__(self) -> str:
        return ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImportedSeqs) and self.ranges == other.ranges

    def __bool__(self) -> bool:
        return bool(self.ranges)


_MAX_SEQ: Final = 1 << 64


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


_known_imports: dict[str, ImportedSeqs] = {}
"""The import marks of each stream, as this process last read them (``note_stream``)."""


def note_stream(info: api.StreamInfo) -> api.StreamInfo:
    """Remember the stream's import marks from its info (every stream check and ensure does)."""
    _known_imports[info.config.name or STREAM] = ImportedSeqs.of(info)
    return info


def recorded_at_of(msg: StreamMessage, imported: ImportedSeqs | None = None) -> datetime:
    """When the ledger recorded ``msg``: its stream time, or its original one if an import wrote it.

    ``imported``: the stream's import marks (default: those of ``LEDGER`` this
    process last read). A ``Ledger-Recorded-At`` header on any other message
    is ignored: an ordinary publisher cannot backdate the ledger's clock.
    """
    headers = msg.headers
    if headers:
        original = headers.get(RECORDED_AT_HEADER)
        if original:
            marks = imported if imported is not None else _known_imports.get(STREAM)
            if marks is None or msg.seq not in marks:
                return msg.recorded_at
            try:
                value = datetime.fromisoformat(original)
            except ValueError:
                return msg.recorded_at
            if value.tzinfo is not None:
                return value.astimezone(timezone.utc)
    return msg.recorded_at


async def last_seq_on(js: JetStreamContext, subject: str = "ledger.>", *, name: str = STREAM) -> int:
    """The sequence of the last message on ``subject`` (wildcards allowed); 0 when there is none.

    Exact: the expected-subject-sequence appends of the ledger's publishers rely on it.
    """
    if subject in SUBJECTS:
        return await stream_last_seq(js, name)
    try:
        msg = await js.get_last_msg(name, subject)
    except NotFoundError:
        return 0
    except PermissionDenied:
        raise
    except Exception as exc:  # nats-py raises several unrelated types when the server is away
        raise StreamUnavailable(f"cannot read stream {name}: {exc or type(exc).__name__}") from exc
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
    except PermissionDenied:
        raise
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
