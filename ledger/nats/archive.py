"""Export and import of the stream as JSON lines: one object per stream message.

    {"seq": 12, "subject": "ledger.run.r1.started", "time": "2026-11-25T12:00:00.123456Z",
     "headers": {"Nats-Msg-Id": "01JD..."}, "data": "{\\"type\\":\\"run.started\\",...}"}

``data`` is the payload byte for byte when it is UTF-8, else ``data_b64``
holds it in base64: quarantined payloads are data too and round-trip.
``time`` is when the ledger recorded the message: its stream time, or the
original one for a message that was itself imported (one whose sequence the
stream's metadata marks as imported: see ``ledger.nats.stream.ImportedSeqs``; a
``Ledger-Recorded-At`` header on any other message is ignored).

Import appends the lines to a stream in order and is resumable and
idempotent by position, not by event id: each imported message carries
``Ledger-Import-Seq`` (its ``seq`` in the export) and ``Ledger-Recorded-At``
(its ``time``). A new run first reads the target's last message; if it came
from an import, every line up to that seq is skipped (after checking that the
payload at that seq is the same, so a different file is refused). JetStream's
own dedup by ``Nats-Msg-Id`` cannot do this: its window is two minutes, and
even within it, a late duplicate of the original stream (same event id, more
than two minutes apart there) would be dropped and shift every sequence
after it. Position costs one read however large the stream, and makes an
import into an empty stream an exact copy: the same sequences, payloads and
recorded times, so replaying it gives identical views.

The import marks the sequences it wrote in the stream's config metadata
(``record_imported``: every ``MARK_EVERY`` messages, and when it ends, even
on an error), with ``update_stream``, which needs the admin right an import
needs anyway. Only those messages' ``Ledger-Recorded-At`` is honoured.

So ``Nats-Msg-Id`` is sent only the first time an event id occurs in an
import (a small Bloom filter remembers them; a false positive only drops the
header), and JetStream control headers (``Nats-Expected-*`` and the like, which
meant something only at the original publish) are not sent at all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Final

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ledger.errors import LedgerError, StreamUnavailable
from ledger.nats.publisher import MSG_ID, Publisher
from ledger.nats.stream import (
    IMPORT_SEQ_HEADER,
    IMPORTED_KEY,
    RECORDED_AT_HEADER,
    STREAM,
    ImportedSeqs,
    StreamMessage,
    check_stream,
    ensure_stream,
    last_seq_on,
    note_stream,
    read_range,
    recorded_at_of,
)

Progress = Callable[[int], None]


class ArchiveError(LedgerError):
    """An export file that cannot be read or imported (a bad line, another file than the one resumed)."""


class ExportRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One stream message in an export file."""

    seq: int
    subject: str
    time: str
    headers: dict[str, str] | None = None
    data: str | None = None
    data_b64: str | None = None

    def payload(self) -> bytes:
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64, validate=True)
        return (self.data or "").encode()


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(ExportRecord)


def rfc3339(value: datetime) -> str:
    """Fixed-width RFC 3339 UTC, microseconds (the views' time format)."""
    text = _encoder.encode(value.astimezone(UTC))[1:-1].decode()
    return text if len(text) == 27 else f"{text[:-1]}.000000Z"


def record_of(msg: StreamMessage, imported: ImportedSeqs | None = None) -> ExportRecord:
    data = bytes(msg.data)
    try:
        text: str | None = data.decode()
        b64 = None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(data).decode()
    return ExportRecord(seq=msg.seq, subject=msg.subject, time=rfc3339(recorded_at_of(msg, imported)),
                        headers=dict(msg.headers) if msg.headers else None, data=text, data_b64=b64)


def encode_record(record: ExportRecord) -> bytes:
    return _encoder.encode(record) + b"\n"


def decode_record(line: bytes, where: str) -> ExportRecord:
    try:
        record = _decoder.decode(line)
        record.payload()
    except (msgspec.DecodeError, binascii.Error, ValueError) as exc:
        raise ArchiveError(f"{where}: not an export record: {exc}") from exc
    return record


