"""``ledger verify``: rebuild the views from the stream and compare them with the live ones.

The live database keeps moving while a rebuild runs, so the comparison holds
one read transaction on it from the start: it sees the live views exactly at
their checkpoint C (WAL lets the projector go on meanwhile), and the rebuild
stops at C too. Tables are compared row by row in key order, streaming both
sides (memory stays flat): which table, which key, which columns differ.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.js import JetStreamContext

from ledger.errors import LedgerError
from projections.audit.rebuild import Progress, rebuild

TABLES: Final[dict[str, tuple[str, ...]]] = {
    "runs": ("run_id",),
    "sweeps": ("sweep_id",),
    "history": ("kind", "entity_id", "seq"),
    "seen": ("event_id",),
    "quarantine": ("seq",),
}
"""The view tables and their keys (the checkpoint is compared by construction)."""
MAX_SHOWN: Final = 20
"""Differences listed per table; the count covers them all."""


class Difference(msgspec.Struct, kw_only=True):
    """One row that differs: missing on one side, or some columns changed."""

    table: str
    key: list[Any]
    kind: str
    """``changed``, ``missing-in-live`` or ``extra-in-live``."""
    columns: dict[str, list[Any]] = {}
    """Column -> [live, rebuilt] for a changed row."""


class TableReport(msgspec.Struct, kw_only=True):
    live_rows: int
    rebuilt_rows: int
    differences: int
    shown: list[Difference]


class VerifyReport(msgspec.Struct, kw_only=True):
    equal: bool
    checkpoint: int
    tables: dict[str, TableReport]


def _printable(value: Any) -> Any:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, memoryview)) else value


def _rows(con: sqlite3.Connection, table: str, key: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[Any, ...]]]:
    cur = con.execute(f"SELECT * FROM {table} ORDER BY {', '.join(key)}")
    return [d[0] for d in cur.description], iter(cur)


def compare_table(live: sqlite3.Connection, rebuilt: sqlite3.Connection, table: str,
                  key: tuple[str, ...]) -> TableReport:
    """Merge both sides in key order; report rows missing on either side and columns that differ."""
    columns, left = _rows(live, table, key)
    rebuilt_columns, right = _rows(rebuilt, table, key)
    if columns != rebuilt_columns:
        raise LedgerError(f"table {table} has columns {columns} live but {rebuilt_columns} rebuilt: "
                          "views of another schema version; run `ledger replay` to rebuild them")
    at = [columns.index(k) for k in key]
    report = TableReport(live_rows=0, rebuilt_rows=0, differences=0, shown=[])

    def note(diff: Difference) -> None:
        report.differences += 1
        if len(report.shown) < MAX_SHOWN:
            report.shown.append(diff)

    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        ka = [a[i] for i in at] if a is not None else None
        kb = [b[i] for i in at] if b is not None else None
        if b is None or (ka is not None and kb is not None and ka < kb):
            report.live_rows += 1
            note(Difference(table=table, key=ka or [], kind="extra-in-live"))
            a = next(left, None)
        elif a is None or (ka is not None and kb is not None and kb < ka):
            report.rebuilt_rows += 1
            note(Difference(table=table, key=kb or [], kind="missing-in-live"))
            b = next(right, None)
        else:
            report.live_rows += 1
            report.rebuilt_rows += 1
            if a != b:
                changed = {c: [_printable(x), _printable(y)] for c, x, y in zip(columns, a, b) if x != y}
                note(Difference(table=table, key=ka or [], kind="changed", columns=changed))
            a, b = next(left, None), next(right, None)
    return report


async def verify(js: JetStreamContext, live_path: Path, *, work_dir: Path | None = None,
                 on_progress: Progress | None = None) -> VerifyReport:
    """Rebuild into a temporary database up to the live checkpoint and compare every view table."""
    if not live_path.exists():
        raise LedgerError(f"no views database at {live_path}: nothing to verify")
    live = sqlite3.connect(live_path, isolation_level=None, timeout=10)  # only read: one snapshot
    tmp = Path(tempfile.mkdtemp(prefix=".verify-", dir=work_dir or live_path.parent))
    try:
        live.execute("BEGIN")  # one snapshot of the live views for the whole run
        try:
            (checkpoint,) = live.execute("SELECT last_seq FROM checkpoint WHERE id = 1").fetchone()
        except sqlite3.OperationalError as exc:
            raise LedgerError(f"{live_path} is not a views database: {exc}") from exc
        rebuilt_path = tmp / "views.db"
        result = await rebuild(js, rebuilt_path, to_seq=checkpoint, on_progress=on_progress)
        if result.last_seq != checkpoint:
            raise LedgerError(f"the stream ends at seq {result.last_seq} but the live views are at {checkpoint}: "
                              "these views come from another stream")
        rebuilt = sqlite3.connect(rebuilt_path, isolation_level=None)
        try:
            tables = {name: compare_table(live, rebuilt, name, key) for name, key in TABLES.items()}
        finally:
            rebuilt.close()
        live.execute("COMMIT")
    finally:
        live.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return VerifyReport(equal=all(t.differences == 0 for t in tables.values()), checkpoint=checkpoint, tables=tables)
