"""The web view's pages (CONTRACT section 8): runs at ``/``, a run, a sweep, the quarantine,
and the server-sent events that keep an open page live.

Pages are rendered on the server from the views (and, for a run's audit trail
and process details, from the run's own subjects in the stream). Live
updates: each page holds one ``EventSource`` on ``/web/events``, which sends
the projection's sequence when it moves (at most every ``THROTTLE_S``); the
page then fetches itself again and swaps its content in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any, Final

import aiosqlite
from litestar import MediaType, Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath
from litestar.response import Redirect, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from ledger.core import shapes
from ledger.core.events import ENTITY_ID_RE, RunStarted, decode_event
from ledger.core.machine import RUN_STATES, TERMINAL
from ledger.errors import InvalidEvent, StreamUnavailable
from ledger.nats.stream import read_range
from projections.audit import timeline
from projections.http.auth import COOKIE, token_matches
from projections.views import listing
from projections.views import queries
from projections.views.store import read_checkpoint
from projections.web import render
from projections.web.render import esc, href

PAGE_SIZE: Final = 100
THROTTLE_S: Final = 0.25
"""At most one live update per page this often, however fast the projection moves."""
STREAM_READ_S: Final = 5.0
AUDIT_FOLD: Final = 4
"""More routine heartbeats in a row than this show as one folded row (``ledger audit`` lists them all)."""
_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_-]{0,128}$")
HTML: Final = MediaType.HTML


def _state(request: Request[Any, Any, Any]) -> Any:
    return request.app.state.ledger


def _db(request: Request[Any, Any, Any]) -> aiosqlite.Connection:
    db = _state(request).db
    assert db is not None
    return db


async def current_seq(request: Request[Any, Any, Any]) -> int:
    """The last stream sequence the views have applied."""
    state = _state(request)
    if state.notifier is not None:
        return int(state.notifier.last_seq)
    return await read_checkpoint(_db(request))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def actions_allowed(request: Request[Any, Any, Any]) -> bool:
    """Actions need a token set (every request then proves it) or an API on loopback."""
    state = _state(request)
    return bool(state.http_token) or bool(state.loopback)


def _html(body: str, status: int = 200) -> Response[str]:
    return Response(body, media_type=HTML, status_code=status,
                    headers={"cache-control": "no-store", "content-security-policy":
                             "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"})


def _error_page(title: str, message: str, seq: int, status: int) -> Response[str]:
    return _html(render.page(title, f'<h1>{esc(title)}</h1><p class="error">{esc(message)}</p>', seq), status)


def _action_button(url: str, label: str, *, danger: bool = False, confirm: str | None = None) -> str:
    extra = f' data-confirm="{esc(confirm)}"' if confirm else ""
    return (f'<form class="action" method="post" action="{href(url)}"{extra}>'
            f'<button type="submit" class="{"danger" if danger else ""}">{esc(label)}</button></form>')


def _actions_note() -> str:
    return ('<p class="dim">Actions are off: this API listens beyond loopback without an HTTP token '
            "(<code>ledger up --http-token</code>).</p>")


# --------------------------------------------------------------------------- runs

@get("/", media_type=HTML, tags=["web"], summary="Runs page (HTML)")
async def runs_page(request: Request[Any, Any, Any]) -> Response[str]:
    """Every run, newest first, filterable by sweep, state and id prefix, a page at a time; live."""
    seq = await current_seq(request)
    params = request.query_params
    sweep = params.get("sweep") or None
    state = params.get("state") or None
    prefix = params.get("prefix") or None
    after = params.get("after") or None
    problems = []
    if sweep is not None and not ENTITY_ID_RE.match(sweep):
        problems.append(f"invalid sweep id {sweep[:40]!r}")
    if state is not None and state not in RUN_STATES:
        problems.append(f"unknown state {state[:40]!r}")
    if prefix is not None and not _PREFIX_RE.match(prefix):
        problems.append(f"invalid id prefix {prefix[:40]!r}: use [A-Za-z0-9_-]")
    if problems:
        return _error_page("Runs", "; ".join(problems), seq, 400)
    db = _db(request)
    try:
        runs, cursor = await listing.list_runs(db, sweep=sweep, state=state, prefix=prefix, sort="started",
                                               limit=PAGE_SIZE, after=after)
    except listing.BadCursor as exc:
        return _error_page("Runs", str(exc), seq, 400)
    total = await listing.count_runs(db, sweep=sweep, state=state, prefix=prefix)
    options = "".join(f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>' for s in RUN_STATES)
    filters = (
        '<form class="filters" method="get" action="/">'
        f'<label>sweep <input name="sweep" value="{esc(sweep)}" placeholder="any" size="14"></label>'
        f'<label>state <select name="state"><option value="">any</option>{options}</select></label>'
        f'<label>id prefix <input name="prefix" value="{esc(prefix)}" placeholder="any" size="14"></label>'
        '<button type="submit">Filter</button> <a href="/">clear</a></form>')
    paging = []
    if after:
        paging.append(f'<a href="{href("/", sweep=sweep, state=state, prefix=prefix)}">« newest</a>')
    if cursor:
        paging.append(f'<a rel="next" href="{href("/", sweep=sweep, state=state, prefix=prefix, after=cursor)}">'
                      "older »</a>")
    shown = f"{len(runs)} of {total:,} run{'s' if total != 1 else ''}, newest first"
    body = (f'<h1>Runs</h1>{filters}<p class="count">{shown}</p>'
            f'{render.runs_table(runs, _now(), "No runs match." if total else "No runs yet.")}'
            f'<nav class="paging">{" ".join(paging)}</nav>')
    return _html(render.page("Runs", body, seq))


# --------------------------------------------------------------------------- one run

async def _started_events(js: Any, run_id: str) -> list[RunStarted]:
    """The run's ``run.started`` events (host, pid, command of each attempt), from its subjects."""
    found: list[RunStarted] = []
    subject = f"ledger.run.{run_id}.started"
    async with contextlib.aclosing(read_range(js, subject=subject, stall_timeout=STREAM_READ_S)) as batches:
        async for batch in batches:
            for msg in batch:
                try:
                    event = decode_event(msg.subject, msg.data)
                except InvalidEvent:
                    continue
                if isinstance(event, RunStarted):
                    found.append(event)
    return found


