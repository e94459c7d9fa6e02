"""The job side never jams and never lies (issue 14), against a real nats-server: poison events,
a failing spool, process-group signals, a terminal, the ledger's own clock, read-only verbs, and
spools meant for another ledger."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.events import MAX_EVENT_BYTES
from ledger.errors import InvalidEvent
from ledger.ids import new_id
from ledger.jobs.client import AsyncLedger
from ledger.jobs.spool import Spool, owner_of
from ledger.jobs.sync_client import Ledger
from ledger.nats.stream import STREAM
from tests.jobs import LEDGER, job_env, ledger_run, run_events, types, wait_until

PY = sys.executable
HUGE = "x" * (2 * 1024 * 1024)
"""A heartbeat message over NATS's max_payload (1 MiB): the issue's poison event."""


def dead_owner() -> str:
    """The spool owner of a process that has ended (as `ledger sync` finds a dead job's rows)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return owner_of(proc.pid)


def event_row(event: ev.AnyEvent) -> tuple[str, bytes, str]:
    return ev.subject_of(event), ev.encode_event(event), event.id


def raw_heartbeat(run_id: str, message: str) -> tuple[str, bytes, str]:
    """A spool row as an older client wrote it, unchecked: a heartbeat of any size."""
    event = ev.RunHeartbeat(id=new_id(), at=ev_now(), run_id=run_id, attempt=1, message=message)
    return event_row(event)


def ev_now():  # type: ignore[no-untyped-def]
    from ledger.jobs.client import now

    return now()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def kill_group(proc: subprocess.Popen[str], ready: Path) -> None:
    """Leave nothing behind: the wrapper, and the child's process group (its pgid is in ``ready``)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    try:
        os.killpg(int(ready.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass  # gone already, or never started


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


class TestPutChecks:
    async def test_oversized_heartbeat_is_refused_at_once(self, js: JetStreamContext, nats_url: str,
                                                          spool_path: Path) -> None:
        """A heartbeat larger than the ledger accepts is a one-line InvalidEvent to the caller; nothing is spooled."""
        client = await AsyncLedger.connect(nats_url, spool=spool_path)
        try:
            run = await client.start_run("big", heartbeat=None)
            with pytest.raises(InvalidEvent, match=f"too large: .* > {MAX_EVENT_BYTES}"):
                await run.heartbeat(message=HUGE)
            with pytest.raises(InvalidEvent):
                await run.heartbeat(progress=3.0)  # out of 0..1: the ledger would only quarantine it
            assert 0 == await client.spool.count()
            await run.exited(0)
        finally:
            assert await client.close()
        assert ["run.started", "run.exited"] == types(await run_events(js, "big"))

    def test_sync_client_heartbeat_raises_in_the_caller(self, js: JetStreamContext, nats_url: str,
                                                        spool_path: Path) -> None:
        """The synchronous client checks a heartbeat in the calling thread, before it returns."""
        ledger = Ledger.connect(nats_url, spool=spool_path)
        try:
            run = ledger.start_run("big-sync", heartbeat=None)
            with pytest.raises(InvalidEvent, match="too large"):
                run.heartbeat(message=HUGE)
            run.heartbeat(step=1)
            run.exited(0)
        finally:
            assert ledger.close()


class TestRefusedForGood:
    async def test_poison_row_is_set_aside_and_the_exit_behind_it_is_sent(
            self, js: JetStreamContext, nats_url: str, spool_path: Path) -> None:
        """A spooled 2 MB heartbeat is set aside (kept, counted, reported); the run.exited behind it is delivered."""
        lines: list[str] = []
        client = await AsyncLedger.connect(nats_url, spool=spool_path, report=lines.append)
        try:
            run = await client.start_run("poison", heartbeat=None)
            await client.spool.add(client.outbox.owner, [raw_heartbeat("poison", HUGE)], url=client.url)
            await run.exited(0, wait=20)
        finally:
            drained = await client.close(drain=20)
        assert drained
        assert ["run.started", "run.exited"] == types(await run_events(js, "poison"))
        spool = await Spool(spool_path).open()
        try:
            refused = await spool.refused()
            assert (1, 0) == (len(refused), await spool.count())
        finally:
            await spool.close()
        assert "ledger.run.poison.heartbeat" == refused[0].subject and refused[0].size > 2 * 1024 * 1024
        assert "MaxPayloadError" in refused[0].reason
        assert any("refused an event for good" in line for line in lines)

    async def test_stream_limit_is_told_by_err_code(self, js: JetStreamContext, nats_url: str,
                                                    spool_path: Path) -> None:
        """A heartbeat over the stream's max_msg_size is refused by JetStream (10054), set aside; the exit follows."""
        info = await js.stream_info(STREAM)
        config = info.config
        config.max_msg_size = 8192
        await js.update_stream(config)
        lines: list[str] = []
        client = await AsyncLedger.connect(nats_url, spool=spool_path, report=lines.append)
        try:
            run = await client.start_run("limit", heartbeat=None)
            await run.heartbeat(message="y" * 20_000)  # under the ledger's own limit, over this stream's
            await run.heartbeat(step=2)
            await run.exited(0, wait=20)
        finally:
            assert await client.close(drain=20)
        assert ["run.started", "run.heartbeat", "run.exited"] == types(await run_events(js, "limit"))
        assert 1 == client.outbox.set_aside
        assert any("(10054)" in line for line in lines)

    async def test_sync_reports_what_it_set_aside(self, js: JetStreamContext, nats_url: str, tmp_path: Path,
                                                  spool_path: Path) -> None:
        """`ledger sync` sends a dead job's rows around a poison one, and lists the one it set aside."""
        spool = await Spool(spool_path).open()
        started = ev.RunStarted(id=new_id(), at=ev_now(), run_id="dead", attempt=1)
        exited = ev.RunExited(id=new_id(), at=ev_now(), run_id="dead", attempt=1, exit_code=0)
        try:
            await spool.add(dead_owner(), [event_row(started), raw_heartbeat("dead", HUGE), event_row(exited)],
                            url=nats_url)
        finally:
            await spool.close()
        env = job_env(nats_url, tmp_path)
        sync = subprocess.run([*LEDGER, "sync", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert 0 == sync.returncode, sync.stderr
        assert {"sent": 2, "left": 0, "set_aside": 1, "elsewhere": 0} == json.loads(sync.stdout)
        assert "refused an event for good" in sync.stderr
        assert ["run.started", "run.exited"] == types(await run_events(js, "dead"))
        again = subprocess.run([*LEDGER, "sync"], env=env, capture_output=True, text=True, timeout=60)
        assert 0 == again.returncode, again.stderr
        assert "1 event(s) refused by the ledger for good" in again.stdout
        assert "ledger.run.dead.heartbeat" in again.stdout

    async def test_ledger_run_reports_a_refused_event_on_stderr(self, js: JetStreamContext, nats_url: str,
                                                                tmp_path: Path) -> None:
        """A poison row spooled by the child (an older client) is reported on the job's stderr; the exit still lands."""
        script = (
            "import asyncio, os\n"
            "from ledger.jobs.spool import Spool, owner_of\n"
            "from tests.test_jobside import raw_heartbeat, HUGE\n"
            "async def main():\n"
            "    spool = await Spool(os.environ['LEDGER_SPOOL']).open()\n"
            "    await spool.add(owner_of(os.getpid()), [raw_heartbeat(os.environ['LEDGER_RUN_ID'], HUGE)],\n"
            "                    url=os.environ['LEDGER_NATS_URL'])\n"
            "    await spool.close()\n"
            "asyncio.run(main())\n"
        )
        env = job_env(nats_url, tmp_path)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        code, _, err = finish(ledger_run(["--run-id", "child-poison", "--drain", "20", "--", PY, "-c", script], env))
        assert 0 == code, err
        assert "refused an event for good" in err
        assert "1 event(s) refused by the ledger for good are kept aside" in err
        assert ["run.started", "run.exited"] == types(await run_events(js, "child-poison"))


class TestFailingSpool:
    async def test_an_unwritable_spool_neither_stops_the_loop_nor_loses_the_exit(
            self, js: JetStreamContext, nats_url: str, spool_path: Path) -> None:
        """With its spool gone read-only mid-run, a job's events go straight to NATS; once writable again, it spools."""
        lines: list[str] = []
        client = await AsyncLedger.connect(nats_url, spool=spool_path, report=lines.append)
        writable = client.spool._db
        read_only = await aiosqlite.connect(f"file:{spool_path}?mode=ro", uri=True, isolation_level=None)
        try:
            run = await client.start_run("ro", heartbeat=None)
            client.spool._db = read_only  # the file can no longer be written
            await run.heartbeat(step=1)
            await run.exited(0, wait=20)
            assert await client.outbox.drain(20)
            assert any("fails" in line and "readonly" in line for line in lines)
            client.spool._db = writable  # the disk is back: the loop still runs and spools again
            await client.publish(ev.RunHeartbeat(id=new_id(), at=ev_now(), run_id="ro2", attempt=1), wait=20)
        finally:
            client.spool._db = writable
            await read_only.close()
            assert await client.close(drain=20)
        assert ["run.started", "run.heartbeat", "run.exited"] == types(await run_events(js, "ro"))
        assert ["run.heartbeat"] == types(await run_events(js, "ro2"))

    async def test_ledger_run_with_a_full_disk_ends_with_the_childs_code(
            self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """A spool that cannot grow (file size limit) never hangs `ledger run`: the child's code, the exit recorded."""
        release = tmp_path / "release"
        script = (f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): time.sleep(0.01)\n"
                  "raise SystemExit(5)\n")

        def limit_file_size() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))

        env = job_env(nats_url, tmp_path)
        proc = subprocess.Popen([*LEDGER, "run", "--run-id", "full", "--heartbeat", "0.05", "--drain", "20", "--",
                                 PY, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=limit_file_size)
        try:
            assert proc.stderr is not None
            seen = ""
            deadline = time.monotonic() + 60
            while "fails" not in seen:
                assert time.monotonic() < deadline, f"the spool never failed: {seen}"
                ready, _, _ = select.select([proc.stderr], [], [], 0.5)
                if ready:
                    line = proc.stderr.readline()
                    assert line or proc.poll() is None, f"ledger run ended early: {seen}"
                    seen += line
            release.touch()
            code, _, err = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert 5 == code, seen + err
        kinds = types(await run_events(js, "full"))
        assert ("run.started", "run.exited") == (kinds[0], kinds[-1])


class TestProcessGroup:
    async def test_grandchild_hears_sigterm(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """SIGTERM to `ledger run` reaches a worker the child spawned (the whole group), and is recorded."""
        ready, got = tmp_path / "ready", tmp_path / "got"
        worker = (
            "import os, pathlib, signal, sys\n"
            f"signal.signal(signal.SIGTERM, lambda s, f: (pathlib.Path({str(got)!r}).touch(), sys.exit(0)))\n"
            f"pathlib.Path({str(ready)!r}).write_text(str(os.getpgrp()))\n"
            "while True: signal.pause()\n"
        )
        child = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {worker!r}])\n"
        proc = ledger_run(["--run-id", "grand", "--", PY, "-c", child], job_env(nats_url, tmp_path))
        try:
            wait_until(ready.exists, timeout=60, what="the grandchild to be ready")
            proc.send_signal(signal.SIGTERM)
            wait_until(got.exists, timeout=60, what="the grandchild to hear SIGTERM")
            code, _, err = finish(proc)
        finally:
            kill_group(proc, ready)
        assert code in (0, 143), err  # the child (python) dies of SIGTERM or ends after its worker
        signalled = [(e.signal, e.name) for e in await run_events(js, "grand") if isinstance(e, ev.RunSignalled)]
        assert [(signal.SIGTERM, "SIGTERM")] == signalled

    async def test_sighup_is_forwarded_and_recorded(self, js: JetStreamContext, nats_url: str,
                                                    tmp_path: Path) -> None:
        """SIGHUP (a closed ssh session) is forwarded like SIGTERM and recorded as run.signalled."""
        ready, got = tmp_path / "ready", tmp_path / "got"
        script = (
            "import os, pathlib, signal, sys\n"
            f"signal.signal(signal.SIGHUP, lambda s, f: (pathlib.Path({str(got)!r}).touch(), sys.exit(0)))\n"
            f"pathlib.Path({str(ready)!r}).write_text(str(os.getpgrp()))\n"
            "while True: signal.pause()\n"
        )
        proc = ledger_run(["--run-id", "hup", "--", PY, "-c", script], job_env(nats_url, tmp_path))
        try:
            wait_until(ready.exists, timeout=60, what="the child to be ready")
            proc.send_signal(signal.SIGHUP)
            code, _, err = finish(proc)
        finally:
            kill_group(proc, ready)
        assert 0 == code, err
        assert got.exists()
        events = await run_events(js, "hup")
        assert [(signal.SIGHUP, "SIGHUP")] == [(e.signal, e.name) for e in events if isinstance(e, ev.RunSignalled)]
        assert "run.exited" == types(events)[-1]


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: the master fd, and the slave's path for a new session to open as its terminal."""
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)  # the slave stays open here, so reads of the master never see a hang-up
    finally:
        os.close(slave)
        os.close(master)


