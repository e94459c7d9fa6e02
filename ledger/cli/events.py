"""Raw stream verbs: ``ledger events tail|export|import``."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from ledger.cli.common import (
    err_console,
    fail,
    json_option,
    nats_url_option,
    nats_url_or_default,
)


@click.group()
def events() -> None:
    """Raw stream messages: tail, export to JSON lines, import into a stream."""


def _subject(run_id: str | None, sweep_id: str | None) -> str:
    from ledger.core.events import check_entity_id

    if run_id and sweep_id:
        fail("give --run or --sweep, not both")
    if run_id:
        return f"ledger.run.{check_entity_id(run_id, 'run id')}.>"
    if sweep_id:
        return f"ledger.sweep.{check_entity_id(sweep_id, 'sweep id')}.>"
    return "ledger.>"


def _line(msg: Any, as_json: bool) -> str:
    from ledger.nats.archive import encode_record, record_of

    if as_json:
        return encode_record(record_of(msg)).decode().rstrip("\n")
    record = record_of(msg)
    payload = record.data if record.data is not None else f"<{len(msg.data)} bytes, not UTF-8>"
    return f"{msg.seq:>8}  {record.time}  {msg.subject}  {payload}"


@contextlib.contextmanager
def _quiet_exit() -> Iterator[None]:
    """Ctrl-C and a closed pipe (``| head``) end the output quietly."""
    try:
        yield
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


@events.command("tail")
@click.option("--run", "run_id", default=None, help="Only this run's messages (subject ledger.run.<ID>.>).")
@click.option("--sweep", "sweep_id", default=None, help="Only this sweep's messages (subject ledger.sweep.<ID>.>).")
@click.option("-n", "--last", default=20, show_default=True, type=click.IntRange(0),
              help="Show the last N messages (0: none, with --follow only new ones).")
@click.option("--since-seq", default=None, type=click.IntRange(1), help="Show every message from this sequence on "
              "(instead of --last; --since-seq 1 prints the whole stream).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new messages as they arrive (Ctrl-C stops).")
@nats_url_option
@json_option
def tail(run_id: str | None, sweep_id: str | None, last: int, since_seq: int | None, follow: bool,
         nats_url: str | None, as_json: bool) -> None:
    """Print raw stream messages in stream order: seq, stream time, subject, payload.

    Quarantined (invalid) messages are shown like any other: this is the
    stream itself, not the views. With --json each line is one JSON object,
    in the format of ``ledger events export`` (so the output can be imported).
    """
    from ledger.nats.stream import check_stream, connect, last_seq_on, read_range

    subject = _subject(run_id, sweep_id)

    async def go() -> None:
        nc = await connect(nats_url_or_default(nats_url))
        try:
            js = nc.jetstream()
            end = int((await check_stream(js)).state.last_seq)
            if since_seq is not None:
                start = since_seq
            elif subject == "ledger.>":
                start = max(1, end - last + 1) if last else end + 1
            else:  # a filtered subject: the last N are only known by reading its messages
                kept: deque[Any] = deque(maxlen=last or None)
                exists = await last_seq_on(js, subject) > 0
                if not exists:
                    what = f"run {run_id!r}" if run_id else f"sweep {sweep_id!r}"
                    if not follow:
                        fail(f"no such {what}: the stream holds no message on {subject}")
                    err_console.print(f"no message of {what} yet; waiting for one (Ctrl-C stops)", highlight=False)
                if last and exists:
                    async with contextlib.aclosing(read_range(js, subject=subject, stop_seq=end)) as batches:
                        async for batch in batches:
                            kept.extend(batch)
                for msg in kept:
                    print(_line(msg, as_json))
                start = end + 1
                if not follow:
                    return
            if follow:
                batches = read_range(js, subject=subject, start_seq=start, follow=True)
            else:
                batches = read_range(js, subject=subject, start_seq=start, stop_seq=end)
            async with contextlib.aclosing(batches) as reading:
                async for batch in reading:
                    print("\n".join(_line(m, as_json) for m in batch), flush=follow)
        finally:
            await nc.close()

    with _quiet_exit():
        asyncio.run(go())


def _open_output(path: str) -> tuple[Any, Path | None]:
    if path == "-":
        return sys.stdout.buffer, None
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    return (gzip.open(tmp, "wb") if target.suffix == ".gz" else open(tmp, "wb")), tmp  # noqa: SIM115


@events.command("export")
@click.option("--since-seq", default=1, show_default=True, type=click.IntRange(1), help="First sequence to export.")
@click.option("--until-seq", default=None, type=click.IntRange(1),
              help="Last sequence to export  [default: the stream's last message when the export starts]")
@click.option("-o", "--output", default="-", show_default=True,
              help="File to write (FILE.gz is gzipped; written to FILE.partial, renamed when complete); - for stdout.")
@nats_url_option
@json_option
def export(since_seq: int, until_seq: int | None, output: str, nats_url: str | None, as_json: bool) -> None:
    """Export stream messages as JSON lines: seq, subject, time, headers, raw payload.

    Every message goes out byte for byte, quarantined ones too (a payload that
    is not UTF-8 goes in data_b64). ``time`` is when the ledger recorded the
    message. Prints a summary (to stderr when the export goes to stdout).
    """
    from ledger.cli.progress import progress_bar
    from ledger.nats.archive import export_bounds, export_stream
    from ledger.nats.stream import check_stream, connect

    async def go() -> dict[str, Any]:
        nc = await connect(nats_url_or_default(nats_url))
        try:
            js = nc.jetstream()
            await check_stream(js)
            first, end = await export_bounds(js, since_seq, until_seq)
            out, tmp = _open_output(output)
            try:
                with progress_bar("export", max(0, end - first + 1), "messages") as bar:
                    result = await export_stream(js, out, since_seq=since_seq, until_seq=until_seq,
                                                 on_progress=lambda seq: bar(seq - first + 1))
            except BaseException:
                if tmp is not None:
                    out.close()
                    tmp.unlink(missing_ok=True)
                raise
            if tmp is not None:
                out.close()
                os.replace(tmp, output)
            return {"messages": result.messages, "first_seq": result.first_seq, "last_seq": result.last_seq,
                    "output": output}
        finally:
            await nc.close()

    summary = asyncio.run(go())
    text = (json.dumps(summary) if as_json else
            f"exported {summary['messages']} messages (seq {summary['first_seq']}..{summary['last_seq']}) to {output}")
    if output == "-":
        err_console.print(text, highlight=False, soft_wrap=True)
    else:
        print(text)


class _Lines:
    """The lines of an export file (plain or gzipped), with how far reading got, for the progress bar."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path == "-":
            self.raw: IO[bytes] = sys.stdin.buffer
            self.size = None
        else:
            try:
                self.raw = open(path, "rb")  # noqa: SIM115
            except OSError as exc:
                fail(f"cannot read {path}: {exc.strerror}")
            self.size = os.fstat(self.raw.fileno()).st_size
        self.lines: Any = gzip.GzipFile(fileobj=self.raw) if path.endswith(".gz") else self.raw

    def position(self) -> int:
        try:
            return self.raw.tell()
        except OSError:
            return 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.lines)

    def close(self) -> None:
        if self.path != "-":
            self.raw.close()


