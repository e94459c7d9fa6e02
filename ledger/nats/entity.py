"""Folding one run or sweep straight from the stream (its own subjects only),
for publishers that must decide before they append; and finding the run event
that made a sweep exist when the sweep has no event of its own yet."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import datetime

from nats.js import JetStreamContext

from ledger.core.events import decode_event
from ledger.core.fold import Recorded, Views, naming_sweep
from ledger.core.machine import Run, Sweep
from ledger.errors import InvalidEvent, StreamUnavailable
from ledger.nats.stream import (
    PullReader,
    last_seq_on,
    read_range,
    recorded_at_of,
)


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


async def recorded_on(js: JetStreamContext, subject: str, *, stop_seq: int | None = None,
                      until: datetime | None = None, stall_timeout: float = 10.0) -> AsyncGenerator[Recorded, None]:
    """The valid events on ``subject`` up to ``stop_seq`` and recorded up to ``until``, in stream
    order (quarantined ones change nothing)."""
    async with contextlib.aclosing(read_range(js, subject=subject, stop_seq=stop_seq,
                                              stall_timeout=stall_timeout)) as batches:
        async for batch in batches:
            for msg in batch:
                recorded = recorded_at_of(msg)
                if until is not None and recorded > until:
                    return
                try:
                    event = decode_event(msg.subject, msg.data)
                except InvalidEvent:
                    continue
                yield Recorded(msg.seq, recorded, event)


async def _implies(js: JetStreamContext, rec: Recorded, sweep_id: str, stall_timeout: float) -> bool:
    """Whether this run event, folded after its run's earlier events, is the one that implied the sweep."""
    views = Views()
    async with contextlib.aclosing(recorded_on(js, f"ledger.run.{rec.event.run_id}.>",  # type: ignore[union-attr]
                                               stop_seq=rec.seq - 1, stall_timeout=stall_timeout)) as events:
        async for earlier in events:
            views.apply(earlier)
    views.apply(rec)
    sweep = views.sweeps.get(sweep_id)
    return sweep is not None and sweep.seq == rec.seq


async def implied_by(js: JetStreamContext, sweep_id: str, *, stop_seq: int | None = None,
                     until: datetime | None = None, stall_timeout: float = 10.0) -> Recorded | None:
    """The run event (up to ``stop_seq`` / recorded ``until``) that made the sweep exist, if any.

    CONTRACT section 2: a sweep exists from the first run event that names it
    (``sweep_id`` of ``run.queued`` / ``run.started``) and applies. Reads the
    ``run.queued`` and ``run.started`` subjects of every run, so bound it
    with ``stop_seq`` where the sweep's own first message is known: from
    there on it exists anyway. A candidate is checked against its run's
    earlier events (a stale start names the sweep but changes nothing).
    """
    found: Recorded | None = None
    for kind in ("queued", "started"):
        stop = stop_seq if found is None else min(found.seq - 1, stop_seq if stop_seq is not None else found.seq)
        async with contextlib.aclosing(recorded_on(js, f"ledger.run.*.{kind}", stop_seq=stop, until=until,
                                                   stall_timeout=stall_timeout)) as events:
            async for rec in events:
                if naming_sweep(rec.event) == sweep_id and await _implies(js, rec, sweep_id, stall_timeout):
                    found = rec
                    break
    return found


def implied_sweep(sweep_id: str, rec: Recorded) -> Sweep:
    """The sweep as the run event ``rec`` made it exist: running, created at the event's time."""
    return Sweep(sweep_id=sweep_id, created_at=rec.event.at, updated_at=rec.event.at, seq=rec.seq)
