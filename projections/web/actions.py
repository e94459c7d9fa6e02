"""The web view's actions: pause, resume, stop and cancel a sweep; kill a run.

Each POST calls what the ``ledger`` command calls (``ledger.nats.control``): the
same events, the same refusals, the same one-line messages. Allowed only
when the API has an HTTP token (every request then proves it) or listens on
loopback, and only from the ledger's own pages (``Sec-Fetch-Site``/``Origin``).
Answers ``{"message", "state", "appended"}``, or ``{"error"}`` with 400, 403,
409 or 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request, Response, post
from litestar.params import FromPath

from ledger.errors import InvalidEvent, LedgerError, StreamUnavailable
from ledger.nats import control
from ledger.nats.publisher import Publisher
from projections.http.auth import same_origin
from projections.web.pages import actions_allowed

SWEEP_VERBS: Final = ("pause", "resume", "stop", "cancel")
T = TypeVar("T")


class ActionResult(msgspec.Struct, kw_only=True):
    """What an action did, in the words of the ``ledger`` command."""

    message: str
    state: str
    appended: bool


def _refuse(status: int, message: str) -> Response[Any]:
    return Response({"error": message}, status_code=status)


async def _act(request: Request[Any, Any, Any],
               action: Callable[[Any, Publisher], Awaitable[T]]) -> T | Response[Any]:
    if not actions_allowed(request):
        return _refuse(403, "actions are off: this API listens beyond loopback without an HTTP token")
    if not same_origin(request):
        return _refuse(403, "cross-site request refused: actions come from the ledger's own pages")
    js = request.app.state.ledger.js
    if js is None:
        return _refuse(503, "this API has no NATS connection: actions append to the stream")
    publisher = Publisher(js._nc)
    try:
        return await action(js, publisher)
    except InvalidEvent as exc:
        return _refuse(400, str(exc))
    except StreamUnavailable as exc:
        return _refuse(503, str(exc))
    except LedgerError as exc:  # CommandRefused, ConcurrencyConflict: what the command prints
        return _refuse(409, str(exc))
    finally:
        await publisher.close()


@post("/web/sweeps/{sweep_id:str}/{verb:str}", tags=["web"], summary="Pause, resume, stop or cancel a sweep",
      status_code=200)
async def sweep_action(request: Request[Any, Any, Any], sweep_id: FromPath[str],
                       verb: FromPath[str]) -> ActionResult | Response[Any]:
    """``ledger sweep VERB ID`` from the sweep page."""
    if verb not in SWEEP_VERBS:
        return _refuse(404, f"unknown sweep action {verb[:20]!r}: one of {', '.join(SWEEP_VERBS)}")

    async def go(js: Any, publisher: Publisher) -> ActionResult:
        sweep, appended = await control.change_sweep(js, publisher, verb, sweep_id)
        note = "" if appended else " (already so: nothing appended)"
        return ActionResult(message=f"sweep {sweep_id}: {sweep.state}{note}", state=sweep.state, appended=appended)

    return await _act(request, go)


@post("/web/runs/{run_id:str}/kill", tags=["web"], summary="Kill a run", status_code=200)
async def run_kill(request: Request[Any, Any, Any], run_id: FromPath[str]) -> ActionResult | Response[Any]:
    """``ledger runs kill ID`` from the run page."""

    async def go(js: Any, publisher: Publisher) -> ActionResult:
        run, appended = await control.kill_run(js, publisher, run_id)
        return ActionResult(message=f"run {run_id}: {run.state}{'' if appended else ' (already so)'}",
                            state=run.state, appended=appended)

    return await _act(request, go)
