"""How long one node takes to recover from the accidents of CONTRACT section 5.

Runs the real ``ledger up`` and prints medians over ``--rounds``:

- embedded nats-server SIGKILLed: seconds until a new event is applied again
  (``/health`` ok with the new event's sequence);
- external NATS SIGKILLed and started again: seconds from the restart until
  ``/health`` is ok again and a new event is applied.

    .venv/bin/python bench/operations.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import median

LEDGER = str(Path(sys.executable).parent / "ledger")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    out["LEDGER_HEARTBEAT_TIMEOUT"] = str(10 * 365 * 86400)
    return out


def health(http: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{http}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def wait(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def emit(url: str, n: int) -> bool:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload = json.dumps({"type": "run.started", "id": f"bench-{n}", "at": now, "run_id": f"r{n}"})
    done = subprocess.run([LEDGER, "emit", "--nats-url", url, payload], capture_output=True, text=True, env=env())
    return done.returncode == 0


class Up:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([LEDGER, "up", "--json", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env())
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "ledger up did not start"
        self.info = json.loads(self.proc.stdout.readline())
        self.http = self.info["http"]

    def nats_child(self) -> int:
        return int((Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split() or ["0"])[0])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def free_port() -> int:
    from ledger.nats.server import free_port as fp

    return fp()


def embedded_round(work: Path, n: int) -> float:
    port = free_port()
    up = Up(["--data-dir", str(work / f"emb{n}"), "--nats-port", str(port), "--http", f"127.0.0.1:{free_port()}"])
    url = f"nats://127.0.0.1:{port}"
    try:
        assert emit(url, 1)
        wait(lambda: health(up.http)[1].get("last_seq") == 1)
        child = up.nats_child()
        began = time.perf_counter()
        os.kill(child, signal.SIGKILL)
        wait(lambda: emit(url, 2))
        wait(lambda: health(up.http) == (200, {"status": "ok", "last_seq": 2, "stream_last_seq": 2, "lag": 0}))
        return time.perf_counter() - began
    finally:
        up.stop()


def external_round(work: Path, n: int) -> float:
    from ledger.nats.server import EmbeddedNats

    nats = EmbeddedNats(work / f"nats{n}", port=free_port())
    nats.start()
    up = Up(["--nats-url", nats.url, "--data-dir", str(work / f"ext{n}"), "--http", f"127.0.0.1:{free_port()}"])
    try:
        assert emit(nats.url, 1)
        wait(lambda: health(up.http)[1].get("last_seq") == 1)
        assert nats.process is not None
        nats.process.kill()
        nats.process.wait()
        wait(lambda: health(up.http)[0] == 503)
        nats.start()
        began = time.perf_counter()
        wait(lambda: emit(nats.url, 2))
        wait(lambda: health(up.http) == (200, {"status": "ok", "last_seq": 2, "stream_last_seq": 2, "lag": 0}))
        return time.perf_counter() - began
    finally:
        up.stop()
        nats.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        embedded = [embedded_round(work, i) for i in range(args.rounds)]
        external = [external_round(work, i) for i in range(args.rounds)]
    print(f"embedded nats-server SIGKILLed -> new event applied: median {median(embedded):.2f} s "
          f"(max {max(embedded):.2f} s, {args.rounds} rounds)")
    print(f"external NATS restarted -> /health ok, new event applied: median {median(external):.2f} s "
          f"(max {max(external):.2f} s, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