@events.command("import")
@click.argument("file")
@click.option("--append", is_flag=True,
              help="Import even though the stream holds messages that did not come from an import (added after them; "
                   "resumes after the last imported message among the last 1000).")
@nats_url_option
@json_option
def import_(file: str, append: bool, nats_url: str | None, as_json: bool) -> None:
    """Import an export file (JSON lines, FILE.gz or - for stdin) into the LEDGER stream.

    Resumable and idempotent: each message carries the seq it had in the
    export, and a new run skips everything up to the target stream's last
    imported message (checking it is the same file). Into an empty stream the
    copy is exact (same sequences, payloads and recorded times), so replaying
    it gives the same views. Interrupted? Run the same command again.
    """
    from ledger.cli.progress import progress_bar
    from ledger.nats.archive import import_stream
    from ledger.nats.stream import connect, stream_last_seq

    lines = _Lines(file)

    async def go() -> dict[str, Any]:
        nc = await connect(nats_url_or_default(nats_url))
        try:
            with progress_bar(f"import {Path(file).name}", lines.size, "bytes") as bar:
                result = await import_stream(nc, lines, append=append, name=file,
                                             on_progress=lambda _: bar(lines.position()))
                bar(lines.size)
            stream_last = await stream_last_seq(nc.jetstream())  # the stream's own, also when nothing was sent
            return {"read": result.read, "imported": result.imported, "skipped": result.skipped,
                    "duplicates": result.duplicates, "resumed_after": result.resumed_after,
                    "last_export_seq": result.last_export_seq, "stream_last_seq": stream_last}
        finally:
            lines.close()
            await nc.close()

    summary = asyncio.run(go())
    if as_json:
        print(json.dumps(summary))
        return
    resumed = f", resumed after export seq {summary['resumed_after']}" if summary["resumed_after"] else ""
    dupes = f", {summary['duplicates']} dropped by JetStream as duplicates" if summary["duplicates"] else ""
    print(f"imported {summary['imported']} of {summary['read']} messages ({summary['skipped']} already there{resumed}"
          f"{dupes}); stream at seq {summary['stream_last_seq']}")