def _routine(entry: shapes.TimelineEntry) -> bool:
    return entry.event_type == "run.heartbeat" and entry.effect == "applied" and not entry.history


def _audit_rows(entries: list[shapes.TimelineEntry]) -> str:
    """A row per message; a long stretch of routine heartbeats folds into its first, a count, and its last."""
    rows: list[str] = []
    i = 0
    while i < len(entries):
        j = i
        while j < len(entries) and _routine(entries[j]):
            j += 1
        if j - i > AUDIT_FOLD:
            rows += [_audit_row(entries[i]),
                     f'<tr class="folded"><td></td><td colspan="5" class="dim">… {j - i - 2:,} more heartbeats, '
                     "each applied (step and progress) …</td></tr>", _audit_row(entries[j - 1])]
            i = j
            continue
        rows.append(_audit_row(entries[i]))
        i += 1
    return "".join(rows)


def _audit_row(e: shapes.TimelineEntry) -> str:
    return (f'<tr class="effect-{e.effect}"><td class=num>{e.seq}</td><td>{render.when(e.recorded_at)}</td>'
            f"<td><code>{esc(e.event_type or e.subject)}</code></td><td class=num>{esc(e.attempt)}</td>"
            f'<td><span class="effect">{esc(e.effect)}</span></td><td>{esc(e.why)}</td></tr>')


