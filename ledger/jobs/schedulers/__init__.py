"""Batch schedulers ``ledger run`` may find itself under, and what they say of a job.

The wrapper consults ``detect()`` once; the rest of the ledger knows nothing of
schedulers. A scheduler names the run, picks its default resume mode and its
attempt, adds what it knows of the job to ``run.started``, and says why the job
was told to stop:

    scheduler = detect(os.environ)                 # None outside any scheduler
    task = asyncio.create_task(scheduler.why_stopped(signal.SIGTERM))
    verdict = await settle(task)                   # a Verdict, or None; bounded in time

A verdict that ``preempted`` makes the wrapper append ``run.preempting`` before
the exit (rule 7 then makes the exit ``preempted``); its ``reason`` goes on
``run.exited``, where the history shows it (``time-limit`` and ``oom`` make an
exit by signal ``failed``). Slurm is the first scheduler (``ledger.jobs.schedulers.slurm``);
another joins by adding its class to ``SCHEDULERS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ledger.core.events import ResumeMode

SETTLE_S: Final = 8.0
"""The longest the exit waits for a verdict: well inside Slurm's default KillWait (30 s)."""


@dataclass(frozen=True)
class Verdict:
    """Why the scheduler stopped the job: the history's reason, and whether it comes back."""

    reason: str
    preempted: bool = False


class Scheduler(Protocol):
    """What the wrapper needs from a scheduler."""

    @property
    def run_id(self) -> str:
        """The run's id when ``--run-id`` is not given: the same for every incarnation of the job."""

    @property
    def resume(self) -> ResumeMode:
        """The resume mode when ``--resume`` is not given."""

    @property
    def attempt(self) -> int | None:
        """The attempt this incarnation of the job is, when the scheduler knows (a restart count + 1)."""

    @property
    def details(self) -> dict[str, Any]:
        """What ``run.started`` records of the job (its ``scheduler`` field)."""

    async def why_stopped(self, signum: int) -> Verdict | None:
        """Why the job got ``signum`` (or died of it), or None when it was not the scheduler's doing."""
        ...


def detect(environ: Mapping[str, str]) -> Scheduler | None:
    """The scheduler running this process, from its environment; None outside any."""
    from ledger.jobs.schedulers.slurm import Slurm

    for kind in (Slurm,):
        found = kind.detect(environ)
        if found is not None:
            return found
    return None


async def settle(task: asyncio.Task[Verdict | None], timeout: float = SETTLE_S) -> Verdict | None:
    """The task's verdict; None when it fails or takes longer than ``timeout``: asking never breaks the job."""
    try:
        return await asyncio.wait_for(task, timeout)
    except Exception:  # a scheduler that cannot say leaves the exit as it is
        return None


__all__ = ["SETTLE_S", "Scheduler", "Verdict", "detect", "settle"]
