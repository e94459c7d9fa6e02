"""Rebuilding the views from the stream into a fresh database, and swapping it in.

``rebuild`` folds the stream (up to a sequence) into a new SQLite file with
the very code the projector uses (``decode_batch``, ``Views``,
``write_batch``), so a rebuilt database equals the live one row for row. It
is tuned for a private file nobody reads yet: no journal, no fsync until the
end, secondary indexes built last, and the runs and sweeps a batch touches
kept in a bounded cache (memory stays flat in the number of events).

``replay`` builds the next generation ``views-<n>.db`` beside the live one
and swaps it in by replacing the ``views.db`` symlink with ``os.replace``
(atomic). Readers of ``views.db`` (the HTTP API, the projector of a running
``ledger up``, in any process) stat the path per request or batch and reopen
when it names another file; the projector then goes on from the new file's
own checkpoint. The previous generation is kept (an undo: point the symlink
back), older ones are deleted.

    data_dir/views.db -> views-7.db      the live views (readers open this path)
    data_dir/views-6.db                  the previous generation
    data_dir/views.lock                  held while a replay builds and swaps
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from nats.js import JetStreamContext

from ledger.errors import LedgerError
from ledger.nats.stream import StreamMessage, last_seq_on, read_range
from projections.views.lookups import BatchKeys, ViewCache
from projections.views.schema import BATCH_WRITER, RUN_INDEXES, SCHEMA
from projections.views.store import decode_batch, fold, write_batch

VIEWS: Final = "views.db"
GENERATION_RE: Final = re.compile(r"^views-(\d+)\.db$")
CACHE_ENTITIES: Final = 10_000
"""Runs (and sweeps) kept in memory between batches; the rest are read back from the file."""

Progress = Callable[[int, int], None]
"""Called after each batch with (last sequence applied, last sequence to apply)."""

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class RebuildResult:
    """What a rebuild did: the checkpoint it reached, messages read, time taken, outcomes."""

    path: Path
    last_seq: int
    messages: int
    seconds: float
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class _Builder:
    """The synchronous half of a rebuild: one private SQLite connection."""

    def __init__(self, path: Path, cache_size: int) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-8192", "temp_store=MEMORY",
                       "locking_mode=EXCLUSIVE"):
            self.con.execute(f"PRAGMA {pragma}")
        self.con.executescript(SCHEMA)
        self.con.executescript(BATCH_WRITER)
        for index in RUN_INDEXES:  # built once at the end: cheaper than kept up to date row by row
            self.con.execute(f"DROP INDEX IF EXISTS {index}")
        self.cache = ViewCache(cache_size)
        self.last_seq = 0

    def apply(self, msgs: list[StreamMessage]) -> Counter[str]:
        """Fold one batch and write it with its checkpoint, through the projector's own ``write_batch``."""
        good, bad = decode_batch(msgs)
        keys = BatchKeys.of(good)
        lookups = self.cache.missing(keys).lookups()
        views = self.cache.views(keys, {sql: self.con.execute(sql, params).fetchall() for sql, params in lookups})
        folded = fold(views, good, bad, msgs[-1].seq)
        self.cache.folded(views)
        write_batch(self.con, folded.writes, self.last_seq)
        self.last_seq = msgs[-1].seq
        return folded.outcomes

    def finish(self) -> None:
        """Build the indexes, switch to WAL (as the live views run) and make the file durable."""
        self.con.executescript(SCHEMA)  # IF NOT EXISTS: creates only the indexes dropped above
        self.con.execute("PRAGMA locking_mode=NORMAL")
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.close()

    def close(self) -> None:
        self.con.close()


