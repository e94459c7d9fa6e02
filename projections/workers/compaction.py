"""``ledger compact``: remove from the stream the heartbeats of ended runs that
no view depends on (CONTRACT section 9).

Which ones may go is decided per run, on the run's own messages up to the
views' checkpoint, by folding them with the projector's own fold twice: once
whole, and once without the heartbeats chosen so far. A heartbeat goes only
when

- it made no history entry (it revived nothing: not a pending, initializing
  or crashed run) and the views keep no id for it (``fold.remembers``), and
- the run's next event, applied to the run as it stands without it, has the
  very same effect and leaves the very same run (every field: state, clocks,
  step, progress, sequence) as in the whole fold.

So every event that stays does exactly what it did, the run's view and
history after the last one are unchanged, and ``ledger verify`` still holds.
In practice what stays of a run is its state changes, the heartbeats that
revived it, the last heartbeat before each other event (the last of each
attempt among them) and any whose step or progress a later one did not
replace. As a last check the kept events are folded alone and must give the
run and its history exactly; a run where they would not keeps everything.

Only runs that ended (``ended_at`` set: finished, failed, killed, preempted,
crashed) before the horizon, by the stream's clock of the history entry that
ended them, are looked at; each is looked at again only once it changed
(the ``compacted`` table of the views database remembers the run's sequence
when it was done). Messages go by a purge of the run's heartbeat subject
below its first kept heartbeat (one request) and by message deletes for the
rest (``ledger.nats.compact``): exact, nothing else is touched. Quarantined
messages and events the views take for duplicates stay.

What it costs: as-of reads (``--as-of``) inside a compacted range see fewer
heartbeats, so ``last_heartbeat_at``, ``step`` and ``progress`` as of a time
between two kept events are approximate; the state, attempt and every other
field are exact, and so is everything as of a kept event. The audit trail
(``ledger audit``) no longer lists the heartbeats removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Final

import aiosqlite
import anyio
from nats.js import JetStreamContext

from ledger.core.events import AnyEvent, RunHeartbeat, decode_event
from ledger.core.fold import Recorded, Views, remembers
from ledger.core.machine import Run
from ledger.errors import InvalidEvent, LedgerError
from ledger.nats.compact import delete_messages, purge_before, stored_size, stream_bytes
from ledger.nats.stream import StreamMessage, read_range, recorded_at_of
from projections.views.schema import iso, json_param
from projections.views.store import open_db, read_checkpoint

COMPACTED: Final = """
CREATE TABLE IF NOT EXISTS compacted (run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""
"""Runs compacted, with their ``seq`` then: a run is looked at again only once it changed.
Not a view (``ledger verify`` does not compare it, a replay starts it afresh)."""
ENDED_RUNS: Final = """
SELECT r.run_id, r.seq FROM runs AS r
WHERE r.ended_at IS NOT NULL
  AND (SELECT h.recorded_at FROM history AS h WHERE h.kind = 'run' AND h.entity_id = r.run_id
       ORDER BY h.seq DESC LIMIT 1) < ?
  AND NOT EXISTS (SELECT 1 FROM compacted AS c WHERE c.run_id = r.run_id AND c.seq = r.seq)
ORDER BY r.run_id
"""
SEEN_OF: Final = "SELECT s.event_id, s.seq FROM json_each(?) AS j CROSS JOIN seen AS s ON s.event_id = j.value"
MARK: Final = "INSERT OR REPLACE INTO compacted (run_id, seq) VALUES (?, ?)"
PARALLEL: Final = 4
"""Runs read and compacted at once."""

Progress = Callable[[int, int], None]
"""Called as runs are done: (runs done, runs to do)."""


@dataclass
class CompactResult:
    """What a compaction did (or, with ``dry_run``, would do)."""

    horizon: datetime
    checkpoint: int
    dry_run: bool = False
    runs_examined: int = 0
    runs_compacted: int = 0
    messages_examined: int = 0
    messages_removed: int = 0
    bytes_removed: int = 0
    """What the removed messages took in the stream (as the server accounts them, within a few bytes)."""
    stream_before: tuple[int, int] = (0, 0)
    stream_after: tuple[int, int] = (0, 0)
    """The stream's (messages, bytes) before and after."""
    seconds: float = 0.0
    kept_whole: list[str] = field(default_factory=list)
    """Runs whose kept events would not fold to the same run (never expected): nothing of them went."""

    @property
    def rate(self) -> float:
        """Messages removed per second."""
        return self.messages_removed / self.seconds if self.seconds > 0 else 0.0


def _run_outcome(views: Views, rec: Recorded, run_id: str) -> tuple[str, Run | None, bool]:
    marks = len(views.history)
    effect = views.apply(rec)
    return effect, views.runs.get(run_id), any(kind == "run" for kind, _, _ in views.history[marks:])


def removable(run_id: str, msgs: list[StreamMessage], first_seen: Mapping[str, int]) -> list[int]:
    """The sequences of the run's heartbeats that can leave the stream without changing any view.

    ``msgs``: every message on the run's subjects (up to the views' checkpoint), in
    order; ``first_seen``: the views' seen ids among their events, with the sequence
    each was first recorded at (an event of this run that repeats an id recorded
    before, by any run, is a duplicate to the views: it did nothing and stays).
    """
    recs: list[Recorded] = []
    for msg in msgs:
        try:
            event: AnyEvent = decode_event(msg.subject, msg.data)
        except InvalidEvent:
            continue  # quarantined: a view (quarantine) holds it; it stays
        first = first_seen.get(event.id)
        if first is not None and first < msg.seq:
            continue  # a duplicate: it changed nothing and stays
        recs.append(Recorded(msg.seq, recorded_at_of(msg), event))
    whole = Views()
    outcomes = [_run_outcome(whole, rec, run_id) for rec in recs]
    removed: list[int] = []
    current: Run | None = None  # the run as the kept events leave it
    before: Run | None = None  # the run before recs[i] in the whole fold
    for i, rec in enumerate(recs):
        event = rec.event
        if (type(event) is RunHeartbeat and i + 1 < len(recs) and not outcomes[i][2]
                and not remembers(before, event) and event.id not in first_seen):
            trial = Views(runs={run_id: current} if current is not None else {})
            if _run_outcome(trial, recs[i + 1], run_id) == outcomes[i + 1]:
                removed.append(rec.seq)
                before = outcomes[i][1]
                continue
        current = before = outcomes[i][1]
    if removed and not _same_run(run_id, recs, set(removed), whole):
        return []  # never expected: keep the run whole rather than trust the reasoning
    return removed


def _same_run(run_id: str, recs: list[Recorded], removed: set[int], whole: Views) -> bool:
    """Whether the kept events alone fold to the same run and the same run history."""
    kept = Views().fold(rec for rec in recs if rec.seq not in removed)
    history = [entry for kind, _, entry in whole.history if kind == "run"]
    return kept.runs.get(run_id) == whole.runs.get(run_id) and history == [
        entry for kind, _, entry in kept.history if kind == "run"]


async def _ended_runs(db: aiosqlite.Connection, horizon: datetime) -> list[tuple[str, int]]:
    await db.executescript(COMPACTED)
    return [(str(r[0]), int(r[1])) for r in await db.execute_fetchall(ENDED_RUNS, (iso(horizon),))]


async def _run_messages(js: JetStreamContext, run_id: str, stop: int) -> list[StreamMessage]:
    out: list[StreamMessage] = []
    async with contextlib.aclosing(read_range(js, subject=f"ledger.run.{run_id}.>", stop_seq=stop)) as batches:
        async for batch in batches:
            out += batch
    return out


async def _first_seen(db: aiosqlite.Connection, msgs: list[StreamMessage]) -> dict[str, int]:
    ids: set[str] = set()
    for msg in msgs:
        try:
            ids.add(decode_event(msg.subject, msg.data).id)
        except InvalidEvent:
            pass
    rows = await db.execute_fetchall(SEEN_OF, json_param(ids)) if ids else []
    return {str(r[0]): int(r[1]) for r in rows}


async def _remove(js: JetStreamContext, run_id: str, msgs: list[StreamMessage], removed: list[int]) -> int:
    """Remove the chosen messages: a purge of the heartbeat subject below the first kept one, then deletes."""
    subject = f"ledger.run.{run_id}.heartbeat"
    gone = set(removed)
    on_subject = [m.seq for m in msgs if m.subject == subject]
    lead = 0
    while lead < len(on_subject) and on_subject[lead] in gone:
        lead += 1
    count = 0
    if lead > 1:
        below = on_subject[lead] if lead < len(on_subject) else on_subject[-1] + 1
        purged = await purge_before(js, subject, below)
        count += purged
        if purged == lead:  # else some were gone already, or the purge fell short: delete them one by one
            gone -= set(on_subject[:lead])
    return count + await delete_messages(js, sorted(gone))


async def compact(js: JetStreamContext, db_path: Path, *, older_than: float, dry_run: bool = False,
                  now: datetime | None = None, on_progress: Progress | None = None) -> CompactResult:
    """Remove the heartbeats no view depends on, of runs that ended more than ``older_than`` seconds ago."""
    if not db_path.exists():
        raise LedgerError(f"no views at {db_path}: compact reads them to find ended runs (--data-dir)")
    started = time.perf_counter()
    horizon = (now or datetime.now(timezone.utc)) - timedelta(seconds=older_than)
    db = await open_db(db_path)
    try:
        checkpoint = await read_checkpoint(db)
        result = CompactResult(horizon=horizon, checkpoint=checkpoint, dry_run=dry_run)
        result.stream_before = await stream_bytes(js)
        runs = await _ended_runs(db, horizon)
        done = 0

        async def one(run_id: str, seq: int) -> None:
            msgs = await _run_messages(js, run_id, checkpoint)
            if not any(m.seq == seq for m in msgs):
                return  # a read that missed the run's last change: leave the run for the next pass
            removed = removable(run_id, msgs, await _first_seen(db, msgs))
            result.runs_examined += 1
            result.messages_examined += len(msgs)
            if removed:
                sizes = {m.seq: stored_size(m) for m in msgs}
                result.runs_compacted += 1
                result.bytes_removed += sum(sizes[s] for s in removed)
                gone = len(removed) if dry_run else await _remove(js, run_id, msgs, removed)
                result.messages_removed += gone  # after the await: runs go concurrently
            if not dry_run:
                await db.execute(MARK, (run_id, seq))

        for at in range(0, len(runs), PARALLEL):  # a few runs at once; the first error ends the pass as it is
            chunk = runs[at:at + PARALLEL]
            failed = [r for r in await asyncio.gather(*(one(*run) for run in chunk), return_exceptions=True)
                      if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            done += len(chunk)
            if on_progress:
                on_progress(done, len(runs))
        result.stream_after = await stream_bytes(js)
    finally:
        await db.close()
    result.seconds = time.perf_counter() - started
    return result


async def compact_every(js: JetStreamContext, db_path: Path, older_than: float, *,
                        log: Callable[[str], None] | None = None, period: float | None = None) -> None:
    """``ledger up --compact-after``: compact now and then (every quarter of the horizon, between
    10 s and an hour), until cancelled; a failed pass is reported and the next one tries again."""
    every = period if period is not None else min(max(older_than / 4, 10.0), 3600.0)
    while True:
        try:
            done = await compact(js, db_path, older_than=older_than)
            if done.messages_removed and log:
                log(f"compacted {done.runs_compacted} run(s): {done.messages_removed} heartbeat(s), "
                    f"{human_bytes(done.bytes_removed)} freed")
        except Exception as exc:  # a janitor: whatever failed (NATS away, a busy database, no admin right), try later
            if log:
                log(f"compaction failed ({exc or type(exc).__name__}); next try in {every:g} s")
        await anyio.sleep(every)


def human_bytes(n: float) -> str:
    """``1.5 MB``-style sizes (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


