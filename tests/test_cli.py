"""The ``ledger`` command as a user runs it: up, emit, and the query verbs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from ledger.cli import VERBS, main
from ledger.core import events as ev
from ledger.core.machine import RUN_STATES, SWEEP_STATES
from ledger.nats.server import free_port
from ledger.nats.stream import STREAM, ensure_stream, stream_last_seq
from tests.jobs import Up, ledger, run_events, wait_until


@pytest.fixture
def up(cli_env: dict[str, str], tmp_path: Path, js: object) -> Iterator[tuple[Up, dict[str, str]]]:
    """``ledger up`` on the test's nats-server (fresh stream), with its HTTP address in the env."""
    http = f"127.0.0.1:{free_port()}"
    env = {**cli_env, "LEDGER_HTTP": http, "LEDGER_DATA_DIR": str(tmp_path / "data"),
           "LEDGER_HEARTBEAT_TIMEOUT": HISTORICAL}
    running = Up([], env)
    yield running, env
    if running.proc.poll() is None:
        running.stop()


HISTORICAL = str(10 * 365 * 86400)
"""A heartbeat timeout long enough that the monitor leaves these tests' fixed, past event times alone."""
STARTED = '{"type":"run.started","id":"e1","at":"2026-11-25T12:00:00Z","run_id":"r1","sweep_id":"s1"}'
EXITED = '{"type":"run.exited","id":"e2","at":"2026-11-25T12:01:00+01:00","run_id":"r1","exit_code":0}'
SWEEP = '{"type":"sweep.created","id":"e3","at":"2026-11-25T11:00:00Z","sweep_id":"s1"}'


class TestUpWithExternalNats:
    def test_emit_then_query(self, up: tuple[Up, dict[str, str]]) -> None:
        """Events emitted from the command line show up in runs list/show/history and sweeps."""
        running, env = up
        assert running.info["http"] == f"http://{env['LEDGER_HTTP']}"
        assert "1" == ledger("emit", STARTED, env=env).stdout.strip()
        assert {"seq": 2, "duplicate": False} == json.loads(ledger("emit", "--json", env=env, stdin=EXITED).stdout)
        assert "3" == ledger("emit", SWEEP, env=env).stdout.strip()
        shown = ledger("runs", "show", "r1", "--json", env=env)
        run = json.loads(shown.stdout)
        for _ in range(100):  # the projector may be a few ms behind the emit
            if run["seq"] == 2:
                break
            run = json.loads(ledger("runs", "show", "r1", "--json", env=env).stdout)
        assert ("finished", 0, "2026-11-25T11:01:00Z") == (run["state"], run["exit_code"], run["ended_at"])
        listed = json.loads(ledger("runs", "list", "--state", "finished", "--json", env=env).stdout)
        assert ["r1"] == [r["run_id"] for r in listed["runs"]]
        history = json.loads(ledger("runs", "history", "r1", "--json", env=env).stdout)
        assert ["running", "finished"] == [e["state"] for e in history["history"]]
        sweeps = json.loads(ledger("sweeps", "list", "--json", env=env).stdout)
        assert [("s1", 1)] == [(s["sweep_id"], s["runs"]["finished"]) for s in sweeps["sweeps"]]
        shown_sweep = json.loads(ledger("sweeps", "show", "s1", "--json", env=env).stdout)
        assert ("running", []) == (shown_sweep["state"], shown_sweep["queue"])
        table = ledger("runs", "list", env=env)
        assert 0 == table.returncode and "r1" in table.stdout and "finished" in table.stdout
        assert 0 == running.stop()

    @pytest.mark.parametrize("payload,needle", [
        ("{nope", "not JSON"),
        ('{"type":"run.started","id":"e.1","at":"2026-11-25T12:00:00Z","run_id":"r1"}', "$.id"),
        ('{"type":"run.started","id":"e1","at":"2026-11-25T12:00:00Z","run_id":"r 1"}', "$.run_id"),
        ('{"type":"run.flew","id":"e1","at":"2026-11-25T12:00:00Z","run_id":"r1"}', "run.flew"),
        ("", "no event given"),
    ], ids=["not-json", "unsafe-event-id", "unsafe-run-id", "unknown-type", "empty"])
    def test_emit_refuses_bad_events(self, cli_env: dict[str, str], js: object, payload: str, needle: str) -> None:
        """emit refuses a bad event with one clear line and a non-zero exit, publishing nothing."""
        result = ledger("emit", env=cli_env, stdin=payload)
        assert 1 == result.returncode
        assert needle in result.stderr and "error:" in result.stderr
        assert "Traceback" not in result.stderr

    def test_query_without_api_is_a_clear_error(self, cli_env: dict[str, str]) -> None:
        """A query verb with no API listening says so, without a traceback."""
        result = ledger("runs", "list", "--http", f"127.0.0.1:{free_port()}", env=cli_env)
        assert 1 == result.returncode
        assert "is `ledger up` running?" in result.stderr

    def test_unknown_run_is_a_clear_error(self, up: tuple[Up, dict[str, str]]) -> None:
        """runs show of an unknown id prints the API's error and exits non-zero."""
        _, env = up
        result = ledger("runs", "show", "ghost", env=env)
        assert (1, True) == (result.returncode, "unknown run 'ghost'" in result.stderr)