@dataclass
class ExportResult:
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0


async def export_stream(js: JetStreamContext, out: IO[bytes], *, since_seq: int = 1, until_seq: int | None = None,
                        on_progress: Progress | None = None) -> ExportResult:
    """Write every message from ``since_seq`` to ``until_seq`` (default: the last one now) as JSON lines."""
    result = ExportResult()
    imported = ImportedSeqs.of(await check_stream(js))
    async with contextlib.aclosing(read_range(js, start_seq=since_seq, stop_seq=until_seq)) as batches:
        async for batch in batches:
            out.write(b"".join(encode_record(record_of(m, imported)) for m in batch))
            result.messages += len(batch)
            result.first_seq = result.first_seq or batch[0].seq
            result.last_seq = batch[-1].seq
            if on_progress:
                on_progress(result.last_seq)
    out.flush()
    return result


async def export_bounds(js: JetStreamContext, since_seq: int, until_seq: int | None) -> tuple[int, int]:
    """The first and last sequence an export will cover (for a progress bar)."""
    last = await last_seq_on(js)
    return since_seq, last if until_seq is None else min(last, until_seq)


# --------------------------------------------------------------------------- import

class _SeenIds:
    """A Bloom filter of event ids: "maybe seen" or "surely not". 4 MiB, ~0.1% false positives at 1M ids."""

    def __init__(self, bits: int = 1 << 25) -> None:
        self.bits = bits
        self.array = bytearray(bits // 8)

    def add(self, key: str) -> bool:
        """Add ``key``; return whether it was maybe there already."""
        h = hash(key)
        present = True
        for k in range(3):
            bit = (h >> (k * 21)) % self.bits if k else h % self.bits
            byte, mask = bit >> 3, 1 << (bit & 7)
            if not self.array[byte] & mask:
                present = False
                self.array[byte] |= mask
        return present


def import_headers(record: ExportRecord, seen_ids: _SeenIds) -> dict[str, str]:
    """The headers an imported message carries (see the module docstring)."""
    headers = {k: v for k, v in (record.headers or {}).items()
               if not k.startswith("Nats-") and k not in (RECORDED_AT_HEADER, IMPORT_SEQ_HEADER)}
    msg_id = (record.headers or {}).get(MSG_ID)
    if msg_id and not seen_ids.add(msg_id):
        headers[MSG_ID] = msg_id
    headers[RECORDED_AT_HEADER] = record.time
    headers[IMPORT_SEQ_HEADER] = str(record.seq)
    return headers


@dataclass
class ImportResult:
    read: int = 0
    imported: int = 0
    skipped: int = 0
    """Lines already in the target (a resumed import)."""
    duplicates: int = 0
    """Messages JetStream dropped as duplicates of a message already in the target (with --append)."""
    resumed_after: int = 0
    last_export_seq: int = 0
    stream_last_seq: int = 0


MARK_EVERY: Final = 10_000
"""Messages an import writes between two updates of the stream's import marks."""


async def record_imported(js: JetStreamContext, seqs: list[int], name: str = STREAM) -> None:
    """Add ``seqs`` to the stream's import marks (its config metadata; ``update_stream``, an admin right)."""
    if not seqs:
        return
    info = await js.stream_info(name)
    config = info.config
    marks = ImportedSeqs.of(info).with_seqs(seqs)
    config.metadata = {**(config.metadata or {}), IMPORTED_KEY: str(marks)}
    note_stream(await js.update_stream(config))


LOOK_BACK: Final = 1000
"""Messages ``--append`` looks back through for the last imported one (others may have been appended since)."""


async def resume_point(js: JetStreamContext, *, append: bool) -> tuple[int, bytes | None]:
    """The export seq the target's last imported message came from (0: start over) and its payload.

    That is the stream's last message; with ``append``, the last imported one
    among the last ``LOOK_BACK`` messages (foreign messages may follow it).
    """
    info = await js.stream_info(STREAM)
    last, first = int(info.state.last_seq), int(info.state.first_seq)
    if last == 0 or int(info.state.messages) == 0:
        return 0, None
    for seq in range(last, max(first, last - LOOK_BACK + 1) - 1, -1) if append else (last,):
        try:
            msg = await js.get_msg(STREAM, seq)
        except NotFoundError:
            continue  # deleted
        imported = (msg.headers or {}).get(IMPORT_SEQ_HEADER)
        if imported is not None and str(imported).isdigit():
            return int(imported), bytes(msg.data or b"")
    if not append:
        raise ArchiveError(
            f"stream {STREAM} already holds {info.state.messages} messages that did not come from an import: "
            "import into an empty stream, or pass --append to add the file after them")
    return 0, None


async def import_stream(nc: NATS, lines: Iterable[bytes], *, append: bool = False, name: str = "the file",
                        on_progress: Callable[[int], None] | None = None, window: int = 10_000) -> ImportResult:
    """Append the export records of ``lines`` to the LEDGER stream, in order, resuming where a previous import stopped."""
    js = nc.jetstream()
    await ensure_stream(js)
    # The import marks need update_stream, an admin right (CONTRACT section 7): asked for once, unchanged,
    # before anything is written, so a key without it is refused with nothing appended.
    note_stream(await js.update_stream((await js.stream_info(STREAM)).config))
    result = ImportResult()
    result.resumed_after, resume_payload = await resume_point(js, append=append)
    publisher = Publisher(nc, max_in_flight=window, timeout=30.0)
    in_flight: deque[tuple[int, asyncio.Future[int]]] = deque()
    seen_ids = _SeenIds()
    last_seq = 0
    last_ack = 0
    checked = result.resumed_after == 0
    written: list[int] = []

    async def settle(keep: int) -> None:
        nonlocal last_ack
        if len(written) >= MARK_EVERY:
            await record_imported(js, written)
            written.clear()
        while len(in_flight) > keep:
            export_seq, future = in_flight.popleft()
            try:
                seq = await publisher.wait(future)
            except LedgerError as exc:
                raise StreamUnavailable(f"import stopped at export seq {export_seq}: {exc} "
                                        "(run the same import again to resume)") from exc
            if seq <= last_ack:
                result.duplicates += 1
            else:
                last_ack = seq
                written.append(seq)
                result.imported += 1
            result.stream_last_seq = max(result.stream_last_seq, seq)

    try:
        for number, line in enumerate(lines, 1):
            if on_progress and number % 1000 == 0:
                on_progress(number)
            if not line.strip():
                continue
            record = decode_record(line, f"{name} line {number}")
            result.read += 1
            if record.seq <= last_seq:
                raise ArchiveError(f"{name} line {number}: seq {record.seq} after seq {last_seq}: "
                                   "an export lists messages in stream order")
            last_seq = record.seq
            if record.seq <= result.resumed_after:
                if record.seq == result.resumed_after:
                    if record.payload() != resume_payload:
                        raise ArchiveError(f"the stream's last imported message (export seq {record.seq}) "
                                           f"differs from {name} at that seq: not the same export")
                    checked = True
                result.skipped += 1
                continue
            if not checked:
                raise ArchiveError(f"the stream's last imported message came from export seq "
                                   f"{result.resumed_after}, which {name} does not hold: not the same export")
            checked = True
            future = await publisher.submit_raw(record.subject, record.payload(), import_headers(record, seen_ids))
            in_flight.append((record.seq, future))
            await settle(window)
        await settle(0)
    except BaseException:
        with contextlib.suppress(Exception):  # stopped halfway: what was written is marked all the same
            await record_imported(js, written)
        raise
    else:
        await record_imported(js, written)
    finally:
        for _, future in in_flight:
            future.cancel()
        await publisher.close()
    if not checked:
        raise ArchiveError(f"the stream's last imported message came from export seq {result.resumed_after}, "
                           f"which {name} does not hold: not the same export")
    result.last_export_seq = last_seq
    return result
