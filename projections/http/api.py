"""The HTTP read API of CONTRACT section 4 (Litestar, msgspec-native).

Every read takes ``min_seq`` (and ``timeout``, default 5 s): it answers once
the projection has applied that stream sequence, or 504.

``GET /runs/{id}?as_of=TIME|as_of_seq=N`` (and the same for sweeps) and
``GET /runs/{id}/events`` (the audit trail) are answered from the stream, by
reading the run's own subjects (``projections.audit.timeline``), not from the views.

When ``ledger replay`` swaps a rebuilt views database in, the next request
notices (one stat of the path) and reopens it; requests already running
finish on the old one.

The same app serves the web view (``projections.web``, CONTRACT section 8),
the OpenAPI document at ``/schema``, and, with an HTTP token, guards every
route but ``/health`` and ``/metrics`` (``projections.http.auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import aiosqlite
import msgspec
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.params import FromPath, QueryParameter
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ledger.core import shapes
from ledger.core.events import ENTITY_ID_RE
from ledger.core.fold import Entry
from ledger.core.machine import RUN_STATES, Run
from ledger.errors import StreamUnavailable
from ledger.nats.topology import cluster_status
from projections.audit import timeline
from projections.audit.timeline import AsOf
from projections.http.apidocs import RouteListPlugin
from projections.http.auth import TokenMiddleware, is_loopback
from projections.projector.metrics import REGISTRY
from projections.projector.projector import SeqNotifier
from projections.views import queries
from projections.views.listing import SORTS, BadCursor
from projections.views.listing import list_runs as list_runs_sorted
from projections.views.schema import iso
from projections.views.store import file_identity, open_db, read_checkpoint
from projections.web import web_routes

T = TypeVar("T")


@dataclass
class ApiState:
    """What the handlers read from: the views database and, when in-process, the projector."""

    db_path: Path
    notifier: SeqNotifier | None = None
    js: JetStreamContext | None = None
    db: aiosqlite.Connection | None = None
    db_identity: tuple[int, int] | None = None
    retired: list[tuple[float, aiosqlite.Connection]] = field(default_factory=list)
    reopening: asyncio.Lock = field(default_factory=asyncio.Lock)
    http_token: str | None = None
    """With a token, every route but /health and /metrics needs it (``projections.http.auth``)."""
    loopback: bool = True
    """Whether the API listens on loopback only (the web view's actions need this or a token)."""
    closing: bool = False
    """Set when the server shuts down: long-lived responses (the web view's events) end."""

    async def open(self) -> None:
        identity = file_identity(self.db_path)  # before opening: a swap in between costs one more reopen
        self.db = await open_db(self.db_path)
        self.db_identity = identity or file_identity(self.db_path)  # the file did not exist: we made it

    async def follow_swap(self) -> None:
        """Reopen the views database when ``ledger replay`` swapped another file in (one stat per request).

        Requests already running finish on the old connection; it is closed a while later.
        """
        if self.db is None or file_identity(self.db_path) in (self.db_identity, None):
            return
        async with self.reopening:
            if file_identity(self.db_path) in (self.db_identity, None):
                return
            old = self.db
            await self.open()
            now = time.monotonic()
            keep = []
            for retired_at, conn in self.retired:
                if now - retired_at > RETIRE_AFTER_S:
                    await conn.close()
                else:
                    keep.append((retired_at, conn))
            self.retired = [*keep, (now, old)]

    async def close(self) -> None:
        for _, conn in self.retired:
            await conn.close()
        self.retired = []
        if self.db is not None:
            await self.db.close()
            self.db = None


STREAM_READ_S: Final = 5.0
"""A read of the stream (as-of, audit) that gets nothing for this long answers 503."""
HEALTH_NATS_S: Final = 2.0
"""``/health`` asks JetStream for the stream's last sequence; no answer within this long is ``degraded``."""
STALL_S: Final = 10.0
"""A projector behind the stream that applied nothing for this long is stalled (``/health`` degraded)."""
RETIRE_AFTER_S: Final = 30.0
"""A connection replaced by a swap is closed on a later swap, once this old (requests take milliseconds)."""


def _state(request: Request[Any, Any, Any]) -> ApiState:
    return request.app.state.ledger  # type: ignore[no-any-return]


def _db(request: Request[Any, Any, Any]) -> aiosqlite.Connection:
    db = _state(request).db
    assert db is not None
    return db


def _check_id(value: str, what: str) -> str:
    if not ENTITY_ID_RE.match(value):
        raise ValidationException(f"invalid {what} {value[:40]!r}: use 1-128 of [A-Za-z0-9_-]")
    return value


MAX_INT: Final = 2**63 - 1
"""The largest integer SQLite stores: a larger sequence or offset is a 400, not an OverflowError."""
MAX_WAIT_S: Final = 60.0
"""The longest ``timeout`` a ``min_seq`` read may ask to wait."""


def _int_param(request: Request[Any, Any, Any], name: str, default: int | None, low: int = 0,
               high: int = MAX_INT) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValidationException(f"{name} must be an integer, got {raw[:40]!r}") from exc
    if value < low or value > high:
        raise ValidationException(f"{name} must be between {low} and {high}")
    return value


async def _before(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """before_request: follow a swapped views database, then wait for ``min_seq``."""
    await _state(request).follow_swap()
    return await _wait_min_seq(request)


async def _wait_min_seq(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """Hold a read until the projection has applied ``min_seq``."""
    min_seq = _int_param(request, "min_seq", None)
    if min_seq is None:
        return None
    raw_timeout = request.query_params.get("timeout", "5")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        return _error(HTTP_400_BAD_REQUEST, f"timeout must be a number of seconds, got {raw_timeout[:40]!r}")
    if not 0 <= timeout <= MAX_WAIT_S:  # NaN fails both comparisons too
        return _error(HTTP_400_BAD_REQUEST, f"timeout must be between 0 and {MAX_WAIT_S:g} seconds")
    state = _state(request)
    if state.notifier is not None:
        if await state.notifier.wait_for(min_seq, timeout):
            return None
    else:
        deadline = time.monotonic() + timeout
        while await read_checkpoint(_db(request)) < min_seq:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)  # another process projects: poll its checkpoint
            await state.follow_swap()
        else:
            return None
    return _error(504, f"projection has not reached seq {min_seq} within {timeout:g} s")


def _error(status: int, message: str) -> Response[Any]:
    return Response({"error": message}, status_code=status)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _error(exc.status_code, str(exc.detail))


def _on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")


class RunsPage(msgspec.Struct):
    """A page of runs and the cursor of the next page (null on the last)."""

    runs: list[Run]
    next: str | None


class RunHistory(msgspec.Struct):
    """A run's state changes, oldest first."""

    run_id: str
    history: list[Entry]


class SweepHistory(msgspec.Struct):
    """A sweep's state changes, oldest first."""

    sweep_id: str
    history: list[Entry]


class SweepList(msgspec.Struct):
    """Every sweep, by id."""

    sweeps: list[shapes.SweepView]


class QuarantineList(msgspec.Struct):
    """Messages the projector kept aside, by stream sequence."""

    items: list[queries.QuarantineItem]


def _doc(description: str, *, type_: str = "string", query: str | None = None, **schema: Any) -> Any:
    """A query parameter as the OpenAPI document shows it; the handler parses it itself (its own 400s)."""
    return QueryParameter(name=query, description=description, schema_extra={"oneOf": None, "type": type_, **schema})


MinSeq = Annotated[str | None, _doc("Answer once the projection has applied this stream sequence (else 504).",
                                    type_="integer", minimum=0)]
Timeout = Annotated[str | None, _doc("Seconds to wait for min_seq (default 5).", type_="number")]
AsOfTime = Annotated[str | None, _doc("RFC 3339 time with offset (stream clock): the state as the ledger held it "
                                      "then, read from the stream.", format="date-time")]
AsOfSeq = Annotated[str | None, _doc("Stream sequence: the state as the ledger held it then, read from the stream.",
                                     type_="integer", minimum=0)]


@get("/runs")
async def list_runs(
    request: Request[Any, Any, Any],
    sweep: Annotated[str | None, _doc("Only runs of this sweep.")] = None,
    run_state: Annotated[str | None, _doc("Only runs in this state.", query="state", enum=list(RUN_STATES))] = None,
    prefix: Annotated[str | None, _doc("Only runs whose id starts with this.")] = None,
    since: Annotated[str | None, _doc("Only runs started (or created) at or after this RFC 3339 time.",
                                      format="date-time")] = None,
    sort: Annotated[str | None, _doc("run_id (default, ascending) or started (newest first).",
                                     enum=list(SORTS))] = None,
    limit: Annotated[str | None, _doc("Page size (default 100).", type_="integer", minimum=1,
                                      maximum=queries.MAX_LIMIT)] = None,
    after: Annotated[str | None, _doc("Cursor: the `next` of the previous page.")] = None,
    min_seq: MinSeq = None, timeout: Timeout = None,
) -> RunsPage:
    """Runs, a page at a time: by run id, or newest first with ``sort=started``."""
    sweep, state, prefix, after = sweep or None, run_state or None, prefix or None, after or None
    if sweep is not None:
        _check_id(sweep, "sweep id")
    if prefix is not None and not _PREFIX.match(prefix):
        raise ValidationException(f"invalid id prefix {prefix[:40]!r}: use up to 128 of [A-Za-z0-9_-]")
    if state is not None and state not in RUN_STATES:
        raise ValidationException(f"unknown state {state[:40]!r}: one of {', '.join(RUN_STATES)}")
    if sort not in (None, "", *SORTS):
        raise ValidationException(f"unknown sort {sort[:40]!r}: one of {', '.join(SORTS)}")
    since_text = iso(_parse_time("since", since)) if since else None
    limit_n = _int_param(request, "limit", 100, low=1, high=queries.MAX_LIMIT) or 100
    if sort in (None, "", "run_id") and prefix is None and since_text is None:
        runs, cursor = await queries.list_runs(_db(request), sweep=sweep, state=state, limit=limit_n, after=after)
        return RunsPage(runs, cursor)
    try:
        runs, cursor = await list_runs_sorted(_db(request), sweep=sweep, state=state, prefix=prefix, since=since_text,
                                              sort="started" if sort == "started" else "run_id", limit=limit_n,
                                              after=after)
    except BadCursor as exc:
        raise ValidationException(str(exc)) from exc
    return RunsPage(runs, cursor)


_PLUS_LOST: Final = re.compile(r"(\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")
_PREFIX: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _parse_time(name: str, raw: str) -> datetime:
    """An RFC 3339 time with its offset, from a query parameter."""
    raw = _PLUS_LOST.sub(r"\1+\2", raw)  # an unescaped "+01:00" arrives as " 01:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ValidationException(
            f"{name} must be an RFC 3339 time, e.g. 2026-11-25T03:12:00Z; got {raw[:40]!r}") from exc
    if when.tzinfo is None:
        raise ValidationException(f"{name} needs a UTC offset (Z or +HH:MM): {raw[:40]!r}")
    return when


def _as_of(request: Request[Any, Any, Any]) -> AsOf | None:
    """The ``as_of`` (RFC 3339 time, stream clock) or ``as_of_seq`` parameter, if any."""
    raw_time = request.query_params.get("as_of") or None
    seq = _int_param(request, "as_of_seq", None)
    if raw_time is not None and seq is not None:
        raise ValidationException("give as_of or as_of_seq, not both")
    if raw_time is None:
        return None if seq is None else AsOf(seq=seq)
    return AsOf(time=_parse_time("as_of", raw_time))


def _stream(request: Request[Any, Any, Any]) -> JetStreamContext:
    js = _state(request).js
    if js is None:
        raise HTTPException(status_code=HTTP_503_SERVICE_UNAVAILABLE,
                            detail="this API has no NATS connection: as-of and audit read the stream")
    return js


def _cut_text(cut: AsOf) -> str:
    return f"seq {cut.seq}" if cut.seq is not None else f"{cut.time.isoformat() if cut.time else '?'}"


async def _from_stream(call: Awaitable[T]) -> T:
    try:
        return await call
    except StreamUnavailable as exc:
        raise HTTPException(status_code=HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc


@get("/runs/{run_id:str}")
async def get_run(request: Request[Any, Any, Any], run_id: FromPath[str], as_of: AsOfTime = None,
                  as_of_seq: AsOfSeq = None, min_seq: MinSeq = None, timeout: Timeout = None) -> Run:
    """One run now, or as the ledger held it at a past time or stream sequence."""
    _check_id(run_id, "run id")
    cut = _as_of(request)
    if cut is not None:
        past = await _from_stream(timeline.run_as_of(_stream(request), run_id, cut, stall_timeout=STREAM_READ_S))
        if past is None:
            raise NotFoundException(f"run {run_id!r} unknown at {_cut_text(cut)}")
        return past
    run = await queries.get_run(_db(request), run_id)
    if run is None:
        raise NotFoundException(f"unknown run {run_id!r}")
    return run


@get("/runs/{run_id:str}/events")
async def run_events(request: Request[Any, Any, Any], run_id: FromPath[str], min_seq: MinSeq = None,
                     timeout: Timeout = None) -> shapes.Timeline:
    """The run's audit trail, read from the stream: every message of its subjects and what it did."""
    _check_id(run_id, "run id")
    found = await _from_stream(timeline.run_timeline(_stream(request), run_id, stall_timeout=STREAM_READ_S))
    if not found.events:
        raise NotFoundException(f"unknown run {run_id!r}: no message on ledger.run.{run_id}.>")
    return found


@get("/runs/{run_id:str}/history")
async def run_history(request: Request[Any, Any, Any], run_id: FromPath[str], min_seq: MinSeq = None,
                      timeout: Timeout = None) -> RunHistory:
    """Every state the run went through, with both clocks and the reason."""
    db = _db(request)
    entries = await queries.history(db, "run", _check_id(run_id, "run id"))
    if not entries and await queries.get_run(db, run_id) is None:
        raise NotFoundException(f"unknown run {run_id!r}")
    return RunHistory(run_id, entries)


@get("/sweeps")
async def list_sweeps(request: Request[Any, Any, Any], min_seq: MinSeq = None, timeout: Timeout = None) -> SweepList:
    """Every sweep with its runs per state and its queue."""
    return SweepList(await queries.list_sweeps(_db(request)))


@get("/sweeps/{sweep_id:str}")
async def get_sweep(request: Request[Any, Any, Any], sweep_id: FromPath[str], as_of: AsOfTime = None,
                    as_of_seq: AsOfSeq = None, min_seq: MinSeq = None, timeout: Timeout = None) -> shapes.SweepView:
    """One sweep now, or as the ledger held it at a past time or stream sequence."""
    _check_id(sweep_id, "sweep id")
    cut = _as_of(request)
    if cut is not None:
        past = await _from_stream(timeline.sweep_as_of(_stream(request), sweep_id, cut, stall_timeout=STREAM_READ_S))
        if past is None:
            raise NotFoundException(f"sweep {sweep_id!r} unknown at {_cut_text(cut)}")
        counts, queue = await queries.sweep_runs_as_of(
            _db(request), sweep_id, seq=cut.seq, recorded_at=iso(cut.time) if cut.time else None)
        return queries.sweep_view(past, counts, queue)
    sweep = await queries.get_sweep(_db(request), sweep_id)
    if sweep is None:
        raise NotFoundException(f"unknown sweep {sweep_id!r}")
    return sweep


@get("/sweeps/{sweep_id:str}/history")
async def sweep_history(request: Request[Any, Any, Any], sweep_id: FromPath[str], min_seq: MinSeq = None,
                        timeout: Timeout = None) -> SweepHistory:
    """Every state the sweep went through."""
    db = _db(request)
    entries = await queries.history(db, "sweep", _check_id(sweep_id, "sweep id"))
    if not entries:
        raise NotFoundException(f"unknown sweep {sweep_id!r}")
    return SweepHistory(sweep_id, entries)


@get("/quarantine")
async def list_quarantine(
    request: Request[Any, Any, Any],
    limit: Annotated[str | None, _doc("Page size (default 100).", type_="integer", minimum=1,
                                      maximum=queries.MAX_LIMIT)] = None,
    after: Annotated[str | None, _doc("List messages after this stream sequence.", type_="integer", minimum=0)] = None,
    min_seq: MinSeq = None, timeout: Timeout = None,
) -> QuarantineList:
    """Messages the projector kept aside: sequence, subject, why, and the raw payload."""
    limit_n = _int_param(request, "limit", 100, low=1, high=queries.MAX_LIMIT) or 100
    after_n = _int_param(request, "after", 0) or 0
    return QuarantineList(await queries.quarantine(_db(request), limit=limit_n, after=after_n))


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """``ok`` only while NATS answers and the projector applies the stream; else ``degraded``, a reason, 503."""
    state = _state(request)
    last_seq = await read_checkpoint(_db(request))
    reasons: list[str] = []
    notifier = state.notifier
    stream_seq: int | None = notifier.stream_last_seq if notifier else None
    cluster: dict[str, Any] | None = None
    if state.js is not None:
        if not state.js._nc.is_connected:
            reasons.append("NATS unreachable (reconnecting)")
        else:
            try:
                async with asyncio.timeout(HEALTH_NATS_S):  # one stream_info: the last seq, leader and replicas
                    cluster = await cluster_status(state.js)
                stream_seq = cluster["stream"]["last_seq"]
            except (TimeoutError, NatsError) as exc:  # NATS away or JetStream not answering: the views still answer
                reasons.append(f"NATS unreachable ({type(exc).__name__})")
    stream_seq = max(stream_seq or 0, last_seq)
    lag = stream_seq - last_seq
    if notifier is not None:
        if notifier.problem is not None:
            reasons.append(notifier.problem)
        elif lag > 0 and notifier.stalled_for() > STALL_S:
            reasons.append(f"projector stalled: nothing applied for {notifier.stalled_for():.0f} s, {lag} behind")
    body: dict[str, Any] = {"status": "ok", "last_seq": last_seq, "stream_last_seq": stream_seq, "lag": lag}
    if cluster is not None and cluster["cluster"]:  # on a NATS cluster: its nodes, the stream's leader and replicas
        body["cluster"] = cluster
    if not reasons:
        return Response(body)
    body.update(status="degraded", reason="; ".join(reasons))
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def prometheus_metrics() -> bytes:
    return generate_latest(REGISTRY)


def create_app(state: ApiState) -> Litestar:
    """The Litestar app over ``state``; the database opens read-only at startup."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await state.open()
        try:
            yield
        finally:
            await state.close()

    app = Litestar(
        route_handlers=[list_runs, get_run, run_events, run_history, list_sweeps, get_sweep, sweep_history,
                        list_quarantine, health, prometheus_metrics, *web_routes()],
        before_request=_before,
        exception_handlers={HTTPException: _on_http_error, Exception: _on_crash},
        lifespan=[lifespan],
        middleware=[TokenMiddleware(state.http_token)] if state.http_token else [],
        openapi_config=OPENAPI,
        debug=False,
    )
    app.state.ledger = state
    return app


OPENAPI: Final = OpenAPIConfig(
    title="run-ledger", version="1", path="/schema",
    description="The read API of run-ledger (CONTRACT section 4) and its web view (section 8).",
    render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"]), YamlRenderPlugin(), RouteListPlugin()],
)
"""``GET /schema`` is the OpenAPI document as JSON (also at ``/schema/openapi.json``, YAML at
``/schema/openapi.yaml``), browsable at ``/schema/docs`` (Litestar's own browsable renderers load
scripts from a CDN)."""


class ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: ``ledger up`` owns the signals."""

    state: ApiState | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: Any = None) -> None:
        if self.state is not None:
            self.state.closing = True  # the web view's event streams end within a second
        await super().shutdown(sockets)


def api_server(state: ApiState, host: str, port: int) -> ApiServer:
    state.loopback = is_loopback(host)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = ApiServer(config)
    server.state = state
    return server


