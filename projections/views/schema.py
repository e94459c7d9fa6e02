"""The SQLite read models: tables, and the codecs between rows and the core's structs.

Times are stored as fixed-width RFC 3339 UTC text, so text order is time order.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Final

import msgspec
from msgspec.structs import astuple

from ledger.core.fold import Entry, RecordedRun
from ledger.core.machine import Run, Sweep

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO checkpoint (id, last_seq) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, sweep_id TEXT, state TEXT NOT NULL, attempt INTEGER NOT NULL,
    created_at TEXT, started_at TEXT, ended_at TEXT, last_heartbeat_at TEXT,
    step INTEGER, progress REAL, exit_code INTEGER, signal INTEGER,
    preempting INTEGER NOT NULL, reproduced_from TEXT, seq INTEGER NOT NULL, last_seen_at TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs (sweep_id, state);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, last_seen_at);
CREATE INDEX IF NOT EXISTS runs_in_sweeps_by_seq ON runs (seq) WHERE sweep_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY, state TEXT NOT NULL, created_at TEXT, updated_at TEXT,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    kind TEXT NOT NULL, entity_id TEXT NOT NULL, seq INTEGER NOT NULL,
    state TEXT NOT NULL, at TEXT NOT NULL, recorded_at TEXT NOT NULL,
    event_id TEXT NOT NULL, event_type TEXT NOT NULL, reason TEXT,
    PRIMARY KEY (kind, entity_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY, subject TEXT NOT NULL, reason TEXT NOT NULL,
    raw BLOB NOT NULL, recorded_at TEXT NOT NULL
);
"""

RUN_INDEXES: Final = ("runs_by_sweep", "runs_by_state", "runs_in_sweeps_by_seq")
"""The runs table's indexes: by sweep (a sweep's runs, its open runs), by (state, last_seen_at) (listings by
state; the monitor's expired runs and next deadline), and by seq for runs of a sweep (the sweep reactor's
"what changed since")."""
VIEW_TABLES: Final = ("runs", "sweeps", "history", "seen", "quarantine", "checkpoint")
RUN_COLUMNS: Final = Run.__struct_fields__
"""The contract's Run: what readers select (the API, the web view)."""
RECORDED_RUN_COLUMNS: Final = RecordedRun.__struct_fields__
"""Every column of ``runs``, in table order: the Run and what the fold stamps besides (``last_seen_at``)."""
SWEEP_COLUMNS: Final = Sweep.__struct_fields__
ENTRY_COLUMNS: Final = Entry.__struct_fields__


_time_encoder: Final = msgspec.json.Encoder()
_json: Final = msgspec.json.Encoder()


def json_param(values: Iterable[Any]) -> tuple[str]:
    """A list (of keys, or of rows as tuples) as the one JSON text parameter of a ``json_each`` statement."""
    return (_json.encode(list(values)).decode(),)


def iso(value: datetime | None) -> str | None:
    """Fixed-width RFC 3339 UTC text, microsecond precision (``2026-11-25T12:00:00.000000Z``).

    Through msgspec's encoder (about ten times faster than ``strftime``), which
    writes six fraction digits, or none for a whole second.
    """
    if value is None:
        return None
    if value.tzinfo is not timezone.utc:
        value = value.astimezone(timezone.utc)
    text = _time_encoder.encode(value)[1:-1].decode()
    return text if len(text) == 27 else f"{text[:-1]}.000000Z"


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bool):
        return int(value)
    return value


def run_row(run: Run) -> tuple[Any, ...]:
    """A folded run as a ``runs`` row (RECORDED_RUN_COLUMNS order; the fold keeps a RecordedRun)."""
    return tuple(map(_cell, astuple(run)))


def sweep_row(sweep: Sweep) -> tuple[Any, ...]:
    return tuple(map(_cell, astuple(sweep)))


def entry_row(kind: str, entity_id: str, entry: Entry) -> tuple[Any, ...]:
    return (kind, entity_id, *map(_cell, astuple(entry)))


def run_from_row(row: tuple[Any, ...] | Any) -> Run:
    return msgspec.convert(dict(zip(RUN_COLUMNS, row)), Run, strict=False)


