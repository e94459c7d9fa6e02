"""``ledger run`` inside Slurm jobs (CONTRACT section 10), against a real
single-node Slurm started by the suite: munged, ``slurmctld -D`` and ``slurmd -D``
as child processes with a slurm.conf of their own (free ports, state under tmp).

Requeue, preemption, ``scancel`` and the time limit all reach the job as SIGTERM;
the run must still end as what Slurm did. The jobs run this worktree's
``ledger run`` against the test's nats-server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.decide import StartRefused, decide_start
from ledger.core.machine import Run, evolve, new_run
from ledger.jobs.schedulers import SETTLE_S, Verdict, detect
from ledger.jobs.schedulers.slurm import Slurm, classify, oom_kills
from ledger.nats.server import EmbeddedNats, free_port
from projections.projector.projector import Projector
from projections.views.queries import history
from projections.views.store import open_db
from tests.factory import at, exited, heartbeat, preempting, started
from tests.jobs import async_wait_until, job_env, ledger_run, run_events, run_state

LEDGER_BIN = Path(sys.executable).parent / "ledger"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "slurm"
CLUSTER = "ledgertest"
SCHEDULE_S = 120.0
"""Slurm is slow to schedule and to notice a time limit (its check runs every 30 s)."""

SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
MpiDefault=none
JobSubmitPlugins=lua
TaskProlog={dir}/task_prolog.sh
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 State=UNKNOWN
PartitionName=batch Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10
"""


@dataclass
class SlurmCluster:
    """A running single-node Slurm: its config dir and an environment that talks to it."""

    dir: Path
    env: dict[str, str]

    def cmd(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def submit(self, script: str, tmp_path: Path, *sbatch_args: str) -> str:
        path = tmp_path / f"job-{time.monotonic_ns()}.sh"
        path.write_text(script)
        return self.cmd("sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j-%a.out"), *sbatch_args, str(path))

    def jobs(self) -> list[str]:
        return self.cmd("squeue", "-h", "-o", "%i").split()


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory, nats_server: EmbeddedNats) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd of our own, up until the node is idle; all stopped at teardown.

    The site wiring of deploy/slurm is installed as the README says (job_submit.lua next to
    slurm.conf, task_prolog.sh as TaskProlog), with this venv's ``ledger`` and the test's NATS."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start slurmctld/slurmd/munged and need root")
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        assert shutil.which(tool), f"{tool} missing: apt-get install -y slurm-wlm munge (see .ci/run)"
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (base / sub).mkdir()
    key = base / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    lua = (DEPLOY / "job_submit.lua").read_text().replace("/opt/run-ledger/bin/ledger", str(LEDGER_BIN))
    (base / "job_submit.lua").write_text(lua)
    prolog = base / "task_prolog.sh"
    prolog.write_text((DEPLOY / "task_prolog.sh").read_text().replace("nats://ledger.example.org:4222",
                                                                       nats_server.url))
    prolog.chmod(0o755)
    conf.write_text(SLURM_CONF.format(cluster=CLUSTER, host=host, dir=base, ctld_port=free_port(),
                                      slurmd_port=free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LEDGER_"))}
    env["SLURM_CONF"] = str(conf)
    env["LEDGER_SPOOL"] = str(base / "spool.db")  # sbatch passes it on; the TaskProlog keeps a job's own
    cluster = SlurmCluster(base, env)
    procs: list[subprocess.Popen[bytes]] = []
    with open(base / "daemons.out", "wb") as logs:
        try:
            procs.append(subprocess.Popen(
                ["munged", "-F", "--force", f"--key-file={key}", f"--socket={base}/munge.sock",
                 f"--pid-file={base}/munged.pid", f"--log-file={base}/munged.log", f"--seed-file={base}/munge.seed"],
                stdout=logs, stderr=subprocess.STDOUT))
            _wait(lambda: (base / "munge.sock").exists(), 30, "munged's socket")
            procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=logs,
                                          stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env, stdout=logs,
                                          stderr=subprocess.STDOUT))

            def idle() -> bool:
                for proc in procs:
                    assert proc.poll() is None, f"a Slurm daemon exited: {(base / 'daemons.out').read_text()[-2000:]}"
                out = cluster.cmd("sinfo", "-h", "-N", "-o", "%T", check=False)
                return out.split() == ["idle"] * len(out.split()) and bool(out)

            _wait(idle, SCHEDULE_S, "the Slurm node to be idle")
            yield cluster
        finally:
            try:
                if procs and procs[-1].poll() is None:
                    cluster.cmd("scancel", "--full", "--user=root", check=False)
                    _wait(lambda: not cluster.jobs(), SCHEDULE_S, "every Slurm job to end")
            finally:
                _stop(procs)


