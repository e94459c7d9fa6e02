"""Runs listed the way people look at them: newest first, filtered, a page at a time.

``GET /runs?sort=started`` and the web view's runs page read through here.
Newest first means by ``started_at`` (a run not started yet by its
``created_at``), ties by run id, both descending; the cursor is the last
row's ``KEY,RUN_ID``, so a page costs one bounded query however deep it is.
"""

from __future__ import annotations

from typing import Final, Literal

import aiosqlite

from ledger.core.machine import Run
from projections.views.schema import RUN_COLUMNS, run_from_row

Sort = Literal["run_id", "started"]
SORTS: Final = ("run_id", "started")
_KEY: Final = "coalesce(started_at, created_at, '')"
_SELECT: Final = f"SELECT {', '.join(RUN_COLUMNS)}, {_KEY} FROM runs"
PREFIX_END: Final = "~"
"""Sorts after every character an id may hold ([A-Za-z0-9_-]): ``prefix <= id < prefix + "~"``."""


def page_sql(where: list[str], order: str) -> str:
    """One page's query: the page's rowids sorted from the narrow (key, id) pairs first, then their rows.

    Without an index on the sort key SQLite scans every run either way; sorting
    only rowids and keys, then reading the page's hundred rows, costs a third of
    sorting whole rows (bench/web.py).
    """
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    return (f"{_SELECT} WHERE rowid IN (SELECT rowid FROM runs{cond} ORDER BY {order} LIMIT ?) "
            f"ORDER BY {order}")


class BadCursor(ValueError):
    """A cursor that this listing did not hand out."""


def _filters(sweep: str | None, state: str | None, prefix: str | None,
             since: str | None) -> tuple[list[str], list[object]]:
    where: list[str] = []
    args: list[object] = []
    if sweep is not None:
        where.append("sweep_id = ?")
        args.append(sweep)
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if prefix:
        where.append("run_id >= ? AND run_id < ?")
        args += [prefix, prefix + PREFIX_END]
    if since is not None:
        where.append(f"{_KEY} >= ?")
        args.append(since)
    return where, args


async def list_runs(db: aiosqlite.Connection, *, sweep: str | None = None, state: str | None = None,
                    prefix: str | None = None, since: str | None = None, sort: Sort = "run_id",
                    limit: int = 100, after: str | None = None) -> tuple[list[Run], str | None]:
    """One page of runs and the cursor of the next (None on the last page).

    ``since`` is fixed-width RFC 3339 UTC text (``projections.views.schema.iso``):
    runs started (or created, if not started) at or after it.
    """
    where, args = _filters(sweep, state, prefix, since)
    if sort == "started":
        if after is not None:
            key, sep, run_id = after.rpartition(",")
            if not sep:
                raise BadCursor(f"not a cursor of sort=started: {after[:60]!r}")
            where.append(f"({_KEY} < ? OR ({_KEY} = ? AND run_id < ?))")
            args += [key, key, run_id]
        order = f"{_KEY} DESC, run_id DESC"
    else:
        if after is not None:
            where.append("run_id > ?")
            args.append(after)
        order = "run_id"
    sql = page_sql(where, order)
    async with db.execute(sql, (*args, limit + 1)) as cur:
        rows = list(await cur.fetchall())
    runs = [run_from_row(r[:-1]) for r in rows[:limit]]
    if len(rows) <= limit:
        return runs, None
    last = rows[limit - 1]
    return runs, (f"{last[-1]},{runs[-1].run_id}" if sort == "started" else runs[-1].run_id)


async def count_runs(db: aiosqlite.Connection, *, sweep: str | None = None, state: str | None = None,
                     prefix: str | None = None, since: str | None = None) -> int:
    """How many runs the same filters match (for the page's header)."""
    where, args = _filters(sweep, state, prefix, since)
    sql = "SELECT count(*) FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
    async with db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
