"""W&B's preemption pattern end to end: a training script under ``ledger run``
marks preemption from its SIGTERM handler and exits 128+signum; the run ends
``preempted`` and sits in its sweep's queue."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from projections.projector.projector import Projector
from projections.views.queries import sweep_queue
from projections.views.store import open_db
from tests.factory import at
from tests.jobs import job_env, ledger_run, run_events, types, wait_until

TRAIN = """
import pathlib, signal, sys, time
from ledger import current_run

run = current_run()          # attach early: the wrapper's run, no new start

def on_sigterm(signum, frame):
    run.mark_preempting()
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, on_sigterm)
pathlib.Path(sys.argv[1]).touch()
step = 0
while True:
    step += 1
    time.sleep(0.01)
"""


class TestPreemptionPattern:
    async def test_sigterm_marks_preempting_and_queues(self, js: JetStreamContext, publisher: Publisher,
                                                       nats_url: str, tmp_path: Path) -> None:
        """SIGTERM -> mark_preempting -> exit 143 -> preempted and queued; a `must` resume gets attempt 2."""
        await publisher.publish(ev.SweepCreated(id="sweep-s1", at=at(0), sweep_id="s1"))
        ready = tmp_path / "ready"
        script = tmp_path / "train.py"
        script.write_text(TRAIN)
        env = job_env(nats_url, tmp_path)
        proc = ledger_run(["--run-id", "p1", "--sweep", "s1", "--", sys.executable, str(script), str(ready)], env)
        wait_until(ready.exists, what="training script ready")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert 143 == proc.returncode, err
        kinds = types(await run_events(js, "p1"))
        lifecycle = [k for k in kinds if k != "run.heartbeat"]
        # the wrapper's run.signalled and the child's run.preempting race; both precede the exit
        assert ("run.started", "run.exited") == (lifecycle[0], lifecycle[-1])
        assert ["run.preempting", "run.signalled"] == sorted(lifecycle[1:-1])

        db_path = tmp_path / "views.db"
        await Projector(js, db_path).run(until_idle=True)
        db = await open_db(db_path)
        try:
            async with db.execute("SELECT state, attempt, preempting FROM runs WHERE run_id = 'p1'") as cur:
                assert ("preempted", 1, 1) == tuple(await cur.fetchone())  # type: ignore[arg-type]
            assert ["p1"] == await sweep_queue(db, "s1")
        finally:
            await db.close()

        resumed = ledger_run(["--run-id", "p1", "--sweep", "s1", "--resume", "must", "--", "true"], env)
        _, err = resumed.communicate(timeout=60)
        assert 0 == resumed.returncode, err
        started = [e for e in await run_events(js, "p1") if isinstance(e, ev.RunStarted)]
        assert [1, 2] == [e.attempt for e in started]
        await Projector(js, db_path).run(until_idle=True)
        db = await open_db(db_path)
        try:
            async with db.execute("SELECT state, attempt FROM runs WHERE run_id = 'p1'") as cur:
                assert ("finished", 2) == tuple(await cur.fetchone())  # type: ignore[arg-type]
            assert [] == await sweep_queue(db, "s1")
        finally:
            await db.close()
