"""``ledger run -- CMD``: run CMD as a child and publish its lifecycle.

The child is spawned behind a gate (a tiny Python that waits on a pipe before it
``exec``s CMD), so ``run.started`` carries the child's real pid and a refused
start never runs CMD. SIGINT, SIGTERM and SIGUSR1 are forwarded to the child
and recorded; a ``run.killed`` of this run SIGKILLs the child's process group
at once. The wrapper exits with the child's code (128+N for signal N).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from ledger import events as ev
from ledger import schedulers
from ledger.client import AsyncLedger, AsyncRunHandle
from ledger.errors import InvalidEvent, LedgerError
from ledger.events import ResumeMode
from ledger.ids import new_id
from ledger.spool import owner_of
from ledger.stream import STREAM

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GATE = """
import os, sys
with os.fdopen(int(sys.argv[1])) as gate:
    line = gate.readline()
if not line.endswith("\\n"):
    os._exit(125)  # the start was refused: never run CMD
if line.strip():
    os.environ["LEDGER_ATTEMPT"] = line.strip()
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"ledger run: cannot run {sys.argv[2]}: {exc.strerror}\\n")
    os._exit(126 if isinstance(exc, PermissionError) else 127)
"""
REFUSED_EXIT = 1


class Wrapper:
    """One ``ledger run`` invocation."""

    def __init__(self, command: Sequence[str], *, run_id: str | None, sweep: str | None, resume: ResumeMode | None,
                 heartbeat: float, force: bool, nats_url: str | None, drain: float = 3.0,
                 stderr: TextIO = sys.stderr) -> None:
        self.command = list(command)
        self.run_id = run_id
        self.sweep = sweep
        self.resume = resume
        self.heartbeat = heartbeat
        self.force = force
        self.nats_url = nats_url
        self.drain = drain
        self.stderr = stderr
        self.proc: asyncio.subprocess.Process | None = None
        self.handle: AsyncRunHandle | None = None
        self.killed_by: str | None = None
        # a batch scheduler (Slurm): the run's id, resume mode and attempt, and why it stopped the job
        self.scheduler = schedulers.detect(os.environ)
        self.verdict: asyncio.Task[schedulers.Verdict | None] | None = None
        if self.scheduler is not None:
            self.run_id = self.run_id or self.scheduler.run_id
            self.resume = self.resume or self.scheduler.resume

    def say(self, message: str) -> None:
        print(f"ledger run: {message}", file=self.stderr, flush=True)

    async def main(self) -> int:
        generated = self.run_id is None
        run_id = self.run_id or new_id()
        resume: ResumeMode = self.resume or "never"
        ledger = await AsyncLedger.connect(self.nats_url)
        if generated:
            self.say(f"run id {run_id}")
        if not ledger.connected:
            self.say(f"NATS unreachable at {ledger.url}: starting unchecked; events wait in {ledger.spool.path}")
        gate_read, gate_write = os.pipe()
        env = {**os.environ, "LEDGER_RUN_ID": run_id, "LEDGER_NATS_URL": ledger.url,
               "LEDGER_SPOOL": str(ledger.spool.path)}
        env.pop("LEDGER_ATTEMPT", None)
        if self.sweep:
            env["LEDGER_SWEEP_ID"] = self.sweep
        else:
            env.pop("LEDGER_SWEEP_ID", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", GATE, str(gate_read), *self.command,
            pass_fds=(gate_read,), env=env, process_group=0,
        )
        os.close(gate_read)
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:  # from the spawn on: a job stopped while it starts (Slurm's SIGTERM) is recorded too
            loop.add_signal_handler(sig, self._on_signal, sig)
        ledger.outbox.adopt(owner_of(self.proc.pid))
        try:
            self.handle = await ledger.start_run(
                run_id, sweep=self.sweep, resume=resume, force=self.force, heartbeat=self.heartbeat,
                command=self.command, pid=self.proc.pid,
                attempt=self.scheduler.attempt if self.scheduler else None,
                scheduler=self.scheduler.details if self.scheduler else None)
        except BaseException:
            os.close(gate_write)  # the gate exits 125 without running CMD
            await self.proc.wait()
            await ledger.close(drain=self.drain)
            raise
        await self._watch_kills(ledger, run_id)
        try:
            os.write(gate_write, f"{self.handle.attempt or ''}\n".encode())
        except BrokenPipeError:
            pass  # the gate died of a signal forwarded while starting: its exit is recorded below
        os.close(gate_write)
        try:
            code = await self.proc.wait()
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
        exit_code, by_signal = (128 - code, -code) if code < 0 else (code, None)
        reason = await self._scheduler_verdict(by_signal)
        await self.handle.exited(exit_code, by_signal, wait=0, reason=reason)
        if not await ledger.close(drain=self.drain):
            self.say(f"NATS did not take every event in {self.drain:g} s; they wait in {ledger.spool.path} "
                     "(sent when a ledger client runs again, or by `ledger sync`)")
        return exit_code

    def _on_signal(self, sig: int) -> None:
        self._forward(sig)  # the child first, never delayed
        if sig == signal.SIGTERM:
            self._ask_scheduler(sig)

    def _ask_scheduler(self, sig: int) -> None:
        """Start finding out from the scheduler why it sent ``sig`` (once; the exit awaits it)."""
        if self.scheduler is not None and self.verdict is None and self.killed_by is None:
            self.verdict = asyncio.get_running_loop().create_task(self.scheduler.why_stopped(sig))

    async def _scheduler_verdict(self, by_signal: int | None) -> str | None:
        """The reason for ``run.exited`` from the scheduler (bounded wait); a preemption is marked first."""
        if by_signal is not None:
            self._ask_scheduler(by_signal)  # a SIGTERM the child got straight from the scheduler, or an OOM kill
        if self.verdict is None or self.handle is None:
            return None
        verdict = await schedulers.settle(self.verdict)
        if verdict is None:
            return None
        if verdict.preempted:
            await self.handle.mark_preempting(wait=0)  # sent before the exit: rule 7 makes it preempted
        return verdict.reason

    def _forward(self, sig: int) -> None:
        proc, handle = self.proc, self.handle
        if proc is None or proc.returncode is not None:
            return
        try:
            os.kill(proc.pid, sig)  # not send_signal: its poll() reaps a child Slurm killed (exit 255)
        except ProcessLookupError:
            return
        if handle is not None:
            asyncio.get_running_loop().create_task(handle.signalled(sig))

    async def _watch_kills(self, ledger: AsyncLedger, run_id: str) -> None:
        """SIGKILL the child when this run is killed (sweep cancel, ``ledger runs kill``).

        A subscription catches kills as they are appended; after every (re)connect
        the last ``run.killed`` in the stream is checked too, so a kill appended
        while this wrapper was starting or away from NATS is not missed.
        """
        subject = f"ledger.run.{run_id}.killed"
        subscribed = False

        async def on_connect() -> None:
            nonlocal subscribed
            nc, js = ledger.connection.nc, ledger.connection.js
            if nc is None or js is None:
                return
            if not subscribed:
                subscribed = True
                await nc.subscribe(subject, cb=self._on_killed)
            try:
                last = await js.get_last_msg(STREAM, subject)
            except Exception:  # none yet, or NATS went away again: the subscription still stands
                return
            self._kill_if_ours(last.subject or "", last.data or b"", int(last.seq or 0))

        ledger.connection.on_connect(on_connect)
        await on_connect()

    async def _on_killed(self, msg: object) -> None:
        self._kill_if_ours(msg.subject, msg.data, None)  # type: ignore[attr-defined]

    def _kill_if_ours(self, subject: str, data: bytes, seq: int | None) -> None:
        try:
            event = ev.decode_event(subject, data)
        except InvalidEvent:
            return
        handle, proc = self.handle, self.proc
        if handle is None or proc is None or proc.returncode is not None or self.killed_by is not None:
            return
        if event.attempt is not None and handle.attempt is not None:  # type: ignore[union-attr]
            if event.attempt != handle.attempt:  # type: ignore[union-attr]
                return  # a kill of another attempt
        elif seq is not None and seq < handle.started_seq:
            return  # an old kill, from before this attempt started
        self.killed_by = event.id
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reason = getattr(event, "reason", None)
        self.say(f"run killed ({reason or 'no reason given'}): child SIGKILLed")


def run_command(command: Sequence[str], **options: object) -> int:
    """Run the wrapper to completion; LedgerErrors become a message and a non-zero exit."""
    wrapper = Wrapper(command, **options)  # type: ignore[arg-type]
    try:
        return asyncio.run(wrapper.main())
    except LedgerError as exc:
        wrapper.say(f"error: {exc}")
        return REFUSED_EXIT