ON_TERMINAL = """
import os, sys
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)  # the first terminal a session leader opens becomes its own
for n in (0, 1, 2):
    os.dup2(fd, n)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def read_until(master: int, needle: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r} on the terminal; saw {seen!r}")
        ready, _, _ = select.select([master], [], [], min(left, 0.5))
        if ready:
            try:
                seen += os.read(master, 4096)
            except OSError:  # the terminal closed: nothing more will come
                raise AssertionError(f"the terminal closed before {needle!r}; saw {seen!r}") from None
    return seen


class TestTerminal:
    async def test_child_reading_stdin_is_not_stopped(self, js: JetStreamContext, nats_url: str, tmp_path: Path,
                                                      terminal: tuple[int, str]) -> None:
        """Under a terminal the child reads its input (not stopped by SIGTTIN); then the shell has the terminal back."""
        master, tty = terminal
        script = "print(input('name? ')[::-1], flush=True)"
        run = " ".join([*LEDGER, "run", "--run-id", "tty", "--", PY, "-c", f'"{script}"'])
        shell = f"{run}; echo wrapper-exit-$?; read after; echo shell-read-$after"  # the shell reads after it
        proc = subprocess.Popen([PY, "-c", ON_TERMINAL, tty, "sh", "-c", shell],
                                env=job_env(nats_url, tmp_path), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            read_until(master, b"name? ")
            os.write(master, b"abc\n")
            read_until(master, b"cba")
            read_until(master, b"wrapper-exit-0")
            os.write(master, b"xyz\n")
            read_until(master, b"shell-read-xyz")  # the wrapper gave the foreground back: the shell is not stopped
            assert 0 == proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert ["run.started", "run.exited"] == types(await run_events(js, "tty"))


    async def test_ctrl_z_stops_the_job_and_fg_resumes_it(self, js: JetStreamContext, nats_url: str, tmp_path: Path,
                                                          terminal: tuple[int, str]) -> None:
        """Ctrl-Z stops the child and the wrapper with it (the terminal goes back); continued, the child reads on."""
        master, tty = terminal
        script = "print(input('name? ')[::-1], flush=True)"
        proc = subprocess.Popen([PY, "-c", ON_TERMINAL, tty, *LEDGER, "run", "--run-id", "ctrlz", "--", PY, "-c",
                                 script], env=job_env(nats_url, tmp_path), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            read_until(master, b"name? ")
            os.write(master, b"\x1a")  # Ctrl-Z: the terminal sends SIGTSTP to its foreground group
            wait_until(lambda: process_state(proc.pid) == "T" and os.tcgetpgrp(master) == proc.pid, timeout=60,
                       what="the wrapper to stop and hold the terminal again")
            os.kill(proc.pid, signal.SIGCONT)  # what `fg` does, the terminal being the wrapper's already
            wait_until(lambda: os.tcgetpgrp(master) != proc.pid, timeout=60, what="the child to get the terminal")
            os.write(master, b"abc\n")
            read_until(master, b"cba")
            assert 0 == proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert ["run.started", "run.exited"] == types(await run_events(js, "ctrlz"))


def process_state(pid: int) -> str:
    """The state letter of a process (R, S, T for stopped...), from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class TestSyncElsewhere:
    async def test_sync_to_another_url_is_refused(self, js: JetStreamContext, nats_url: str, tmp_path: Path,
                                                  spool_path: Path) -> None:
        """Rows spooled for another ledger are not sent to this one unless --any-url says so."""
        other = "nats://ledger-elsewhere.example:4222"
        spool = await Spool(spool_path).open()
        started = ev.RunStarted(id=new_id(), at=ev_now(), run_id="moved", attempt=1)
        exited = ev.RunExited(id=new_id(), at=ev_now(), run_id="moved", attempt=1, exit_code=0)
        try:
            await spool.add(dead_owner(), [event_row(started), event_row(exited)], url=other)
        finally:
            await spool.close()
        env = job_env(nats_url, tmp_path)
        refused = subprocess.run([*LEDGER, "sync", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert 1 == refused.returncode
        assert f"refused 2 event(s) spooled for {other}, not {nats_url}" in refused.stderr
        assert {"sent": 0, "left": 2, "set_aside": 0, "elsewhere": 2} == json.loads(refused.stdout)
        assert [] == await run_events(js, "moved")
        allowed = subprocess.run([*LEDGER, "sync", "--any-url", "--json"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert 0 == allowed.returncode, allowed.stderr
        assert {"sent": 2, "left": 0, "set_aside": 0, "elsewhere": 0} == json.loads(allowed.stdout)
        assert ["run.started", "run.exited"] == types(await run_events(js, "moved"))


def audit_json(run_id: str, env: dict[str, str]) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([*LEDGER, "audit", run_id, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert 0 == done.returncode, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


class TestLedgerClock:
    async def test_forged_recorded_at_is_ignored_and_an_imports_is_honoured(
            self, js: JetStreamContext, nc, nats_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """A plain publish with Ledger-Recorded-At 2001 shows its stream time; an imported message keeps its own."""
        from ledger.nats.archive import (
            ExportRecord,
            encode_record,
            export_stream,
            import_stream,
        )
        from ledger.nats.publisher import Publisher
        from ledger.nats.stream import read_range
        from projections.views.store import decode_batch

        forged = ev.RunStarted(id=new_id(), at=ev_now(), run_id="forged", attempt=1)
        publisher = Publisher(nc)
        try:
            future = await publisher.submit_raw(ev.subject_of(forged), ev.encode_event(forged),
                                                {"Nats-Msg-Id": forged.id,
                                                 "Ledger-Recorded-At": "2001-01-01T00:00:00Z"})
            await publisher.wait(future)
        finally:
            await publisher.close()
        old = ev.RunStarted(id=new_id(), at=ev_now(), run_id="old", attempt=1)
        record = ExportRecord(seq=7, subject=ev.subject_of(old), time="2020-02-02T02:02:02.000000Z",
                              headers={"Nats-Msg-Id": old.id}, data=ev.encode_event(old).decode())
        result = await import_stream(nc, [encode_record(record)], append=True)
        assert 1 == result.imported

        env = job_env(nats_url, tmp_path)
        [forged_entry] = audit_json("forged", env)["events"]
        [old_entry] = audit_json("old", env)["events"]
        assert not forged_entry["recorded_at"].startswith("2001")
        assert forged_entry["recorded_at"][:4] == str(ev_now().year)
        assert old_entry["recorded_at"].startswith("2020-02-02T02:02:02")

        msgs = [m for batch in [b async for b in read_range(js)] for m in batch]
        good, _ = decode_batch(msgs)  # what the projector folds
        years = {r.event.run_id: r.recorded_at.year for r in good}  # type: ignore[attr-defined]
        assert {"forged": ev_now().year, "old": 2020} == years

        out = tmp_path / "export.jsonl"
        with out.open("wb") as f:
            await export_stream(js, f)
        times = {json.loads(line)["subject"]: json.loads(line)["time"] for line in out.read_text().splitlines()}
        assert times["ledger.run.old.started"].startswith("2020-02-02T02:02:02")
        assert not times["ledger.run.forged.started"].startswith("2001")


class TestReadVerbs:
    async def test_read_verbs_leave_the_stream_config_alone(self, js: JetStreamContext, nats_url: str,
                                                            tmp_path: Path) -> None:
        """audit, events tail and events export read the stream with stream_info: an operator's config stays as set."""
        info = await js.stream_info(STREAM)
        config = info.config
        config.max_msg_size = 4096
        config.description = "kept as the operator set it"
        await js.update_stream(config)
        client = await AsyncLedger.connect(nats_url, spool=tmp_path / "spool.db")
        try:
            run = await client.start_run("read", heartbeat=None)
            await run.exited(0)
        finally:
            assert await client.close()
        env = job_env(nats_url, tmp_path)
        for verb in (["audit", "read"], ["events", "tail", "--last", "5"],
                     ["events", "export", "-o", str(tmp_path / "out.jsonl")]):
            done = subprocess.run([*LEDGER, *verb], env=env, capture_output=True, text=True, timeout=60)
            assert 0 == done.returncode, (verb, done.stderr)
        after = (await js.stream_info(STREAM)).config
        assert (4096, "kept as the operator set it") == (after.max_msg_size, after.description)

    async def test_read_verb_on_a_missing_stream_is_one_line_and_creates_nothing(
            self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """Against a server without the stream a read verb says so in one line and does not create it."""
        from nats.js.errors import NotFoundError

        await js.delete_stream(STREAM)
        done = subprocess.run([*LEDGER, "events", "tail"], env=job_env(nats_url, tmp_path), capture_output=True,
                              text=True, timeout=60)
        assert 1 == done.returncode
        assert "stream LEDGER does not exist" in done.stderr
        assert 1 == len(done.stderr.strip().splitlines())
        with pytest.raises(NotFoundError):
            await js.stream_info(STREAM)

    async def test_ensure_stream_keeps_the_import_marks(self, js: JetStreamContext, nc) -> None:  # type: ignore[no-untyped-def]
        """`ledger up` bringing the stream to its config keeps the import marks in its metadata."""
        from ledger.nats.archive import record_imported
        from ledger.nats.stream import IMPORTED_KEY, ensure_stream

        await record_imported(js, [3, 4, 5, 9])
        config = (await js.stream_info(STREAM)).config
        config.max_msg_size = 4096
        await js.update_stream(config)
        info = await ensure_stream(js)
        assert "3-5,9" == (info.config.metadata or {}).get(IMPORTED_KEY)
        assert info.config.max_msg_size == 1024 * 1024


READER_CONF = """
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{store}" }}
accounts {{
  L: {{
    jetstream: enabled
    users: [
      {{ user: admin, password: admin }}
      {{ user: reader, password: reader, permissions: {{
          publish: {{ deny: ["$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.DELETE.>",
                             "$JS.API.STREAM.PURGE.>", "ledger.>"] }}
      }} }}
    ]
  }}
}}
"""


@pytest.fixture
def read_only_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server whose ``reader`` user may read the stream but not create, update or append to it."""
    from ledger.nats.server import free_port, nats_server_binary

    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(READER_CONF.format(port=port, store=tmp_path / "store"))
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=30, what="nats-server to listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


class TestReadRole:
    async def test_read_verbs_work_for_a_role_that_may_not_update_the_stream(
            self, read_only_server: str, tmp_path: Path) -> None:
        """With only the rights to read (no update_stream), audit and events tail/export work."""
        from ledger.nats.publisher import Publisher
        from ledger.nats.stream import connect, ensure_stream, stream_config

        admin = await connect(f"nats://admin:admin@{read_only_server}")
        try:
            info = await ensure_stream(admin.jetstream())
            info.config.max_msg_size = 4096  # an operator's own limit: a verb that "ensured" it would update it
            await admin.jetstream().update_stream(info.config)
            publisher = Publisher(admin)
            await publisher.publish(ev.RunStarted(id=new_id(), at=ev_now(), run_id="ro-role", attempt=1))
            await publisher.close()
        finally:
            await admin.close()
        reader_url = f"nats://reader:reader@{read_only_server}"
        reader = await connect(reader_url)
        try:
            with pytest.raises(Exception):  # the role is real: the server refuses it an update
                await reader.jetstream().update_stream(stream_config(), timeout=2)
        finally:
            await reader.close()
        env = job_env(reader_url, tmp_path)
        for verb in (["audit", "ro-role"], ["events", "tail"], ["events", "export", "-o", str(tmp_path / "out.jsonl")]):
            done = subprocess.run([*LEDGER, *verb], env=env, capture_output=True, text=True, timeout=60)
            assert 0 == done.returncode, (verb, done.stderr)
        assert "ledger.run.ro-role.started" in (tmp_path / "out.jsonl").read_text()


class TestOlderSpool:
    async def test_a_spool_written_before_urls_is_opened_and_synced(self, js: JetStreamContext, nats_url: str,
                                                                    tmp_path: Path, spool_path: Path) -> None:
        """A spool file from before rows remembered their url opens, and its rows (url unknown) are sent by sync."""
        import sqlite3

        started = ev.RunStarted(id=new_id(), at=ev_now(), run_id="legacy", attempt=1)
        db = sqlite3.connect(spool_path)
        db.executescript("CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, "
                         "subject TEXT NOT NULL, payload BLOB NOT NULL, msg_id TEXT NOT NULL);")
        db.execute("INSERT INTO spool (owner, subject, payload, msg_id) VALUES (?, ?, ?, ?)",
                   (dead_owner(), *event_row(started)))
        db.commit()
        db.close()
        sync = subprocess.run([*LEDGER, "sync", "--json"], env=job_env(nats_url, tmp_path), capture_output=True,
                              text=True, timeout=60)
        assert 0 == sync.returncode, sync.stderr
        assert {"sent": 1, "left": 0, "set_aside": 0, "elsewhere": 0} == json.loads(sync.stdout)
        assert ["run.started"] == types(await run_events(js, "legacy"))
