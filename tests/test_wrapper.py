"""``ledger run -- CMD`` as a job runs it, against a real nats-server."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path

from nats.js import JetStreamContext

from ledger.core import events as ev
from tests.jobs import job_env, ledger_run, run_events, run_state, types, wait_until

PY = sys.executable


def finish(proc, timeout: float = 60) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


class TestLifecycle:
    async def test_exit_code_is_published_and_returned(self, js: JetStreamContext, nats_url: str,
                                                       tmp_path: Path) -> None:
        """A failing child: started (host, pid, command) then exited 3; the wrapper exits 3."""
        proc = ledger_run(["--run-id", "r1", "--", "sh", "-c", "exit 3"], job_env(nats_url, tmp_path))
        code, _, err = finish(proc)
        assert 3 == code, err
        events = await run_events(js, "r1")
        assert ["run.started", "run.exited"] == types(events)
        started, exited = events
        assert isinstance(started, ev.RunStarted) and isinstance(exited, ev.RunExited)
        assert (socket.gethostname(), ["sh", "-c", "exit 3"], 1, "never") == (
            started.host, started.command, started.attempt, started.resume)
        assert started.pid is not None and started.pid > 0
        assert (3, None, 1) == (exited.exit_code, exited.signal, exited.attempt)
        assert "failed" == (await run_state(js, "r1")).state

    async def test_clean_exit_finishes(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """A child exiting 0 makes the run finished and the wrapper exit 0."""
        code, _, err = finish(ledger_run(["--run-id", "ok", "--", "true"], job_env(nats_url, tmp_path)))
        assert 0 == code, err
        assert "finished" == (await run_state(js, "ok")).state

    async def test_death_by_signal_is_128_plus_n(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """A child killed by SIGTERM: exited with signal 15, wrapper exit 143, run killed."""
        code, _, _ = finish(ledger_run(["--run-id", "r2", "--", "sh", "-c", "kill -TERM $$"],
                                       job_env(nats_url, tmp_path)))
        assert 143 == code
        exited = (await run_events(js, "r2"))[-1]
        assert isinstance(exited, ev.RunExited) and (143, 15) == (exited.exit_code, exited.signal)
        assert "killed" == (await run_state(js, "r2")).state

    async def test_child_environment(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """The child gets its run id, sweep id, attempt and the NATS address."""
        script = "import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('LEDGER_')}))"
        code, out, err = finish(ledger_run(["--run-id", "r3", "--sweep", "s1", "--", PY, "-c", script],
                                           job_env(nats_url, tmp_path)))
        assert 0 == code, err
        env = json.loads(out)
        assert ("r3", "s1", "1", nats_url) == (env["LEDGER_RUN_ID"], env["LEDGER_SWEEP_ID"], env["LEDGER_ATTEMPT"],
                                               env["LEDGER_NATS_URL"])

    async def test_generated_run_id_is_printed(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """Without --run-id a fresh id is generated, printed on stderr, and used."""
        code, _, err = finish(ledger_run(["--", "true"], job_env(nats_url, tmp_path)))
        assert 0 == code
        run_id = err.split("run id ", 1)[1].split()[0]
        assert "finished" == (await run_state(js, run_id)).state

    async def test_missing_command_is_127(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """A command that does not exist exits 127 like a shell, recorded as failed."""
        code, _, err = finish(ledger_run(["--run-id", "r4", "--", "no-such-command-xyz"], job_env(nats_url, tmp_path)))
        assert (127, True) == (code, "no-such-command-xyz" in err)
        assert "failed" == (await run_state(js, "r4")).state


class TestSignals:
    async def test_forwarded_and_recorded(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """SIGUSR1 then SIGTERM to the wrapper reach the child and are recorded as run.signalled."""
        ready, got = tmp_path / "ready", tmp_path / "got"
        script = (
            "import signal, sys, pathlib\n"
            f"got = pathlib.Path({str(got)!r})\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: got.write_text('usr1'))\n"
            "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "while True: signal.pause()\n"
        )
        proc = ledger_run(["--run-id", "sig", "--", PY, "-c", script], job_env(nats_url, tmp_path))
        wait_until(ready.exists, what="child ready")
        proc.send_signal(signal.SIGUSR1)
        wait_until(got.exists, what="SIGUSR1 forwarded")
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
        assert 0 == code, err
        events = await run_events(js, "sig")
        signalled = [(e.signal, e.name) for e in events if isinstance(e, ev.RunSignalled)]
        assert [(signal.SIGUSR1, "SIGUSR1"), (signal.SIGTERM, "SIGTERM")] == signalled
        assert "finished" == (await run_state(js, "sig")).state


class TestHeartbeats:
    async def test_heartbeats_while_child_lives(self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """The wrapper heartbeats every --heartbeat seconds while the child lives, then stops."""
        release = tmp_path / "release"
        script = f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): time.sleep(0.01)\n"
        proc = ledger_run(["--run-id", "hb", "--heartbeat", "0.1", "--", PY, "-c", script],
                          job_env(nats_url, tmp_path))
        import asyncio

        deadline = asyncio.get_running_loop().time() + 20
        while types(await run_events(js, "hb")).count("run.heartbeat") < 3:
            assert asyncio.get_running_loop().time() < deadline, "no heartbeats"
        release.touch()
        code, _, err = finish(proc)
        assert 0 == code, err
        kinds = types(await run_events(js, "hb"))
        assert ("run.started", "run.exited") == (kinds[0], kinds[-1])
        assert kinds.count("run.heartbeat") >= 3
        run = await run_state(js, "hb")
        assert run.last_heartbeat_at is not None and "finished" == run.state