def recorded_run_from_row(row: tuple[Any, ...] | Any) -> RecordedRun:
    """A whole ``runs`` row (``SELECT *``), as the fold reads it back."""
    return msgspec.convert(dict(zip(RECORDED_RUN_COLUMNS, row)), RecordedRun, strict=False)


def sweep_from_row(row: tuple[Any, ...] | Any) -> Sweep:
    return msgspec.convert(dict(zip(SWEEP_COLUMNS, row)), Sweep, strict=False)


def entry_from_row(row: tuple[Any, ...] | Any) -> Entry:
    return msgspec.convert(dict(zip(ENTRY_COLUMNS, row)), Entry, strict=False)


HISTORY_COLUMNS: Final = ("kind", "entity_id", *ENTRY_COLUMNS)


def _from_json_rows(table: str, columns: tuple[str, ...], verb: str) -> str:
    """``verb`` rows given as one JSON array of arrays (one row each, in ``columns`` order).

    One statement instead of an ``executemany`` per row: SQLite does the whole
    insert without coming back to Python (and so without the GIL). Only for
    columns of text, integers and nulls, which JSON carries exactly.
    """
    cells = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
    return f"{verb} INTO {table} ({', '.join(columns)}) SELECT {cells} FROM json_each(?)"


INSERT_ENTRIES: Final = _from_json_rows("history", HISTORY_COLUMNS, "INSERT OR REPLACE")
INSERT_ENTRY: Final = (
    f"INSERT OR REPLACE INTO history ({', '.join(HISTORY_COLUMNS)}) VALUES ({', '.join('?' * len(HISTORY_COLUMNS))})"
)
"""One history row bound as parameters: for text JSON cannot carry into SQLite (a NUL ends it there)."""
INSERT_SEEN: Final = _from_json_rows("seen", ("event_id", "seq"), "INSERT OR IGNORE")
UPSERT_RUNS: Final = _from_json_rows("runs", RECORDED_RUN_COLUMNS, "INSERT OR REPLACE")
UPSERT_SWEEPS: Final = _from_json_rows("sweeps", SWEEP_COLUMNS, "INSERT OR REPLACE")


def _trigger_step(sql: str, param: str) -> str:
    return sql.replace("json_each(?)", f"json_each(NEW.{param})") + ";"


BATCH_WRITER: Final = f"""
CREATE TEMP VIEW IF NOT EXISTS batch_writes (expected, last_seq, runs, sweeps, history, seen)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL;
CREATE TEMP TRIGGER IF NOT EXISTS batch_writes_insert INSTEAD OF INSERT ON batch_writes
BEGIN
    SELECT RAISE(ABORT, 'checkpoint moved')
        WHERE (SELECT last_seq FROM checkpoint WHERE id = 1) IS NOT NEW.expected;
    {_trigger_step(UPSERT_RUNS, "runs")}
    {_trigger_step(UPSERT_SWEEPS, "sweeps")}
    {_trigger_step(INSERT_ENTRIES, "history")}
    {_trigger_step(INSERT_SEEN, "seen")}
    UPDATE checkpoint SET last_seq = NEW.last_seq WHERE id = 1;
END;
"""
"""A whole batch as ONE statement: ``INSERT INTO batch_writes VALUES (expected checkpoint, new checkpoint,
runs, sweeps, history, seen ids)``, the last four JSON arrays of rows (or null).

A statement is atomic on its own, so the batch and its checkpoint land
together or not at all, without BEGIN/COMMIT; and SQLite does it all in one
call, where a statement per table would have the writer thread wait for
Python's GIL between each (the projector's event loop holds it while it
reads the next batch). The trigger aborts, writing nothing, when the
checkpoint is not ``expected``: another writer moved it. A per-connection
TEMP view, created by ``open_db`` on the projector's writable connections.
"""
WRITE_BATCH: Final = (
    "INSERT INTO batch_writes (expected, last_seq, runs, sweeps, history, seen) VALUES (?, ?, ?, ?, ?, ?)")
