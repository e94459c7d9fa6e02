"""Folding one run or sweep straight from the stream (its own subjects only),
for publishers that must decide before they append."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ledger.errors import InvalidEvent, StreamUnavailable
from ledger.events import decode_event
from ledger.fold import Recorded, Views
from ledger.machine import Run, Sweep
from ledger.stream import STREAM, PullReader


async def last_seq_on(js: JetStreamContext, subject: str) -> int:
    """The sequence of the last message on ``subject`` (wildcards allowed), 0 for none."""
    try:
        msg = await js.get_last_msg(STREAM, subject)
    except NotFoundError:
        return 0
    except Exception as exc:
        raise StreamUnavailable(f"cannot read the stream: {exc or type(exc).__name__}") from exc
    return int(msg.seq or 0)


async def fold_subject(js: JetStreamContext, subject: str, *, timeout: float = 10.0) -> tuple[Views, int]:
    """Fold every valid event on ``subject`` (e.g. ``ledger.run.X.>``); also the last sequence read."""
    last = await last_seq_on(js, subject)
    views = Views()
    if last == 0:
        return views, 0
    reader = PullReader(js, 1, subject=subject, max_buffer=5000)
    await reader.start()
    try:
        seq = 0
        while seq < last:
            batch = await reader.next_batch(5000, timeout)
            if not batch:
                raise StreamUnavailable(f"timed out reading {subject} at seq {seq} of {last}")
            for msg in batch:
                seq = msg.seq
                try:
                    views.apply(Recorded(msg.seq, msg.recorded_at, decode_event(msg.subject, msg.data)))
                except InvalidEvent:
                    continue  # quarantined by the projector; it changes nothing here either
    finally:
        await reader.stop()
    return views, last


async def load_run(js: JetStreamContext, run_id: str) -> tuple[Run | None, int]:
    """The run as its events fold, and the last sequence on its subjects (0: never seen)."""
    views, last = await fold_subject(js, f"ledger.run.{run_id}.>")
    return views.runs.get(run_id), last


async def load_sweep(js: JetStreamContext, sweep_id: str) -> tuple[Sweep | None, int]:
    """The sweep as its events fold, and the last sequence on its subjects."""
    views, last = await fold_subject(js, f"ledger.sweep.{sweep_id}.>")
    return views.sweeps.get(sweep_id), last
