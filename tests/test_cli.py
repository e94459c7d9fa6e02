"""The ``ledger`` command as a user runs it: up, emit, and the query verbs."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.server import free_port
from tests.jobs import Up, ledger


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
        assert {"seq": 2} == json.loads(ledger("emit", "--json", env=env, stdin=EXITED).stdout)
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


class TestHelp:
    @pytest.mark.parametrize("verb", [[], ["up"], ["emit"], ["projector"], ["runs"], ["runs", "list"], ["runs", "show"],
                                      ["runs", "history"], ["sweeps"], ["sweeps", "list"], ["sweeps", "show"]],
                             ids=lambda v: " ".join(v) or "ledger")
    def test_every_command_has_help(self, verb: list[str]) -> None:
        """Every command answers --help."""
        result = ledger(*verb, "--help", env=dict(os.environ))
        assert 0 == result.returncode and "Usage:" in result.stdout
