"""The wire schema of CONTRACT section 1: one msgspec tagged union of events.

Pure: imports only the standard library and msgspec. A tag (``run.exited``)
is a storage format: renaming a class is free, renaming a tag is a migration.
New fields always get defaults.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeAlias, Union

import msgspec
from msgspec import Meta

from ledger.errors import InvalidEvent

EventId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")]
EntityId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}\Z")]
UtcTime = Annotated[datetime, Meta(tz=True)]
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
"""Every int on the wire fits a signed 64-bit integer (SQLite's INTEGER), or is quarantined."""
Attempt = Annotated[int, Meta(ge=1, le=2**63 - 1)]
ResumeMode: TypeAlias = Literal["never", "allow", "must", "auto"]

ENTITY_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
EVENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_EVENT_BYTES: Final = 64 * 1024
"""Payloads above this are quarantined: lifecycle events are small facts."""


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", gc=False):
    """Common envelope of every event."""

    id: EventId
    at: UtcTime
    v: Int64 = 1


class RunEvent(Event, frozen=True, kw_only=True):
    """An event about one run; ``attempt`` is the producer's fencing token."""

    run_id: EntityId
    attempt: Attempt | None = None


class SweepEvent(Event, frozen=True, kw_only=True):
    """An event about one sweep."""

    sweep_id: EntityId
    reason: str | None = None


class RunQueued(RunEvent, frozen=True, kw_only=True, tag="run.queued"):
    """The run was created and waits to be picked up."""

    sweep_id: EntityId | None = None
    config: dict[str, Any] | None = None
    reproduced_from: EntityId | None = None


class RunInitializing(RunEvent, frozen=True, kw_only=True, tag="run.initializing"):
    """The run's environment is being prepared (VESSL)."""


class RunStarted(RunEvent, frozen=True, kw_only=True, tag="run.started"):
    """The run's process started; on a run that started before, a resume."""

    sweep_id: EntityId | None = None
    resume: ResumeMode | None = None
    host: str | None = None
    pid: Int64 | None = None
    command: list[str] | None = None
    config: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    """What the batch scheduler says of this attempt (e.g. Slurm's job id, partition, nodes, restarts)."""


class RunHeartbeat(RunEvent, frozen=True, kw_only=True, tag="run.heartbeat"):
    """The run is alive; optionally with its progress."""

    step: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    progress: Annotated[float, Meta(ge=0, le=1)] | None = None
    message: str | None = None


class RunSignalled(RunEvent, frozen=True, kw_only=True, tag="run.signalled"):
    """The run's process received a signal."""

    signal: Int64
    name: str | None = None
    handled: bool | None = None


class RunPreempting(RunEvent, frozen=True, kw_only=True, tag="run.preempting"):
    """The current attempt is being preempted and will exit to be requeued."""


class RunStopping(RunEvent, frozen=True, kw_only=True, tag="run.stopping"):
    """The run is shutting down (VESSL stopping)."""


class RunIdle(RunEvent, frozen=True, kw_only=True, tag="run.idle"):
    """Termination protection holds a finished process (VESSL idle)."""

    reason: str | None = None


class RunExited(RunEvent, frozen=True, kw_only=True, tag="run.exited"):
    """The run's process ended with an exit code, or by a signal."""

    exit_code: Int64
    signal: Int64 | None = None
    reason: str | None = None
    """Why the process ended, when its wrapper found out (e.g. ``time-limit``, ``scancel``)."""


class RunKilled(RunEvent, frozen=True, kw_only=True, tag="run.killed"):
    """The run was killed on purpose; ``cause`` names the event that caused it."""

    reason: str | None = None
    cause: EventId | None = None


class RunCrashed(RunEvent, frozen=True, kw_only=True, tag="run.crashed"):
    """The ledger found the run dead (its heartbeats stopped)."""

    reason: str
    last_heartbeat_at: UtcTime | None = None


class SweepCreated(SweepEvent, frozen=True, kw_only=True, tag="sweep.created"):
    """A sweep was created and takes runs."""

    config: dict[str, Any] | None = None


class SweepPaused(SweepEvent, frozen=True, kw_only=True, tag="sweep.paused"):
    """The sweep takes no new runs for now; its runs go on."""


class SweepResumed(SweepEvent, frozen=True, kw_only=True, tag="sweep.resumed"):
    """A paused sweep takes runs again."""


class SweepStopped(SweepEvent, frozen=True, kw_only=True, tag="sweep.stopped"):
    """The sweep takes no new runs; it finishes when its runs are done."""


class SweepCancelled(SweepEvent, frozen=True, kw_only=True, tag="sweep.cancelled"):
    """The sweep is cancelled: its non-terminal runs get killed."""


class SweepFinished(SweepEvent, frozen=True, kw_only=True, tag="sweep.finished"):
    """The sweep is done."""


class SweepFailed(SweepEvent, frozen=True, kw_only=True, tag="sweep.failed"):
    """The sweep failed."""


class SweepCrashed(SweepEvent, frozen=True, kw_only=True, tag="sweep.crashed"):
    """The sweep's controller died."""


AnyRunEvent: TypeAlias = Union[
    RunQueued, RunInitializing, RunStarted, RunHeartbeat, RunSignalled, RunPreempting,
    RunStopping, RunIdle, RunExited, RunKilled, RunCrashed,
]
AnySweepEvent: TypeAlias = Union[
    SweepCreated, SweepPaused, SweepResumed, SweepStopped, SweepCancelled,
    SweepFinished, SweepFailed, SweepCrashed,
]
AnyEvent: TypeAlias = Union[AnyRunEvent, AnySweepEvent]

RUN_EVENT_TYPES: Final = tuple(t for t in AnyRunEvent.__args__)  # type: ignore[attr-defined]
SWEEP_EVENT_TYPES: Final = tuple(t for t in AnySweepEvent.__args__)  # type: ignore[attr-defined]
EVENT_TYPES: Final = {t.__struct_config__.tag: t for t in RUN_EVENT_TYPES + SWEEP_EVENT_TYPES}

_decoder: Final = msgspec.json.Decoder(AnyEvent)
_encoder: Final = msgspec.json.Encoder()


def tag_of(event: Event) -> str:
    """The event's type tag, e.g. ``run.exited``."""
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def subject_of(event: AnyEvent) -> str:
    """The NATS subject an event is published to."""
    kind, name = tag_of(event).split(".", 1)
    entity = event.run_id if isinstance(event, RunEvent) else event.sweep_id  # type: ignore[union-attr]
    return f"ledger.{kind}.{entity}.{name}"


def encode_event(event: AnyEvent) -> bytes:
    """The event's JSON payload."""
    return _encoder.encode(event)


def check_entity_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe inside a NATS subject, else raise InvalidEvent."""
    if not ENTITY_ID_RE.match(value):
        raise InvalidEvent(f"unsafe {what} {value[:40]!r}: use 1-128 of [A-Za-z0-9_-]")
    return value


def decode_event(subject: str, data: bytes | memoryview) -> AnyEvent:
    """Decode a payload strictly and check it agrees with its subject.

    Raises InvalidEvent with a one-line reason for anything that must be quarantined.
    """
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"payload too large: {len(data)} bytes > {MAX_EVENT_BYTES}")
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid event: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidEvent(_undecodable(data, exc)) from exc
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"not UTF-8: {exc}") from exc
    except RecursionError as exc:
        raise InvalidEvent(f"nested too deeply: {exc}") from exc
    prefix, suffix = _SUBJECT_PARTS[type(event)]
    entity = event.run_id if isinstance(event, RunEvent) else event.sweep_id  # type: ignore[union-attr]
    if subject != prefix + entity + suffix:
        raise InvalidEvent(f"subject {subject!r} disagrees with payload (expected {subject_of(event)!r})")
    return event


def _undecodable(data: bytes | memoryview, exc: Exception) -> str:
    """Why bytes did not decode: told by looking at the bytes, not at the library's wording
    (msgspec reports invalid UTF-8 as a DecodeError, and its text may change)."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not UTF-8: invalid byte at offset {bad.start}"
    return f"not JSON: {exc}"


_SUBJECT_PARTS: Final = {
    t: (f"ledger.{tag.split('.')[0]}.", f".{tag.split('.', 1)[1]}") for tag, t in EVENT_TYPES.items()
}
