"""A projector killed with SIGKILL at any moment and restarted ends with exactly
the views of an uninterrupted run."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from nats.js import JetStreamContext

from ledger.nats.publisher import Publisher
from projections.projector.projector import Projector
from tests.factory import dump_views, exited, heartbeat, killed, preempting, started


def checkpoint(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT last_seq FROM checkpoint").fetchone()
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    return int(row[0]) if row else 0


def projector_process(data_dir: Path, nats_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ledger.cli", "projector", "--until-idle", "--data-dir", str(data_dir),
         "--nats-url", nats_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


class TestSigkill:
    async def test_sigkill_at_any_moment_loses_and_doubles_nothing(
        self, js: JetStreamContext, publisher: Publisher, nats_url: str, tmp_path: Path,
    ) -> None:
        """Kill the projector process repeatedly mid-stream; the final views equal an uninterrupted run."""
        rng = random.Random(7)
        futures = []
        for i in range(2000):
            run = f"run-{i}"
            futures.append(await publisher.submit(started(run, t=i)))
            for k in range(12):
                futures.append(await publisher.submit(heartbeat(run, t=i + k, step=k)))
            end = rng.random()
            if end < 0.1:
                futures.append(await publisher.submit(preempting(run, t=i + 13)))
                futures.append(await publisher.submit(exited(run, 143, t=i + 14)))
            elif end < 0.15:
                futures.append(await publisher.submit(killed(run, t=i + 14, reason="test")))
            else:
                futures.append(await publisher.submit(exited(run, int(end < 0.2), t=i + 14)))
        last = max([await f for f in futures])

        reference = tmp_path / "reference" / "views.db"
        assert last == await Projector(js, reference).run(until_idle=True)

        data_dir = tmp_path / "crashed"
        db = data_dir / "views.db"
        kills = 0
        for target in sorted(rng.sample(range(1, last), 6)):
            proc = projector_process(data_dir, nats_url)
            deadline = time.monotonic() + 60
            while checkpoint(db) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)  # polling another process's progress
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(60)
            if proc.stderr:
                proc.stderr.close()
        assert kills >= 3, "the projector finished before it could be killed; the test proves nothing"
        assert checkpoint(db) < last
        final = projector_process(data_dir, nats_url)
        assert 0 == final.wait(60), final.stderr.read().decode() if final.stderr else ""
        if final.stderr:
            final.stderr.close()
        assert dump_views(reference) == dump_views(db)
