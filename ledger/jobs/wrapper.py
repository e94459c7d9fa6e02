"""``ledger run -- CMD``: run CMD as a child and publish its lifecycle.

The child is spawned behind a gate (a tiny Python that waits on a pipe before it
``exec``s CMD), so ``run.started`` carries the child's real pid and a refused
start never runs CMD. The child leads a process group of its own; SIGINT,
SIGTERM, SIGHUP and SIGUSR1 are forwarded to that whole group (``killpg``: a
``torchrun`` worker or a DataLoader process hears a preemption too) and
recorded as ``run.signalled``; a ``run.killed`` of this run SIGKILLs the group
at once. When stdin is a terminal and the wrapper holds its foreground, the
child's group is given the foreground (so a child reading stdin, ``input()``
or ``breakpoint()``, is not stopped by SIGTTIN) and the wrapper takes it back
when the child ends (SIGTTOU ignored meanwhile). Ctrl-Z stops the child's
group; the wrapper then takes the terminal back and stops too, so the shell
regains it, and on ``fg`` hands it to the child again and continues it.

The wrapper exits with the child's code (128+N for signal N), whatever the
ledger does: once the child has ended, recording its exit and draining the
spool are bounded, and a failure there is reported on stderr, never turned
into another exit code. Events the server refused for good are reported on
stderr as they are set aside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ledger.core import events as ev
from ledger.core.events import ResumeMode
from ledger.errors import InvalidEvent, LedgerError
from ledger.ids import new_id
from ledger.jobs import schedulers
from ledger.jobs.client import AsyncLedger, AsyncRunHandle
from ledger.jobs.spool import owner_of
from ledger.nats.stream import STREAM

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
EXIT_RECORD_S = 10.0
"""The longest recording the child's exit may take once it has ended (spooling it, at worst)."""
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
        self.terminal: tuple[int, Any] | None = None
        """While the child's group holds the terminal's foreground: its fd, and SIGTTOU's disposition before."""
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
        ledger = await AsyncLedger.connect(self.nats_url, report=self.say)
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
        self._give_terminal(self.proc.pid)
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
            self._take_terminal()
            await ledger.close(drain=self.drain)
            raise
        await self._watch_kills(ledger, run_id)
        try:
            os.write(gate_write, f"{self.handle.attempt or ''}\n".encode())
        except BrokenPipeError:
            pass  # the gate died of a signal forwarded while starting: its exit is recorded below
        os.close(gate_write)
        if self.terminal is not None:
            loop.add_signal_handler(signal.SIGCHLD, self._on_child_stopped)
        try:
            code = await self.proc.wait()
        finally:
            for sig in (*FORWARDED, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            self._take_terminal()
        exit_code, by_signal = (128 - code, -code) if code < 0 else (code, None)
        await self._finish(ledger, exit_code, by_signal)
        return exit_code

    async def _finish(self, ledger: AsyncLedger, exit_code: int, by_signal: int | None) -> None:
        """Record the exit and drain the spool, bounded; a failure is a line on stderr, never an exit code."""
        assert self.handle is not None
        reason = await self._scheduler_verdict(by_signal)  # bounded (schedulers.settle)
        try:
            async with asyncio.timeout(EXIT_RECORD_S):
                await self.handle.exited(exit_code, by_signal, wait=0, reason=reason)
        except (LedgerError, TimeoutError) as exc:
            self.say(f"could not record the exit ({exc or 'timed out'}); the child's code stands")
        sent = await ledger.close(drain=self.drain)
        if ledger.outbox.set_aside:
            self.say(f"{ledger.outbox.set_aside} event(s) refused by the ledger for good are kept aside in "
                     f"{ledger.spool.path} (listed by `ledger sync`)")
        if not sent:
            self.say(f"NATS did not take every event in {self.drain:g} s; they wait in {ledger.spool.path} "
                     "(sent when a ledger client runs again, or by `ledger sync`)")

    def _give_terminal(self, pgid: int) -> None:
        """Give the child's group the terminal's foreground, if stdin is one and this process holds it.

        SIGTTOU stays ignored until ``_take_terminal``: the wrapper, now in the
        background, may still write its lines to the terminal (even under
        ``stty tostop``) and take the foreground back. The child was spawned
        before, so it keeps the default disposition.
        """
        try:
            fd = sys.stdin.fileno()
            if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return  # no terminal, or the wrapper itself runs in the background: leave it be
        except (OSError, ValueError, AttributeError):
            return
        ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(fd, pgid)
        except OSError:
            signal.signal(signal.SIGTTOU, ttou)
            return
        self.terminal = (fd, ttou)

    def _take_terminal(self) -> None:
        """Take the terminal's foreground back for the wrapper's own group."""
        held, self.terminal = self.terminal, None
        if held is None:
            return
        fd, ttou = held
        try:
            os.tcsetpgrp(fd, os.getpgrp())
        except OSError:
            pass  # the terminal is gone (a closed ssh session): nothing to take back
        finally:
            signal.signal(signal.SIGTTOU, ttou)

    def _on_child_stopped(self) -> None:
        """Ctrl-Z under a terminal stops the child's group (it holds the foreground): stop with it, as a shell's
        job would, so the shell gets the terminal back; when continued (``fg``), hand the terminal to the
        child again and continue it (after ``bg``, continue it in the background)."""
        proc, held = self.proc, self.terminal
        if proc is None or proc.returncode is not None or held is None:
            return
        try:
            stopped = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WNOHANG)  # a stop only: never reaps
        except ChildProcessError:
            return
        if stopped is None:
            return
        fd = held[0]
        try:
            os.tcsetpgrp(fd, os.getpgrp())  # SIGTTOU is ignored while the child holds the terminal
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGSTOP)  # SIGSTOP: SIGTSTP would be discarded in an orphaned group
        try:  # continued
            if os.tcgetpgrp(fd) == os.getpgrp():
                os.tcsetpgrp(fd, proc.pid)
            os.killpg(proc.pid, signal.SIGCONT)
        except OSError:
            pass

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
            os.killpg(proc.pid, sig)  # the whole group: its own workers hear it too (not send_signal: its poll() would reap a child the scheduler killed)
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