def remove_db(path: Path) -> None:
    """Delete a database file with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def rebuild(js: JetStreamContext, path: Path, *, to_seq: int | None = None, batch_size: int = 5000,
                  on_progress: Progress | None = None, cache_size: int = CACHE_ENTITIES) -> RebuildResult:
    """Fold the stream from its start up to ``to_seq`` (default: its last message now) into a new file.

    ``path`` must not hold a database yet. Blocks the event loop for each
    batch it folds (tens of milliseconds): run it where nothing else must answer fast.
    """
    if path.exists():
        raise LedgerError(f"{path} already exists: a rebuild writes a fresh database")
    started = time.perf_counter()
    stop = await last_seq_on(js)
    if to_seq is not None:
        stop = min(stop, to_seq)
    builder = _Builder(path, cache_size)
    result = RebuildResult(path, 0, 0, 0.0)
    try:
        async with contextlib.aclosing(read_range(js, stop_seq=stop, batch_size=batch_size)) as batches:
            async for batch in batches:
                # In the event loop's thread on purpose: folding is Python holding the GIL, and a
                # worker thread only adds contention. The server keeps sending meanwhile (the
                # reader's pull requests are out), into the socket buffers.
                result.outcomes.update(builder.apply(batch))
                result.messages += len(batch)
                result.last_seq = batch[-1].seq
                if on_progress:
                    on_progress(result.last_seq, stop)
        builder.finish()
    except BaseException:
        builder.close()
        remove_db(path)
        raise
    _fsync(path)
    if on_progress:
        on_progress(result.last_seq, stop)
    result.seconds = time.perf_counter() - started
    result.outcomes = +result.outcomes  # drop zero counts
    return result


# --------------------------------------------------------------------------- generations and the swap

@contextlib.contextmanager
def replay_lock(data_dir: Path) -> Iterator[None]:
    """One replay at a time per data dir (a second one fails at once with a clear error)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "views.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LedgerError(f"another replay is running on {data_dir}") from exc
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generations(data_dir: Path) -> dict[int, Path]:
    """The generation files in ``data_dir`` by number."""
    found = {}
    for path in data_dir.iterdir() if data_dir.is_dir() else ():
        match = GENERATION_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def current_views(data_dir: Path) -> Path | None:
    """The file ``views.db`` names: itself when it is a plain file, its target when a symlink, None when absent."""
    link = data_dir / VIEWS
    if link.is_symlink():
        return data_dir / os.readlink(link)
    return link if link.exists() else None


def swap_in(data_dir: Path, new: Path) -> Path | None:
    """Point ``views.db`` at ``new`` atomically; return the previous generation kept as the undo.

    A plain ``views.db`` (before the first replay) is kept as ``views-0.db``
    by a hard link, so it stays reachable after the symlink replaces its name.
    """
    link = data_dir / VIEWS
    previous = current_views(data_dir)
    if previous == link:
        kept = data_dir / "views-0.db"
        if not kept.exists():
            _checkpoint_wal(link)  # its WAL is named after views.db: fold it in before the name goes
            os.link(link, kept)
        previous = kept
    tmp = data_dir / f".{VIEWS}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(new.name, tmp)
    os.replace(tmp, link)
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return previous


def _checkpoint_wal(path: Path) -> None:
    """Copy the WAL's pages into the database file (best effort: readers may hold some back)."""
    try:
        con = sqlite3.connect(path, timeout=5)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        pass


def prune(data_dir: Path, keep: set[Path]) -> list[Path]:
    """Delete generation files other than ``keep``; a reader still on one finishes on its open file."""
    removed = []
    for path in generations(data_dir).values():
        if path not in keep:
            remove_db(path)
            removed.append(path)
    return removed


def prune_plain_wal(data_dir: Path) -> None:
    """Delete the WAL files of the plain ``views.db`` of before the first replay (its connections are gone)."""
    if (data_dir / VIEWS).is_symlink():
        for suffix in ("-wal", "-shm"):
            (data_dir / f"{VIEWS}{suffix}").unlink(missing_ok=True)


@dataclass
class ReplayResult:
    rebuild: RebuildResult
    views: Path
    previous: Path | None
    removed: list[Path]


async def replay(js: JetStreamContext, data_dir: Path, *, to_seq: int | None = None,
                 on_progress: Progress | None = None, batch_size: int = 5000) -> ReplayResult:
    """Rebuild the views into the next generation file and swap it in while readers keep serving."""
    with replay_lock(data_dir):
        current = current_views(data_dir)
        numbers = list(generations(data_dir))
        if current is not None and GENERATION_RE.match(current.name):
            numbers.append(int(GENERATION_RE.match(current.name).group(1)))  # type: ignore[union-attr]
        new = data_dir / f"views-{max(numbers, default=0) + 1}.db"
        remove_db(new)
        prune_plain_wal(data_dir)  # from a swap before this one: nothing uses them by now
        result = await rebuild(js, new, to_seq=to_seq, on_progress=on_progress, batch_size=batch_size)
        previous = swap_in(data_dir, new)
        keep = {new} | ({previous} if previous is not None else set())
        removed = prune(data_dir, keep)
    return ReplayResult(result, new, previous, removed)
