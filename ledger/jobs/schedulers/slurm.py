"""Slurm (CONTRACT section 10): the run's id, attempt and job facts from the job's
environment, and why a job was stopped, from Slurm itself.

When a job is requeued, preempted, cancelled or over its time limit, slurmctld
marks the job first and then has slurmstepd write a notice to the job's stderr
(``*** JOB 7 ON node1 CANCELLED AT ... DUE TO PREEMPTION ***``) and send SIGTERM.
So at SIGTERM, ``scontrol show job -o $SLURM_JOB_ID`` tells the cases apart:

| Slurm says | verdict |
|---|---|
| ``JobState=PREEMPTED``, or the notice says PREEMPTION | ``slurm-preempt`` |
| ``Restarts`` above this incarnation's ``SLURM_RESTART_COUNT`` | ``slurm-requeue`` |
| ``Reason=TimeLimit`` or ``JobState=TIMEOUT`` | ``time-limit`` |
| ``JobState=OUT_OF_MEMORY`` | ``oom`` |
| ``JobState=CANCELLED``/``COMPLETING`` (the job is ending, none of the above) | ``scancel`` |
| still ``RUNNING`` (e.g. ``scancel --signal=TERM``) | none: the exit tells |

The notice alone decides when ``scontrol`` cannot answer in time. A cgroup OOM
kill sends no SIGTERM: the kernel SIGKILLs the process, and the job's memory
cgroup counts it (``oom_kill``), which is checked when the child dies of SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ledger.core.events import ResumeMode
from ledger.jobs.schedulers import Verdict

QUERY_S: Final = 5.0
"""The longest ``scontrol`` may take; the exit waits for it, the child never does."""
NOTICE_TAIL: Final = 16 * 1024
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
_NOTICE: Final = re.compile(r"\*\*\* (?:JOB|STEP) (\S+) ON \S+ CANCELLED AT \S+(?: DUE TO (.+?))? \*\*\*")
_FIELD: Final = {name: re.compile(rf"(?:^| ){name}=(\S*)") for name in ("JobState", "Reason", "Restarts")}
_NOTICE_VERDICTS: Final = {
    "PREEMPTION": Verdict("slurm-preempt", preempted=True),
    "JOB REQUEUE": Verdict("slurm-requeue", preempted=True),
    "TIME LIMIT": Verdict("time-limit"),
}


def _safe(part: str) -> str:
    return _UNSAFE.sub("-", part)


class Slurm:
    """The Slurm job this process runs in (``SLURM_JOB_ID`` set)."""

    resume: ResumeMode = "auto"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.job_id = environ["SLURM_JOB_ID"]
        self.cluster = environ.get("SLURM_CLUSTER_NAME") or None
        self.array_job_id = environ.get("SLURM_ARRAY_JOB_ID") or None
        self.array_task_id = environ.get("SLURM_ARRAY_TASK_ID") or None
        restarts = environ.get("SLURM_RESTART_COUNT", "")
        self.restarts = int(restarts) if restarts.isdigit() else 0
        self.partition = environ.get("SLURM_JOB_PARTITION") or None
        self.nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or None
        self.scontrol = shutil.which("scontrol", path=environ.get("PATH"))
        self.oom_kills_at_start = oom_kills()
        self.stderr_at_start = _stderr_size()

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> Slurm | None:
        return cls(environ) if environ.get("SLURM_JOB_ID") else None

    @property
    def run_id(self) -> str:
        """``slurm-<cluster>-<job id>``, or ``slurm-<cluster>-<array job id>_<task id>`` for an array task."""
        job = f"{self.array_job_id}_{self.array_task_id}" if self.array_job_id and self.array_task_id else self.job_id
        parts = ["slurm", self.cluster, job] if self.cluster else ["slurm", job]
        return "-".join(_safe(p) for p in parts)[:128]

    @property
    def attempt(self) -> int:
        """``SLURM_RESTART_COUNT + 1``: a requeued job is the next attempt of the same run."""
        return self.restarts + 1

    @property
    def details(self) -> dict[str, Any]:
        facts = {"kind": "slurm", "job_id": self.job_id, "cluster": self.cluster, "partition": self.partition,
                 "nodes": self.nodes, "restart_count": self.restarts, "array_job_id": self.array_job_id,
                 "array_task_id": self.array_task_id}
        return {k: v for k, v in facts.items() if v is not None}

    async def why_stopped(self, signum: int) -> Verdict | None:
        """Ask Slurm why the job got ``signum``: its job record first, the stderr notice to refine or stand in."""
        if signum == signal.SIGKILL:
            now = oom_kills()
            if now is not None and self.oom_kills_at_start is not None and now > self.oom_kills_at_start:
                return Verdict("oom")
        record = await self.job_record()
        ids = {self.job_id, f"{self.array_job_id}_{self.array_task_id}"}
        return classify(record, self.restarts, notice_of(ids, self.stderr_at_start))

    async def job_record(self) -> str | None:
        """``scontrol show job -o`` of this job, or None when scontrol is missing, fails or is slow."""
        if self.scontrol is None:
            return None
        proc = await asyncio.create_subprocess_exec(
            self.scontrol, "show", "job", "-o", self.job_id,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), QUERY_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        return out.decode(errors="replace") if proc.returncode == 0 else None


def classify(record: str | None, restarts: int, notice: str | None = None) -> Verdict | None:
    """The verdict from a ``scontrol show job -o`` line and the stderr notice's ``DUE TO`` (see the table above)."""
    noticed = _NOTICE_VERDICTS.get(notice or "")
    if record is None:
        if noticed is not None:
            return noticed
        return Verdict("scancel") if notice == "" else None
    fields = {name: (m.group(1) if (m := pattern.search(record)) else "") for name, pattern in _FIELD.items()}
    state, reason = fields["JobState"], fields["Reason"]
    if state == "PREEMPTED" or (notice == "PREEMPTION" and state != "RUNNING"):
        return Verdict("slurm-preempt", preempted=True)
    if fields["Restarts"].isdigit() and int(fields["Restarts"]) > restarts or state.startswith("REQUEUE"):
        return Verdict("slurm-requeue", preempted=True)
    if state == "TIMEOUT" or reason == "TimeLimit":
        return Verdict("time-limit")
    if state == "OUT_OF_MEMORY" or reason == "OutOfMemory":
        return Verdict("oom")
    if state in ("CANCELLED", "COMPLETING", "COMPLETED", "FAILED"):
        return noticed or Verdict("scancel")
    return None


def _stderr_size() -> int | None:
    """The size of our stderr when it is a regular file (a batch job's output), else None."""
    try:
        st = os.fstat(2)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def notice_of(job_ids: set[str], since: int | None) -> str | None:
    """The ``DUE TO`` of slurmstepd's last cancel notice for this job written to our stderr after
    ``since`` ('' for a plain cancel), or None when stderr is not a file or holds none."""
    if since is None:
        return None
    try:
        with open("/proc/self/fd/2", "rb") as err:
            size = os.fstat(err.fileno()).st_size
            err.seek(max(since, size - NOTICE_TAIL))
            tail = err.read().decode(errors="replace")
    except OSError:
        return None
    found = [m for m in _NOTICE.finditer(tail) if m.group(1).split(".")[0] in job_ids]
    return (found[-1].group(2) or "") if found else None


def oom_kills(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """How many processes the kernel OOM-killed in our memory cgroup (v2 or v1), or None when unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            counter = root / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            counter = root / "memory" / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        try:
            for entry in counter.read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        except OSError:
            continue
    return None
