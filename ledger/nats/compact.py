"""Removing chosen messages from the ``LEDGER`` stream, exactly: what ``ledger
compact`` does once it knows which heartbeats no view depends on.

Two JetStream operations, both exact (nothing but the named messages goes):
a purge filtered on one subject below a sequence (all the messages on that
subject before it; one request for a run's leading heartbeats), and message
deletes by sequence (pipelined, ``no_erase``: the space is given back without
overwriting it first). Both need the ``admin`` role (CONTRACT section 7);
the server's refusal is ``permission denied: ...`` in one line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Final

from nats.js import JetStreamContext

from ledger.errors import LedgerError, StreamUnavailable
from ledger.nats.stream import STREAM, StreamMessage

IN_FLIGHT: Final = 256
"""Deletes sent before waiting for their answers."""
REQUEST_S: Final = 10.0
_NOT_FOUND: Final = 10057
"""JetStream's err_code for a message that is not there (deleted already)."""


def stored_size(msg: StreamMessage) -> int:
    """The bytes the stream accounts for ``msg`` (its file store record: 22 bytes of framing, the
    subject, the headers as sent, the payload, an 8-byte hash); the headers' size is rebuilt from
    their parsed form, so this is close, not exact."""
    headers = msg.headers or {}
    header_bytes = (len(b"NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())) if headers else 0
    return 22 + len(msg.subject) + header_bytes + len(msg.data) + 8


async def _api(js: JetStreamContext, subject: str, request: dict[str, object]) -> dict[str, object]:
    try:
        reply = await js._nc.request(f"{js._prefix}.{subject}", json.dumps(request).encode(), timeout=REQUEST_S)
    except Exception as exc:  # nats-py raises several unrelated types for a timeout or a lost connection
        raise StreamUnavailable(f"cannot change stream {STREAM}: {exc or type(exc).__name__}") from exc
    answer: dict[str, object] = json.loads(reply.data or b"{}")
    error = answer.get("error")
    if isinstance(error, dict):
        code = error.get("err_code")
        if code == _NOT_FOUND:
            return {"success": False}
        text = str(error.get("description", error))
        if error.get("code") == 403 or "permission" in text.lower() or "authorization" in text.lower():
            raise LedgerError(f"permission denied: {subject} on stream {STREAM} needs the admin role ({text})")
        raise LedgerError(f"stream {STREAM} refused {subject.split('.')[1].lower()}: {text}")
    return answer


async def purge_before(js: JetStreamContext, subject: str, seq: int, *, name: str = STREAM) -> int:
    """Remove every message on ``subject`` (no wildcard) below ``seq``; returns how many went."""
    answer = await _api(js, f"STREAM.PURGE.{name}", {"filter": subject, "seq": seq})
    purged = answer.get("purged", 0)
    return purged if isinstance(purged, int) else 0


async def delete_messages(js: JetStreamContext, seqs: Iterable[int], *, name: str = STREAM) -> int:
    """Delete the messages at ``seqs``, many requests in flight; returns how many were there to delete."""
    deleted = 0
    pending: list[asyncio.Task[dict[str, object]]] = []

    async def settle(tasks: list[asyncio.Task[dict[str, object]]]) -> None:
        nonlocal deleted
        try:
            for task in tasks:
                if (await task).get("success"):
                    deleted += 1
        finally:
            for task in tasks:
                task.cancel()

    for seq in seqs:
        pending.append(asyncio.ensure_future(
            _api(js, f"STREAM.MSG.DELETE.{name}", {"seq": seq, "no_erase": True})))
        if len(pending) >= IN_FLIGHT:
            batch, pending = pending, []
            await settle(batch)
    await settle(pending)
    return deleted


async def stream_bytes(js: JetStreamContext, name: str = STREAM) -> tuple[int, int]:
    """The stream's (messages, bytes) as the server accounts them."""
    info = await js.stream_info(name)
    return int(info.state.messages), int(info.state.bytes)