class TestUpEmbedded:
    def test_restart_keeps_every_event_and_view(self, tmp_path: Path) -> None:
        """A second ledger up on the same data dir resumes with every event and view intact."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        env["LEDGER_HEARTBEAT_TIMEOUT"] = HISTORICAL
        nats_port, http = free_port(), f"127.0.0.1:{free_port()}"
        args = ["--data-dir", str(tmp_path / "data"), "--nats-port", str(nats_port), "--http", http]
        first = Up(args, env)
        assert (f"nats://127.0.0.1:{nats_port}", True) == (first.info["nats"], first.info["embedded_nats"])
        q_env = {**env, "LEDGER_NATS_URL": first.info["nats"], "LEDGER_HTTP": http}
        assert "1" == ledger("emit", STARTED, env=q_env).stdout.strip()
        assert "2" == ledger("emit", EXITED, env=q_env).stdout.strip()
        before = json.loads(ledger("runs", "show", "r1", "--json", env=q_env).stdout)
        for _ in range(100):
            if before["seq"] == 2:
                break
            before = json.loads(ledger("runs", "show", "r1", "--json", env=q_env).stdout)
        assert 0 == first.stop(signal.SIGTERM)
        second = Up(args, env)
        try:
            after = json.loads(ledger("runs", "show", "r1", "--json", env=q_env).stdout)
            assert before == after
            assert "3" == ledger("emit", SWEEP, env=q_env).stdout.strip()  # the stream went on from seq 2
        finally:
            assert 0 == second.stop()

    def test_port_in_use_is_one_line_error(self, tmp_path: Path) -> None:
        """A taken port makes ledger up fail at once with one clear line."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            for args in (["--nats-port", str(port), "--http", f"127.0.0.1:{free_port()}"],
                         ["--nats-port", str(free_port()), "--http", f"127.0.0.1:{port}"]):
                result = ledger("up", "--data-dir", str(tmp_path), *args, env=env)
                assert 1 == result.returncode
                lines = result.stderr.strip().splitlines()
                assert 1 == len(lines) and f"{port} is already in use" in lines[0]


class TestEmitForPeople:
    async def test_missing_id_and_at_are_filled(self, cli_env: dict[str, str], js: JetStreamContext) -> None:
        """An event typed without id and at gets a fresh ULID and the time now."""
        before = datetime.now(timezone.utc)
        assert "1" == ledger("emit", '{"type":"run.started","run_id":"r1"}', env=cli_env).stdout.strip()
        (event,) = await run_events(js, "r1")
        assert 26 == len(event.id) and event.id.isalnum()
        assert before - timedelta(seconds=1) <= event.at <= datetime.now(timezone.utc) + timedelta(seconds=1)

    def test_unknown_type_lists_the_valid_ones(self, cli_env: dict[str, str], js: JetStreamContext) -> None:
        """An unknown event type is refused with the list of the valid types."""
        result = ledger("emit", '{"type":"run.begun","run_id":"r1"}', env=cli_env)
        assert 1 == result.returncode
        assert "unknown event type 'run.begun'" in result.stderr
        assert all(t in result.stderr for t in ("run.started", "run.exited", "sweep.created", "sweep.cancelled"))

    async def test_duplicate_says_where_the_first_copy_is(self, cli_env: dict[str, str], js: JetStreamContext) -> None:
        """Emitting an event id twice appends it once and says it is a duplicate of that seq."""
        event = '{"type":"run.started","id":"same-id","run_id":"r1"}'
        assert "1" == ledger("emit", '{"type":"sweep.created","sweep_id":"s1"}', env=cli_env).stdout.strip()
        assert "2" == ledger("emit", event, env=cli_env).stdout.strip()
        again = ledger("emit", event, env=cli_env)
        assert (0, "2") == (again.returncode, again.stdout.strip())
        assert "duplicate: already at seq 2" in again.stderr
        assert {"seq": 2, "duplicate": True} == json.loads(ledger("emit", "--json", event, env=cli_env).stdout)
        assert 2 == await stream_last_seq(js)


