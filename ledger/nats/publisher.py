"""Publishing events to the stream: pipelined, one reply inbox per message.

Every publish carries ``Nats-Msg-Id`` (the event id), so JetStream drops a
retried duplicate within its window and answers with the original sequence.
Appends guarded by an expected subject sequence map JetStream's 10071 to
ConcurrencyConflict. A refusal that no retry can mend (a message too large
for the stream or the server, a header too large: JetStream ``err_code`` or
nats-py's error class, never the message text) is EventRefused; every other
failure is StreamUnavailable, which a retry may mend. A publish the server's
permissions refuse (CONTRACT section 7) fails at once with PermissionDenied
(an EventRefused), naming what was refused; nothing was appended.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ledger.core.events import AnyEvent, decode_event, encode_event, subject_of
from ledger.errors import (
    ConcurrencyConflict,
    EventRefused,
    InvalidEvent,
    PermissionDenied,
    StreamUnavailable,
)
from ledger.nats.stream import denial_words, off_denied, on_denied

WRONG_LAST_SEQUENCE: Final = 10071
REFUSED_FOR_GOOD: Final = frozenset({
    10054,  # JSStreamMessageExceedsMaximumErr: larger than the stream's max_msg_size
    10097,  # JSStreamHeaderExceedsMaximumErr: headers over 64 KiB
})
"""JetStream ``err_code``s of a publish that no retry can mend."""
REFUSED_CLASSES: Final = (nats_errors.MaxPayloadError, nats_errors.BadSubjectError, nats_errors.BadHeaderError)
"""nats-py errors of a publish that no retry can mend (raised before anything is sent)."""
MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder: Final = msgspec.json.Decoder(PubAck)


class Publisher:
    """Pipelined JetStream publishing on one connection.

    ``submit`` sends at once and returns a future of the stream sequence;
    at most ``max_in_flight`` publishes wait for their ack at a time.
    """

    def __init__(self, nc: NATS, *, max_in_flight: int = 20_000, timeout: float = 5.0) -> None:
        self.nc = nc
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._prefix = ""
        self._next = 0
        self._futures: dict[str, asyncio.Future[int]] = {}
        self._subjects: dict[str, str] = {}  # token -> subject, while its ack is due
        self._room = asyncio.Event()
        self._room.set()
        self._sub: object | None = None
        on_denied(nc, self._on_denied)

    def _on_denied(self, subject: str, error: PermissionDenied) -> None:
        """The server refused a publish to ``subject``: every publish to it waiting for its ack fails now."""
        for token, what in list(self._subjects.items()):
            if what.lower() == subject.lower():  # nats-py hands the violation over in lower case
                future = self._futures.pop(token, None)
                self._subjects.pop(token, None)
                if future is not None and not future.done():
                    future.set_exception(PermissionDenied(f"permission denied: {denial_words('publish', what)}"))
        if len(self._futures) < self.max_in_flight:
            self._room.set()

    async def _ensure_inbox(self) -> None:
        if self._sub is None:
            self._prefix = self.nc.new_inbox() + "."
            self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_ack)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix):]
        future = self._futures.pop(token, None)
        self._subjects.pop(token, None)
        if len(self._futures) < self.max_in_flight:
            self._room.set()
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(StreamUnavailable("no JetStream stream answers on this subject"))
            return
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            future.set_exception(StreamUnavailable(f"unreadable publish ack: {exc}"))
            return
        if ack.error is not None:
            err = ack.error
            if err.err_code == WRONG_LAST_SEQUENCE:
                future.set_exception(ConcurrencyConflict(err.description))
            elif err.err_code in REFUSED_FOR_GOOD:
                future.set_exception(EventRefused(f"JetStream refused the event: {err.description} ({err.err_code})"))
            else:
                future.set_exception(StreamUnavailable(f"JetStream refused the publish: {err.description} ({err.err_code})"))
            return
        future.set_result(ack.seq)

    async def submit_raw(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[int]:
        """Send one message now; the future resolves to its stream sequence.

        EventRefused when nats-py refuses to send it at all (larger than the
        server's max_payload, a bad subject or header).
        """
        await self._ensure_inbox()
        while len(self._futures) >= self.max_in_flight:
            self._room.clear()
            await self._room.wait()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        self._subjects[token] = subject
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except REFUSED_CLASSES as exc:
            self._futures.pop(token, None)
            self._subjects.pop(token, None)
            raise EventRefused(f"NATS refuses to send it ({type(exc).__name__}: "
                               f"{len(payload)} bytes, max_payload {self.nc.max_payload})") from exc
        except Exception as exc:
            self._futures.pop(token, None)
            self._subjects.pop(token, None)
            raise StreamUnavailable(f"cannot publish to NATS: {exc or type(exc).__name__}") from exc
        return future

    async def submit(self, event: AnyEvent, headers: dict[str, str] | None = None) -> asyncio.Future[int]:
        """Encode and send one event; the future resolves to its stream sequence."""
        hdrs = {MSG_ID: event.id}
        if headers:
            hdrs.update(headers)
        return await self.submit_raw(subject_of(event), encode_event(event), hdrs)

    async def wait(self, future: asyncio.Future[int]) -> int:
        """The sequence of a submitted publish, or StreamUnavailable after the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError as exc:
            self.forget([future])
            raise StreamUnavailable(f"no publish ack within {self.timeout:.0f} s") from exc

    def forget(self, futures: list[asyncio.Future[int]]) -> None:
        """Stop waiting for these publishes' acks (given up on): they no longer hold a place in flight."""
        gone = {id(f) for f in futures}
        self._futures = {k: f for k, f in self._futures.items() if id(f) not in gone}
        self._subjects = {k: s for k, s in self._subjects.items() if k in self._futures}
        if len(self._futures) < self.max_in_flight:
            self._room.set()

    async def publish(self, event: AnyEvent, *, expect_last_subject_seq: int | None = None,
                      expect_subject: str | None = None) -> int:
        """Publish one event and return its stream sequence (the original one for a duplicate).

        With ``expect_last_subject_seq`` the append happens only if the last message on
        ``expect_subject`` (default: the event's subject; wildcards allowed) has that
        sequence (0: none yet); otherwise ConcurrencyConflict and nothing is appended.
        """
        headers: dict[str, str] = {}
        if expect_last_subject_seq is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expect_last_subject_seq)
            if expect_subject is not None:
                headers[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = expect_subject
        return await self.wait(await self.submit(event, headers))

    async def publish_json(self, payload: bytes) -> int:
        """Validate a raw JSON event (kept byte for byte, extra fields too) and publish it."""
        event = _decode_any(payload)
        future = await self.submit_raw(subject_of(event), payload, {MSG_ID: event.id})
        return await self.wait(future)

    async def flush(self) -> None:
        """Wait until every submitted publish has been acknowledged (or failed)."""
        pending = list(self._futures.values())
        if pending:
            await asyncio.wait(pending, timeout=self.timeout)

    async def close(self) -> None:
        off_denied(self.nc, self._on_denied)
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()  # type: ignore[attr-defined]


def _decode_any(payload: bytes) -> AnyEvent:
    """Decode a payload against the subject its own fields name."""
    try:
        probe = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if not isinstance(probe, dict):
        raise InvalidEvent("an event must be a JSON object")
    kind, _, name = str(probe.get("type", "")).partition(".")
    entity = probe.get("run_id") if kind == "run" else probe.get("sweep_id")
    if kind not in ("run", "sweep") or not isinstance(entity, str):
        raise InvalidEvent(f"unknown event type {probe.get('type')!r} or missing {kind or 'run'}_id")
    return decode_event(f"ledger.{kind}.{entity}.{name}", payload)