@pytest.fixture
def cluster(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's Slurm, with every job a test left behind cancelled after it."""
    yield slurm
    for job in slurm.jobs():
        slurm.cmd("scancel", job, check=False)
    _wait(lambda: not slurm.jobs(), SCHEDULE_S, "the test's Slurm jobs to end")


def batch_script(nats_url: str, tmp_path: Path, command: str) -> str:
    """A batch script as the README shows it: ``exec ledger run`` so the wrapper is the job's process."""
    return (f"#!/bin/bash\nexport LEDGER_NATS_URL={nats_url}\n"
            f"export LEDGER_SPOOL={tmp_path}/spool-$SLURM_JOB_ID.db\n"
            f"exec {LEDGER_BIN} run --heartbeat 1 -- {command}\n")


async def wait_state(js: JetStreamContext, run_id: str, state: str, attempt: int = 1) -> None:
    async def reached() -> bool:
        run = await run_state(js, run_id)
        return run is not None and (run.state, run.attempt) == (state, attempt)

    try:
        await async_wait_until(reached, SCHEDULE_S, f"run {run_id} {state} (attempt {attempt})")
    except AssertionError as exc:
        seen = [(ev.tag_of(e), getattr(e, "exit_code", None), getattr(e, "reason", None))
                for e in await run_events(js, run_id) if not isinstance(e, ev.RunHeartbeat)]
        raise AssertionError(f"{exc}; the run's events: {seen}") from None


async def run_history(js: JetStreamContext, tmp_path: Path, run_id: str) -> list[tuple[str, str | None]]:
    """The run's history as the projector records it: (state, reason) per entry."""
    db_path = tmp_path / "views.db"
    await Projector(js, db_path).run(until_idle=True)
    db = await open_db(db_path)
    try:
        return [(e.state, e.reason) for e in await history(db, "run", run_id)]
    finally:
        await db.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the Slurm tests start slurmctld/slurmd/munged and need root")
class TestUnderSlurm:
    async def test_requeue_is_preempted_then_the_same_run_resumes(
            self, cluster: SlurmCluster, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """`scontrol requeue` ends attempt 1 `preempted` (slurm-requeue); attempt 2 of the same run finishes."""
        script = batch_script(nats_url, tmp_path, 'sleep "$([ -n "$SLURM_RESTART_COUNT" ] && echo 1 || echo 600)"')
        job = cluster.submit(script, tmp_path, "--requeue")
        run_id = f"slurm-{CLUSTER}-{job}"
        await wait_state(js, run_id, "running")
        cluster.cmd("scontrol", "requeue", job)
        await wait_state(js, run_id, "preempted")

        async def started_again() -> bool:  # a requeued job waits for its BeginTime: start it now
            cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            run = await run_state(js, run_id)
            return run is not None and run.attempt == 2

        await async_wait_until(started_again, SCHEDULE_S, "attempt 2 to start")
        await wait_state(js, run_id, "finished", attempt=2)
        starts = [e for e in await run_events(js, run_id) if isinstance(e, ev.RunStarted)]
        assert [(1, 0), (2, 1)] == [(e.attempt, (e.scheduler or {}).get("restart_count")) for e in starts]
        assert {"kind": "slurm", "job_id": job, "cluster": CLUSTER, "partition": "batch",
                "nodes": socket.gethostname().split(".")[0], "restart_count": 0} == starts[0].scheduler
        assert [("running", "resume=auto"), ("preempted", "slurm-requeue"), ("running", "resume=auto"),
                ("finished", "exit code 0")] == await run_history(js, tmp_path, run_id)

    async def test_scancel_is_killed(self, cluster: SlurmCluster, js: JetStreamContext, nats_url: str,
                                     tmp_path: Path) -> None:
        """`scancel` ends the run `killed` with reason `scancel`."""
        job = cluster.submit(batch_script(nats_url, tmp_path, "sleep 600"), tmp_path)
        run_id = f"slurm-{CLUSTER}-{job}"
        await wait_state(js, run_id, "running")
        cluster.cmd("scancel", job)
        await wait_state(js, run_id, "killed")
        assert ("killed", "scancel") == (await run_history(js, tmp_path, run_id))[-1]

    async def test_preemption_is_preempted(self, cluster: SlurmCluster, js: JetStreamContext, nats_url: str,
                                           tmp_path: Path) -> None:
        """A job preempted (and requeued) for a higher-priority partition's job ends `preempted`, slurm-preempt."""
        job = cluster.submit(batch_script(nats_url, tmp_path, "sleep 600"), tmp_path, "-c", "8", "-p", "batch")
        run_id = f"slurm-{CLUSTER}-{job}"
        await wait_state(js, run_id, "running")
        cluster.submit("#!/bin/bash\ntrue\n", tmp_path, "-c", "1", "-p", "urgent")
        await wait_state(js, run_id, "preempted")
        assert ("preempted", "slurm-preempt") == (await run_history(js, tmp_path, run_id))[-1]

    async def test_array_of_four_is_four_finished_runs(self, cluster: SlurmCluster, js: JetStreamContext,
                                                       nats_url: str, tmp_path: Path) -> None:
        """An array of 4 tasks is 4 runs named after the array job and task, all `finished`."""
        job = cluster.submit(batch_script(nats_url, tmp_path, "true"), tmp_path, "--array=0-3")
        for task in range(4):
            await wait_state(js, f"slurm-{CLUSTER}-{job}_{task}", "finished")
        started = [e for e in await run_events(js, f"slurm-{CLUSTER}-{job}_2") if isinstance(e, ev.RunStarted)]
        assert ("auto", job, "2") == (started[0].resume, started[0].scheduler["array_job_id"],  # type: ignore[index]
                                      started[0].scheduler["array_task_id"])  # type: ignore[index]

    async def test_site_wiring_records_a_plain_batch_script(self, cluster: SlurmCluster, js: JetStreamContext,
                                                            tmp_path: Path) -> None:
        """With deploy/slurm's job_submit.lua and TaskProlog, a script that never mentions the ledger is a run."""
        job = cluster.submit("#!/bin/bash\necho working\nexit 3\n", tmp_path)
        run_id = f"slurm-{CLUSTER}-{job}"
        await wait_state(js, run_id, "failed")
        assert ("failed", "exit code 3") == (await run_history(js, tmp_path, run_id))[-1]
        started = [e for e in await run_events(js, run_id) if isinstance(e, ev.RunStarted)]
        assert [(1, "auto")] == [(e.attempt, e.resume) for e in started]

    async def test_time_limit_is_failed(self, cluster: SlurmCluster, js: JetStreamContext, nats_url: str,
                                        tmp_path: Path) -> None:
        """A job over its time limit ends the run `failed` with reason `time-limit`."""
        job = cluster.submit(batch_script(nats_url, tmp_path, "sleep 600"), tmp_path, "--time=1")
        run_id = f"slurm-{CLUSTER}-{job}"
        await wait_state(js, run_id, "running")
        await wait_state(js, run_id, "failed")
        assert ("failed", "time-limit") == (await run_history(js, tmp_path, run_id))[-1]


RECORD = ("JobId=9 JobName=job.sh UserId=root(0) JobState={state} Reason={reason} Dependency=(null) "
          "Requeue=1 Restarts={restarts} BatchFlag=1 Command=/tmp/job.sh WorkDir=/tmp")


class TestClassify:
    """What ``scontrol show job -o`` (as Slurm 22.05 prints it at the SIGTERM) and slurmstepd's notice mean."""

    @pytest.mark.parametrize(("state", "reason", "restarts", "notice", "expected"), [
        ("COMPLETING", "None", 1, "JOB REQUEUE", Verdict("slurm-requeue", preempted=True)),
        ("COMPLETING", "None", 1, None, Verdict("slurm-requeue", preempted=True)),
        ("COMPLETING", "None", 1, "PREEMPTION", Verdict("slurm-preempt", preempted=True)),
        ("PREEMPTED", "None", 0, None, Verdict("slurm-preempt", preempted=True)),
        ("COMPLETING", "None", 0, "", Verdict("scancel")),
        ("CANCELLED", "None", 0, None, Verdict("scancel")),
        ("COMPLETING", "TimeLimit", 0, "TIME LIMIT", Verdict("time-limit")),
        ("TIMEOUT", "TimeLimit", 0, None, Verdict("time-limit")),
        ("OUT_OF_MEMORY", "OutOfMemory", 0, None, Verdict("oom")),
        ("RUNNING", "None", 0, None, None),
    ], ids=["requeue", "requeue-without-notice", "preemption", "preempted-state", "scancel", "cancelled-state",
            "time-limit", "timeout-state", "oom", "still-running"])
    def test_record(self, state: str, reason: str, restarts: int, notice: str | None, expected: Verdict | None) -> None:
        """Each way Slurm stops a job maps to the contract's outcome."""
        assert expected == classify(RECORD.format(state=state, reason=reason, restarts=restarts), 0, notice)

    def test_restarts_compared_with_this_incarnation(self) -> None:
        """A requeued job's second incarnation (restart count 1) cancelled is `scancel`, not another requeue."""
        assert Verdict("scancel") == classify(RECORD.format(state="COMPLETING", reason="None", restarts=1), 1, "")

    def test_notice_alone_when_scontrol_cannot_answer(self) -> None:
        """Without scontrol's answer, slurmstepd's notice decides; without either, nothing is claimed."""
        assert Verdict("slurm-preempt", preempted=True) == classify(None, 0, "PREEMPTION")
        assert Verdict("scancel") == classify(None, 0, "")
        assert classify(None, 0, None) is None


class TestSlurmEnvironment:
    def test_names_and_attempt(self) -> None:
        """The run id comes from cluster and job (array: array job and task), the attempt from the restart count."""
        env = {"SLURM_JOB_ID": "17", "SLURM_CLUSTER_NAME": "gpu.a", "SLURM_ARRAY_JOB_ID": "15",
               "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": "3", "SLURM_JOB_PARTITION": "p",
               "SLURM_JOB_NODELIST": "n[1-2]"}
        found = detect(env)
        assert isinstance(found, Slurm)
        assert ("slurm-gpu-a-15_2", 4, "auto") == (found.run_id, found.attempt, found.resume)
        assert {"kind": "slurm", "job_id": "17", "cluster": "gpu.a", "partition": "p", "nodes": "n[1-2]",
                "restart_count": 3, "array_job_id": "15", "array_task_id": "2"} == found.details
        assert "slurm-gpu-a-17" == Slurm({"SLURM_JOB_ID": "17", "SLURM_CLUSTER_NAME": "gpu.a"}).run_id
        assert detect({"PATH": "/bin"}) is None

    def test_oom_kills_from_the_memory_cgroup(self, tmp_path: Path) -> None:
        """The OOM-kill count is read from the process's v2 or v1 memory cgroup."""
        (tmp_path / "job" / "x").mkdir(parents=True)
        (tmp_path / "job" / "x" / "memory.events").write_text("low 0\noom 2\noom_kill 2\n")
        (tmp_path / "memory" / "slurm" / "job_3").mkdir(parents=True)
        (tmp_path / "memory" / "slurm" / "job_3" / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 1\n")
        v2, v1 = tmp_path / "v2", tmp_path / "v1"
        v2.write_text("0::/job/x\n")
        v1.write_text("9:pids:/\n4:memory:/slurm/job_3\n0::/\n")
        assert (2, 1) == (oom_kills(tmp_path, v2), oom_kills(tmp_path, v1))


class TestSchedulerAttempt:
    """``decide_start`` with the attempt a scheduler asks for (Slurm: restart count + 1)."""

    def fold(self, *events: ev.AnyRunEvent) -> Run:
        run = new_run(events[0])
        for event in events:
            run = evolve(run, event)
        return run

    def test_requeued_job_starts_its_attempt(self) -> None:
        """A requeued job's start (restart count 1) of its preempted run is attempt 2."""
        run = self.fold(started("r", attempt=1), preempting("r", attempt=1), exited("r", 143, signal=15, attempt=1))
        assert 2 == decide_start(run, "r", "auto", now=at(10), fresh_within=timedelta(seconds=300), attempt=2)

    def test_higher_attempt_takes_over_a_run_whose_node_died(self) -> None:
        """A run still `running` with a fresh heartbeat is no live twin for a higher attempt: its job was requeued."""
        run = self.fold(started("r", attempt=1), heartbeat("r", t=5, attempt=1))
        assert 2 == decide_start(run, "r", "auto", now=at(10), fresh_within=timedelta(seconds=300), attempt=2)
        with pytest.raises(StartRefused) as refused:
            decide_start(run, "r", "auto", now=at(10), fresh_within=timedelta(seconds=300))
        assert "run-alive" == refused.value.rule

    def test_stale_attempt_is_refused(self) -> None:
        """A start asking for an attempt the run already started comes from an old incarnation: refused."""
        run = self.fold(started("r", attempt=1), exited("r", 0, attempt=1))
        with pytest.raises(StartRefused) as refused:
            decide_start(run, "r", "auto", now=at(10), fresh_within=timedelta(seconds=300), attempt=1)
        assert "attempt-stale" == refused.value.rule


CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_term(signum, frame):
    (out / "term").write_text(str(time.monotonic()))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on_term)
(out / "ready").touch()
while True:
    time.sleep(0.05)
"""


class TestStuckSlurm:
    async def test_slow_scontrol_never_delays_the_child_nor_breaks_the_exit(
            self, js: JetStreamContext, nats_url: str, tmp_path: Path) -> None:
        """With scontrol hanging, the child gets SIGTERM at once and the exit is recorded after the bounded wait."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text("#!/bin/sh\nexec sleep 120\n")
        (bin_dir / "scontrol").chmod(0o755)
        env = job_env(nats_url, tmp_path)
        env.update({"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "stuck", "PATH": f"{bin_dir}:{env['PATH']}"})
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        proc = ledger_run(["--", sys.executable, str(script), str(tmp_path)], env)
        try:
            await async_wait_until((tmp_path / "ready").exists, 60, "the child to be ready")
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await async_wait_until((tmp_path / "term").exists, 60, "the child's SIGTERM")
            got = float((tmp_path / "term").read_text())
            _, err = proc.communicate(timeout=60)
            ended = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert 143 == proc.returncode, err
        assert got - sent < 5.0, "the child's signal waited for the scheduler"
        assert ended - sent < SETTLE_S + 20, "the exit waited longer than its bound"
        run = await run_state(js, "slurm-stuck-77")
        assert ("failed", 143) == (run.state, run.exit_code)  # the child exited 143 itself: no verdict, plain exit