class TestEventsVerbs:
    def test_tail_of_an_unknown_run_says_so(self, cli_env: dict[str, str], js: JetStreamContext) -> None:
        """events tail --run of a run the stream never saw says there is no such run and exits non-zero."""
        ledger("emit", '{"type":"run.started","run_id":"r1"}', env=cli_env)
        result = ledger("events", "tail", "--run", "nosuch", env=cli_env)
        assert 1 == result.returncode
        assert "no such run 'nosuch'" in result.stderr and "Traceback" not in result.stderr

    async def test_import_again_reports_the_streams_last_seq(self, cli_env: dict[str, str], js: JetStreamContext,
                                                             tmp_path: Path) -> None:
        """A repeated import of the same file reports the stream's real last seq, not 0."""
        for n in (1, 2, 3):
            ledger("emit", f'{{"type":"run.started","run_id":"r{n}"}}', env=cli_env)
        dump = tmp_path / "dump.jsonl"
        assert 0 == ledger("events", "export", "-o", str(dump), env=cli_env).returncode
        await js.delete_stream(STREAM)
        await ensure_stream(js)
        first = ledger("events", "import", str(dump), env=cli_env)
        assert first.stdout.strip().endswith("stream at seq 3"), first.stdout + first.stderr
        again = ledger("events", "import", str(dump), env=cli_env)
        assert "imported 0 of 3 messages (3 already there" in again.stdout
        assert again.stdout.strip().endswith("stream at seq 3")
        assert 3 == json.loads(ledger("events", "import", "--json", str(dump), env=cli_env).stdout)["stream_last_seq"]


class TestNarrowTerminal:
    def test_tables_fit_80_columns(self, up: tuple[Up, dict[str, str]]) -> None:
        """On an 80-column terminal tables keep whole words: no line wider than 80, history rows readable."""
        _, env = up
        ledger("emit", '{"type":"run.started","run_id":"01JD0000000000000000000001","sweep_id":"s1"}', env=env)
        ledger("emit", '{"type":"run.exited","run_id":"01JD0000000000000000000001","exit_code":0}', env=env)
        wait_until(lambda: '"seq": 2' in ledger("runs", "show", "01JD0000000000000000000001", "--json", env=env).stdout,
                   what="the views to apply seq 2")
        narrow = {**env, "COLUMNS": "80"}
        for args in (["runs", "history", "01JD0000000000000000000001"], ["runs", "list"], ["sweeps", "list"],
                     ["audit", "01JD0000000000000000000001"]):
            result = ledger(*args, env=narrow)
            assert 0 == result.returncode, result.stderr
            assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
        history = ledger("runs", "history", "01JD0000000000000000000001", env=narrow).stdout
        header = next(line for line in history.splitlines() if "event_type" in line)
        assert all(f" {name} " in header for name in ("state", "event_type", "reason", "at"))
        rows = history.splitlines()
        assert any("finished" in line and "run.exited" in line and "exit code 0" in line for line in rows)
        assert "not shown at this width" in history
        listed = ledger("runs", "list", env=narrow).stdout
        assert any("01JD0000000000000000000001" in line and "finished" in line for line in listed.splitlines())


def heavy_modules(modules: set[str]) -> set[str]:
    """The modules of a set that belong to the server, tables, audit or metrics side."""
    return {m for m in modules if m.split(".")[0] in ("litestar", "uvicorn", "rich", "prometheus_client", "httpx",
                                                      "projections")
            or m in ("ledger.nats.archive", "ledger.cli.tables", "ledger.cli.audit", "ledger.cli.serve",
                     "ledger.cli.query", "ledger.cli.events")}