def _audit_table(trail: shapes.Timeline) -> str:
    rows = _audit_rows(trail.events)
    summary = ", ".join(f"{n} {effect}" for effect, n in sorted(trail.summary.items()))
    return (f'<p class="dim">{len(trail.events)} messages: {esc(summary)}</p>'
            '<table class="audit"><thead><tr><th>seq</th><th>recorded</th><th>event</th><th>attempt</th>'
            f"<th>effect</th><th>why</th></tr></thead><tbody>{rows}</tbody></table>")


@get("/web/runs/{run_id:str}", media_type=HTML, tags=["web"], summary="Run page (HTML)")
async def run_page(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[str]:
    """One run: its state timeline (SVG), details of its process, history with reasons, audit trail."""
    seq = await current_seq(request)
    if not ENTITY_ID_RE.match(run_id):
        return _error_page("Run", f"invalid run id {run_id[:40]!r}", seq, 400)
    db = _db(request)
    run = await queries.get_run(db, run_id)
    if run is None:
        return _error_page(f"Run {run_id}", f"unknown run {run_id!r}", seq, 404)
    entries = await queries.history(db, "run", run_id)
    js = _state(request).js
    trail: shapes.Timeline | None = None
    starts: list[RunStarted] = []
    note = ""
    if js is None:
        note = "This API has no NATS connection: the audit trail and process details read the stream."
    else:
        try:
            trail = await timeline.run_timeline(js, run_id, stall_timeout=STREAM_READ_S)
            starts = await _started_events(js, run_id)
        except StreamUnavailable as exc:
            note = f"The stream did not answer: {exc}"
    beats = [e.at for e in trail.events if e.event_type == "run.heartbeat" and e.at and e.effect == "applied"] \
        if trail else []
    attempts = [(e.at, e.attempt) for e in trail.events
                if trail and e.at and e.attempt and e.history and "attempt" in e.changes] if trail else []
    now = _now()
    ended = run.state in TERMINAL
    svg = render.timeline_svg(entries, now=now, ended=ended, attempts=attempts, beats=beats)
    last_start = next((s for s in reversed(starts) if s.attempt in (None, run.attempt)), starts[-1] if starts else None)
    command = " ".join(last_start.command) if last_start and last_start.command else None
    details = render.detail_list([
        ("state", render.badge(run.state)), ("sweep", render.sweep_link(run.sweep_id)),
        ("attempt", esc(run.attempt)), ("host", esc(last_start.host) if last_start else ""),
        ("pid", esc(last_start.pid) if last_start else ""),
        ("command", f"<code>{esc(command)}</code>" if command else ""),
        ("exit code", esc(run.exit_code)), ("signal", esc(run.signal)),
        ("created", render.when(run.created_at)), ("started", render.when(run.started_at)),
        ("ended", render.when(run.ended_at)), ("last heartbeat", render.heartbeat_age(run, now)),
        ("duration", render.span(render.duration(run, now))), ("progress", render.progress_bar(run)),
        ("reproduced from", render.run_link(run.reproduced_from) if run.reproduced_from else ""),
        ("seq", esc(run.seq)),
    ])
    if run.state in TERMINAL:
        actions = ""
    elif actions_allowed(request):
        actions = _action_button(f"/web/runs/{run_id}/kill", "Kill", danger=True,
                                 confirm=f"Kill run {run_id}? Its wrapper SIGKILLs the process.")
    else:
        actions = _actions_note()
    body = (f'<h1>Run <span class="id">{esc(run_id)}</span> {render.badge(run.state)}</h1>'
            f'<div class="actions">{actions}</div>'
            f"<section><h2>Timeline</h2>{svg}</section>"
            f'<section class="cols"><div><h2>Details</h2>{details}</div>'
            f"<div><h2>History</h2>{render.history_table(entries)}</div></section>"
            f'<section><h2>Audit trail</h2>{f"<p class=dim>{esc(note)}</p>" if note else ""}'
            f'{_audit_table(trail) if trail else ""}</section>')
    return _html(render.page(f"Run {run_id}", body, seq))


# --------------------------------------------------------------------------- sweeps

@get("/web/sweeps", media_type=HTML, tags=["web"], summary="Sweeps page (HTML)")
async def sweeps_page(request: Request[Any, Any, Any]) -> Response[str]:
    """Every sweep with its state and its runs by state."""
    seq = await current_seq(request)
    sweeps = await queries.list_sweeps(_db(request))
    rows = "".join(
        f"<tr><td>{render.sweep_link(s.sweep_id)}</td><td>{render.badge(s.state)}</td>"
        f"<td class=num>{sum(s.runs.values())}</td><td class=wide>{render.stacked_bar(s.runs)}</td>"
        f"<td>{render.when(s.updated_at)}</td></tr>" for s in sweeps)
    table = ('<table class="sweeps"><thead><tr><th>sweep</th><th>state</th><th>runs</th><th>by state</th>'
             f"<th>updated</th></tr></thead><tbody>{rows}</tbody></table>") if sweeps else \
        '<p class="empty">No sweeps yet.</p>'
    return _html(render.page("Sweeps", f"<h1>Sweeps</h1>{table}", seq))


SWEEP_ACTIONS: Final = {
    "pause": ("running",), "resume": ("paused",), "stop": ("running", "paused"),
    "cancel": ("running", "paused", "stopped"),
}


@get("/web/sweeps/{sweep_id:str}", media_type=HTML, tags=["web"], summary="Sweep page (HTML)")
async def sweep_page(request: Request[Any, Any, Any], sweep_id: FromPath[str]) -> Response[str]:
    """One sweep: its runs by state as a stacked bar, its preemption queue, its history and its runs."""
    seq = await current_seq(request)
    if not ENTITY_ID_RE.match(sweep_id):
        return _error_page("Sweep", f"invalid sweep id {sweep_id[:40]!r}", seq, 400)
    db = _db(request)
    sweep = await queries.get_sweep(db, sweep_id)
    runs, cursor = await listing.list_runs(db, sweep=sweep_id, sort="started", limit=PAGE_SIZE)
    if sweep is None and not runs:
        return _error_page(f"Sweep {sweep_id}", f"unknown sweep {sweep_id!r}", seq, 404)
    counts = sweep.runs if sweep else {}
    entries = await queries.history(db, "sweep", sweep_id)
    if not actions_allowed(request):
        actions = _actions_note()
    else:
        actions = "".join(
            _action_button(f"/web/sweeps/{sweep_id}/{verb}", verb.capitalize(), danger=verb == "cancel",
                           confirm=f"Cancel sweep {sweep_id}? Every run of it is killed." if verb == "cancel" else None)
            for verb, states in SWEEP_ACTIONS.items() if sweep is None or sweep.state in states)
    queue = "".join(f"<li>{render.run_link(r)}</li>" for r in (sweep.queue if sweep else []))
    more = (f'<p><a href="{href("/", sweep=sweep_id)}">all {sum(counts.values()):,} runs of this sweep »</a></p>'
            if cursor else "")
    body = (f'<h1>Sweep <span class="id">{esc(sweep_id)}</span> '
            f'{render.badge(sweep.state) if sweep else "<span class=dim>(no sweep events)</span>"}</h1>'
            f'<div class="actions">{actions}</div>'
            f"<section><h2>Runs by state</h2>{render.stacked_bar(counts)}</section>"
            f'<section class="cols"><div><h2>Preemption queue</h2>'
            f'{f"<ol class=queue>{queue}</ol>" if queue else "<p class=empty>Empty.</p>"}</div>'
            f"<div><h2>History</h2>{render.history_table(entries)}</div></section>"
            f"<section><h2>Runs</h2>{render.runs_table(runs, _now())}{more}</section>")
    return _html(render.page(f"Sweep {sweep_id}", body, seq))


# --------------------------------------------------------------------------- quarantine

@get("/web/quarantine", media_type=HTML, tags=["web"], summary="Quarantine page (HTML)")
async def quarantine_page(request: Request[Any, Any, Any]) -> Response[str]:
    """What the projector kept aside, why, and the raw bytes escaped."""
    seq = await current_seq(request)
    db = _db(request)
    raw_after = request.query_params.get("after") or "0"
    after = int(raw_after) if raw_after.isdigit() else 0
    items = await queries.quarantine(db, limit=PAGE_SIZE, after=after)
    total = await queries.quarantine_count(db)
    rows = "".join(
        f"<tr><td class=num>{i.seq}</td><td>{render.when(i.recorded_at)}</td><td><code>{esc(i.subject)}</code></td>"
        f'<td>{esc(i.reason)}</td><td><pre class="raw">{render.raw_text(i.raw)}</pre></td></tr>' for i in items)
    table = ('<table class="quarantine"><thead><tr><th>seq</th><th>recorded</th><th>subject</th><th>reason</th>'
             f"<th>raw</th></tr></thead><tbody>{rows}</tbody></table>") if items else \
        '<p class="empty">Nothing quarantined.</p>'
    nxt = (f'<nav class="paging"><a rel="next" href="{href("/web/quarantine", after=items[-1].seq)}">more »</a></nav>'
           if len(items) == PAGE_SIZE else "")
    count = f'<p class="count">{total:,} message{"s" if total != 1 else ""} kept aside</p>'
    body = f"<h1>Quarantine</h1>{count}{table}{nxt}"
    return _html(render.page("Quarantine", body, seq))


# --------------------------------------------------------------------------- live updates

async def _seq_changes(request: Request[Any, Any, Any]) -> AsyncIterator[ServerSentEventMessage]:
    state = _state(request)
    last = -1
    while not state.closing:
        seq = await current_seq(request)
        if seq != last:
            last = seq
            yield ServerSentEventMessage(data=str(seq), event="seq", retry=1000)
            await asyncio.sleep(THROTTLE_S)
            continue
        if state.notifier is not None:
            await state.notifier.wait_for(last + 1, 1.0)
        else:
            await asyncio.sleep(0.5)  # another process projects: poll its checkpoint


@get("/web/events", tags=["web"], summary="The projection's sequence as server-sent events")
async def seq_events(request: Request[Any, Any, Any]) -> ServerSentEvent:
    """``event: seq`` with the last applied stream sequence, whenever it moves (throttled)."""
    return ServerSentEvent(_seq_changes(request), headers={"cache-control": "no-store"})


# --------------------------------------------------------------------------- login

def login_response(path: str, query: str, error: str = "", status: int = 401) -> Response[str]:
    """The token form, for a page asked for without the token."""
    target = path + (f"?{query}" if query else "")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    return Response(render.template("login.html").substitute(error=esc(error), next=esc(target)),
                    media_type=HTML, status_code=status, headers={"cache-control": "no-store"})


@get("/web/login", media_type=HTML, tags=["web"], summary="Token form (HTML)")
async def login_form(request: Request[Any, Any, Any]) -> Response[str]:
    return login_response("/", "", status=200)


@post("/web/login", tags=["web"], summary="Check the token and keep it in a cookie")
async def login(request: Request[Any, Any, Any],
                data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    """The form's token: right, a SameSite=Strict HttpOnly cookie and back to the page; wrong, the form again."""
    token = _state(request).http_token
    target = data.get("next") or "/"
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    if not token:
        return Redirect(target, status_code=303)
    if not token_matches(data.get("token"), token):
        return login_response(target, "", error="Wrong token.")
    response: Response[Any] = Redirect(target, status_code=303)
    response.set_cookie(COOKIE, data.get("token", ""), httponly=True, samesite="strict", path="/")
    return response
