"""The HTTP read API of CONTRACT section 4 (Litestar, msgspec-native).

Every read takes ``min_seq`` (and ``timeout``, default 5 s): it answers once
the projection has applied that stream sequence, or 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.params import FromPath
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_500_INTERNAL_SERVER_ERROR
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ledger.events import ENTITY_ID_RE
from ledger.machine import RUN_STATES, Run
from ledger.stream import stream_last_seq
from projections import queries
from projections.metrics import REGISTRY
from projections.projector import SeqNotifier
from projections.store import open_db, read_checkpoint


@dataclass
class ApiState:
    """What the handlers read from: the views database and, when in-process, the projector."""

    db_path: Path
    notifier: SeqNotifier | None = None
    js: JetStreamContext | None = None
    db: aiosqlite.Connection | None = None


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


def _int_param(request: Request[Any, Any, Any], name: str, default: int | None, low: int = 0,
               high: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValidationException(f"{name} must be an integer, got {raw[:40]!r}") from exc
    if value < low or (high is not None and value > high):
        raise ValidationException(f"{name} must be between {low} and {high if high is not None else 'any'}")
    return value


async def _wait_min_seq(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """before_request: hold a read until the projection has applied ``min_seq``."""
    min_seq = _int_param(request, "min_seq", None)
    if min_seq is None:
        return None
    raw_timeout = request.query_params.get("timeout", "5")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        return _error(HTTP_400_BAD_REQUEST, f"timeout must be a number of seconds, got {raw_timeout[:40]!r}")
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
        else:
            return None
    return _error(504, f"projection has not reached seq {min_seq} within {timeout:g} s")


def _error(status: int, message: str) -> Response[Any]:
    return Response({"error": message}, status_code=status)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _error(exc.status_code, str(exc.detail))


def _on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")


@get("/runs")
async def list_runs(request: Request[Any, Any, Any]) -> dict[str, Any]:
    sweep = request.query_params.get("sweep") or None
    state = request.query_params.get("state") or None
    if sweep is not None:
        _check_id(sweep, "sweep id")
    if state is not None and state not in RUN_STATES:
        raise ValidationException(f"unknown state {state[:40]!r}: one of {', '.join(RUN_STATES)}")
    after = request.query_params.get("after") or None
    limit = _int_param(request, "limit", 100, low=1, high=queries.MAX_LIMIT)
    runs, cursor = await queries.list_runs(_db(request), sweep=sweep, state=state, limit=limit or 100, after=after)
    return {"runs": runs, "next": cursor}


@get("/runs/{run_id:str}")
async def get_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Run:
    run = await queries.get_run(_db(request), _check_id(run_id, "run id"))
    if run is None:
        raise NotFoundException(f"unknown run {run_id!r}")
    return run


@get("/runs/{run_id:str}/history")
async def run_history(request: Request[Any, Any, Any], run_id: FromPath[str]) -> dict[str, Any]:
    db = _db(request)
    entries = await queries.history(db, "run", _check_id(run_id, "run id"))
    if not entries and await queries.get_run(db, run_id) is None:
        raise NotFoundException(f"unknown run {run_id!r}")
    return {"run_id": run_id, "history": entries}


@get("/sweeps")
async def list_sweeps(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return {"sweeps": await queries.list_sweeps(_db(request))}


@get("/sweeps/{sweep_id:str}")
async def get_sweep(request: Request[Any, Any, Any], sweep_id: FromPath[str]) -> queries.SweepView:
    sweep = await queries.get_sweep(_db(request), _check_id(sweep_id, "sweep id"))
    if sweep is None:
        raise NotFoundException(f"unknown sweep {sweep_id!r}")
    return sweep


@get("/sweeps/{sweep_id:str}/history")
async def sweep_history(request: Request[Any, Any, Any], sweep_id: FromPath[str]) -> dict[str, Any]:
    db = _db(request)
    entries = await queries.history(db, "sweep", _check_id(sweep_id, "sweep id"))
    if not entries:
        raise NotFoundException(f"unknown sweep {sweep_id!r}")
    return {"sweep_id": sweep_id, "history": entries}


@get("/quarantine")
async def list_quarantine(request: Request[Any, Any, Any]) -> dict[str, Any]:
    limit = _int_param(request, "limit", 100, low=1, high=queries.MAX_LIMIT) or 100
    after = _int_param(request, "after", 0) or 0
    return {"items": await queries.quarantine(_db(request), limit=limit, after=after)}


@get("/health")
async def health(request: Request[Any, Any, Any]) -> dict[str, Any]:
    state = _state(request)
    last_seq = await read_checkpoint(_db(request))
    status = "ok"
    stream_seq: int | None = state.notifier.stream_last_seq if state.notifier else None
    if state.js is not None:
        try:
            stream_seq = await asyncio.wait_for(stream_last_seq(state.js), 2.0)
        except Exception:  # NATS down: the views still answer, but say so
            status = "degraded"
    stream_seq = max(stream_seq or 0, last_seq)
    return {"status": status, "last_seq": last_seq, "stream_last_seq": stream_seq, "lag": stream_seq - last_seq}


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def prometheus_metrics() -> bytes:
    return generate_latest(REGISTRY)


def create_app(state: ApiState) -> Litestar:
    """The Litestar app over ``state``; the database opens read-only at startup."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state.db = await open_db(state.db_path)
        try:
            yield
        finally:
            await state.db.close()
            state.db = None

    app = Litestar(
        route_handlers=[list_runs, get_run, run_history, list_sweeps, get_sweep, sweep_history,
                        list_quarantine, health, prometheus_metrics],
        before_request=_wait_min_seq,
        exception_handlers={HTTPException: _on_http_error, Exception: _on_crash},
        lifespan=[lifespan],
        openapi_config=None,
        debug=False,
    )
    app.state.ledger = state
    return app


class ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: ``ledger up`` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(state: ApiState, host: str, port: int) -> ApiServer:
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on")
    return ApiServer(config)


