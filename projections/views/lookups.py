"""What a batch must read before it folds: the seen ids, runs and sweeps it
touches, and the cache of recent runs and sweeps the projector keeps.

Each lookup is one statement with the keys as one JSON array (no parameter
limit, one round trip to aiosqlite's thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final, NamedTuple, TypeVar

import aiosqlite

from ledger.core.events import RunEvent
from ledger.core.fold import Recorded, Views, naming_sweep
from ledger.core.machine import Run, Sweep
from projections.views.schema import json_param, recorded_run_from_row, sweep_from_row

V = TypeVar("V")

SELECT_SEEN: Final = "SELECT s.event_id FROM json_each(?) AS j CROSS JOIN seen AS s ON s.event_id = j.value"
SELECT_RUNS: Final = "SELECT runs.* FROM json_each(?) AS j CROSS JOIN runs ON runs.run_id = j.value"
SELECT_SWEEPS: Final = "SELECT sweeps.* FROM json_each(?) AS j CROSS JOIN sweeps ON sweeps.sweep_id = j.value"
"""Rows of a batch's keys in one statement each: the keys go in as one JSON array (no parameter limit)."""


class BatchKeys(NamedTuple):
    """The event ids, runs and sweeps a batch touches: what must be read before folding it."""

    event_ids: set[str]
    run_ids: set[str]
    sweep_ids: set[str]

    @classmethod
    def of(cls, good: list[Recorded]) -> BatchKeys:
        """The keys of a batch: its events' ids, runs, and sweeps, including every sweep a run
        event names (it may imply the sweep: the fold must know whether it exists)."""
        keys = cls(set(), set(), set())
        for rec in good:
            event = rec.event
            keys.event_ids.add(event.id)
            if isinstance(event, RunEvent):
                keys.run_ids.add(event.run_id)
                sweep_id = naming_sweep(event)
                if sweep_id is not None:
                    keys.sweep_ids.add(sweep_id)
            else:
                keys.sweep_ids.add(event.sweep_id)  # type: ignore[union-attr]
        return keys

    def lookups(self) -> list[tuple[str, tuple[str]]]:
        """(statement, parameters) for the seen ids, runs and sweeps; none for an empty key set."""
        return [(sql, json_param(keys)) for sql, keys in
                ((SELECT_SEEN, self.event_ids), (SELECT_RUNS, self.run_ids), (SELECT_SWEEPS, self.sweep_ids))
                if keys]


def views_from_rows(rows: dict[str, Iterable[Any]]) -> Views:
    """A ``Views`` over the rows ``BatchKeys.lookups`` read (keyed by statement)."""
    return Views(
        {r.run_id: r for r in map(recorded_run_from_row, rows.get(SELECT_RUNS, ()))},
        {s.sweep_id: s for s in map(sweep_from_row, rows.get(SELECT_SWEEPS, ()))},
        {row[0] for row in rows.get(SELECT_SEEN, ())},
    )


class _Lru(OrderedDict[str, V]):
    """Runs or sweeps by id, least recently used first; a plain dict to ``Views``."""

    def touch(self, keys: Iterable[str]) -> set[str]:
        """Mark ``keys`` used now; return those not held."""
        missing = set()
        for key in keys:
            if key in self:
                self.move_to_end(key)
            else:
                missing.add(key)
        return missing

    def trim(self, size: int) -> None:
        while len(self) > size:
            self.popitem(last=False)


class ViewCache:
    """The runs and sweeps recent batches touched, as folded, kept between batches by their only writer.

    What it holds is the latest state even while the batch that made it is
    still committing; what it does not hold was last changed by a committed
    batch, so any connection reads it right. The last batch's event ids are
    kept as well (its commit may not have landed): older ids are read from
    the ``seen`` table. The least recently used entries go beyond ``size``,
    which is at least two batches' worth, so nothing a committing batch
    touched is dropped. A cache is only right while its owner is the
    views' only writer: drop it when the checkpoint moves under it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: _Lru[Run] = _Lru()
        self.sweeps: _Lru[Sweep] = _Lru()
        self.last_seen: set[str] = set()

    def missing(self, keys: BatchKeys) -> BatchKeys:
        """The part of ``keys`` to read from the database."""
        return BatchKeys(keys.event_ids - self.last_seen, self.runs.touch(keys.run_ids),
                         self.sweeps.touch(keys.sweep_ids))

    def views(self, keys: BatchKeys, rows: dict[str, Iterable[Any]]) -> Views:
        """The batch's views: the rows read for what was ``missing``, over what the cache holds."""
        found = views_from_rows(rows)
        self.runs.update(found.runs)
        self.sweeps.update(found.sweeps)
        return Views(self.runs, self.sweeps, found.seen | (keys.event_ids & self.last_seen))  # type: ignore[arg-type]

    def folded(self, views: Views) -> None:
        """Keep the event ids of the batch just folded; trim to size."""
        self.last_seen = views.seen
        self.runs.trim(self.size)
        self.sweeps.trim(self.size)


async def read_views(db: aiosqlite.Connection, keys: BatchKeys, cache: ViewCache | None = None) -> Views:
    """The views a batch folds onto: what ``cache`` holds, the rest read from ``db``."""
    cache = cache or ViewCache(0)
    rows = {sql: await db.execute_fetchall(sql, params) for sql, params in cache.missing(keys).lookups()}
    return cache.views(keys, rows)