class TestLightJobPath:
    def test_run_imports_no_server_table_or_audit_code(self, cli_env: dict[str, str], js: JetStreamContext,
                                                       tmp_path: Path) -> None:
        """`ledger run -- true` imports nothing of the HTTP server, the tables, the audit side or prometheus."""
        env = {**cli_env, "LEDGER_SPOOL": str(tmp_path / "spool.db")}
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ledger.cli", "run", "--", "true"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert 0 == done.returncode, done.stderr[-2000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                   if line.startswith("import time:") and "|" in line}
        assert "ledger.jobs.wrapper" in modules
        assert set() == heavy_modules(modules)

    def test_python_client_imports_no_server_table_or_audit_code(self) -> None:
        """`from ledger import Ledger, AsyncLedger, current_run` loads the client only, nothing of the server side."""
        code = ("import sys; from ledger import Ledger, AsyncLedger, current_run, LedgerError; "
                "print('\\n'.join(sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert 0 == done.returncode, done.stderr
        modules = set(done.stdout.split())
        assert {"ledger.jobs.client", "ledger.jobs.sync_client"} <= modules
        assert set() == heavy_modules(modules) and "click" not in modules


ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


class TestDocs:
    def test_readme_using_it_works_as_pasted(self, up: tuple[Up, dict[str, str]]) -> None:
        """README's "Using it" commands, pasted in order into a shell against `ledger up`, all succeed."""
        _, env = up
        http = env["LEDGER_HTTP"]
        shell_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
        shell_env.pop("LEDGER_HEARTBEAT_TIMEOUT")
        outputs: list[tuple[str, str]] = []
        for line in readme_block("## Using it"):
            if line.startswith(". "):
                continue  # activating the venv: this test's PATH has its ledger already
            if line.startswith("curl") and shutil.which("curl") is None:
                continue
            done = subprocess.run(["bash", "-c", f"set -e; {line.replace('127.0.0.1:8480', http)}"],
                                  env=shell_env, capture_output=True, text=True, timeout=60)
            assert 0 == done.returncode, f"{line}\n{done.stdout}\n{done.stderr}"
            outputs.append((line, done.stdout))
        emitted = [out.strip() for line, out in outputs if "ledger emit" in line]
        assert ["2", "3"] == emitted  # what the README's comments say they print

    def test_every_verb_is_in_docs_cli(self) -> None:
        """docs/cli.md describes every verb and every subcommand the ledger command has."""
        text = (ROOT / "docs" / "cli.md").read_text()
        for name in VERBS:
            command = main.get_command(None, name)  # type: ignore[arg-type]
            assert f"`ledger {name}" in text, name
            for sub in getattr(command, "commands", {}):
                assert re.search(rf"ledger {name} [a-z|]*\b{sub}\b", text), f"{name} {sub}"

    def test_docs_name_every_event_type_and_state(self) -> None:
        """docs/events.md names every event type, docs/states.md every run and sweep state."""
        events_md = (ROOT / "docs" / "events.md").read_text()
        states_md = (ROOT / "docs" / "states.md").read_text()
        assert [t for t in ev.EVENT_TYPES if f"`{t}`" not in events_md] == []
        assert [s for s in (*RUN_STATES, *SWEEP_STATES) if f"`{s}`" not in states_md] == []

    def test_readme_links_are_local_and_exist(self) -> None:
        """README links only to files of this repository (no ../shared), and each exists."""
        text = (ROOT / "README.md").read_text()
        assert "../shared" not in text
        links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
        assert links and [link for link in links if not (ROOT / link).exists()] == []


class TestHelp:
    @pytest.mark.parametrize("verb", [[], ["up"], ["emit"], ["projector"], ["runs"], ["runs", "list"], ["runs", "show"],
                                      ["runs", "history"], ["runs", "kill"], ["sweeps"], ["sweeps", "list"],
                                      ["sweeps", "show"], ["sweep", "next"], ["events", "tail"], ["audit"], ["run"]],
                             ids=lambda v: " ".join(v) or "ledger")
    def test_every_command_has_help(self, verb: list[str]) -> None:
        """Every command answers --help."""
        result = ledger(*verb, "--help", env=dict(os.environ))
        assert 0 == result.returncode and "Usage:" in result.stdout

    def test_help_lists_every_verb(self) -> None:
        """`ledger --help` lists every verb, though each verb's module loads only when it runs."""
        result = ledger("--help", env=dict(os.environ))
        listed = result.stdout.split("Commands:", 1)[1].split()
        assert set(VERBS) <= set(listed)
        assert "kill" in ledger("runs", "--help", env=dict(os.environ)).stdout
