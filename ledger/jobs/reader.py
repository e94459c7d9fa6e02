"""Reading the ledger from Python: ``Reader``, a small client of the HTTP API (CONTRACT section 4).

::

    from ledger import Reader

    reader = Reader()                                   # $LEDGER_HTTP, else 127.0.0.1:8480
    for run in reader.runs(sweep="s1", state="running", since="1h"):
        print(run.run_id, run.progress)
    reader.run("train-42", as_of="2026-11-25T03:12:00Z")
    reader.wait("train-42", {"finished", "failed"}, timeout=600)

Answers are typed msgspec structs: ``Run``, ``Entry``, ``SweepView``,
``Timeline``. Standard library HTTP (urllib), so that the job side stays
light; the token of ``LEDGER_HTTP_TOKEN`` is sent when set. An error answer
is ``ReadFailed`` (a ``LedgerError``) carrying the HTTP status and the API's
one-line message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from ledger.core.fold import Entry
from ledger.core.machine import Run
from ledger.errors import LedgerError

if TYPE_CHECKING:
    from ledger.core.shapes import SweepView, Timeline

T = TypeVar("T")
DEFAULT_HTTP: Final = "127.0.0.1:8480"
LONG_POLL_S: Final = 5.0
"""``wait`` holds one request this long at most for the projection to move."""
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReadFailed(LedgerError):
    """The ledger's HTTP API answered an error (``status``), or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def since_time(value: str | datetime, now: datetime | None = None) -> datetime:
    """A time from ``1h``, ``30m``, ``2d`` (that long ago), an RFC 3339 text, or a datetime."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("since needs a timezone-aware datetime")
        return value
    text = value.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in _UNITS:
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"since needs a UTC offset (Z or +HH:MM) or a duration like 1h: {value!r}")
    return when


def _time_text(value: str | datetime) -> str:
    when = value if isinstance(value, datetime) else since_time(value)
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class Reader:
    """A client of one ledger's HTTP API."""

    def __init__(self, http: str | None = None, *, token: str | None = None, timeout: float = 10.0) -> None:
        http = http or os.environ.get("LEDGER_HTTP") or DEFAULT_HTTP
        self.base = http.rstrip("/") if "://" in http else f"http://{http}"
        self.token = token if token is not None else os.environ.get("LEDGER_HTTP_TOKEN") or None
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing

    def get_json(self, path: str, params: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """GET a path of the API and decode its JSON; an error answer is ReadFailed."""
        return json.loads(self._get(path, params, timeout))

    def _get(self, path: str, params: dict[str, Any] | None, timeout: float | None = None,
             accept: tuple[int, ...] = ()) -> bytes:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = self.base + urllib.parse.quote(path) + (f"?{query}" if query else "")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as resp:
                return resp.read()  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in accept:
                return body  # type: ignore[no-any-return]
            try:
                message = json.loads(body).get("error") or body.decode(errors="replace")
            except ValueError:
                message = body.decode(errors="replace") or str(exc)
            raise ReadFailed(str(message), exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ReadFailed(f"cannot reach the ledger API at {self.base} ({exc}); is `ledger up` running?") from exc

    def _typed(self, kind: type[T], path: str, params: dict[str, Any] | None = None,
               timeout: float | None = None) -> T:
        return msgspec.json.decode(self._get(path, params, timeout), type=kind)

    # ------------------------------------------------------------------ reads

    def runs(self, *, sweep: str | None = None, state: str | None = None, since: str | datetime | None = None,
             prefix: str | None = None, sort: str = "started", page_size: int = 500) -> Iterator[Run]:
        """Every run matching the filters, newest first (``sort="run_id"``: by id); pages are fetched as needed.

        ``since``: ``"1h"``, ``"2d"``, an RFC 3339 text or an aware datetime.
        """
        params: dict[str, Any] = {"sweep": sweep, "state": state, "prefix": prefix, "sort": sort,
                                  "since": _time_text(since) if since is not None else None, "limit": page_size}
        while True:
            page = self._typed(_RunsPage, "/runs", params)
            yield from page.runs
            if page.next is None:
                return
            params["after"] = page.next

    def run(self, run_id: str, *, as_of: str | datetime | int | None = None, min_seq: int | None = None) -> Run:
        """One run now; with ``as_of`` a time (RFC 3339 or datetime) or a stream sequence (int), as it was then."""
        params: dict[str, Any] = {"min_seq": min_seq}
        if isinstance(as_of, int):
            params["as_of_seq"] = as_of
        elif as_of is not None:
            params["as_of"] = _time_text(as_of)
        return self._typed(Run, f"/runs/{run_id}", params)

    def history(self, run_id: str) -> list[Entry]:
        """Every state the run went through, oldest first, with both clocks and the reason."""
        return self._typed(_RunHistory, f"/runs/{run_id}/history").history

    def events(self, run_id: str) -> Timeline:
        """The run's audit trail: every message of its subjects and what it did (read from the stream)."""
        from ledger.core.shapes import Timeline

        return self._typed(Timeline, f"/runs/{run_id}/events")

    def sweep(self, sweep_id: str, *, as_of: str | datetime | int | None = None) -> SweepView:
        """One sweep: its state, its runs per state, its preemption queue (now, or as it was then)."""
        from ledger.core.shapes import SweepView

        params: dict[str, Any] = {}
        if isinstance(as_of, int):
            params["as_of_seq"] = as_of
        elif as_of is not None:
            params["as_of"] = _time_text(as_of)
        return self._typed(SweepView, f"/sweeps/{sweep_id}", params)

    def last_seq(self) -> int:
        """The last stream sequence the views have applied."""
        return int(json.loads(self._get("/health", None, accept=(503,)))["last_seq"])  # 503: degraded, still says

    def wait(self, run_id: str, states: Iterable[str] | str, timeout: float = 60.0) -> Run:
        """The run once it is in one of ``states``; TimeoutError after ``timeout`` seconds.

        No busy loop: between looks it holds one request until the projection moves
        (``min_seq``), at most ``LONG_POLL_S`` at a time. A run not known yet is waited for.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            seq = self.last_seq()
            try:
                run = self.run(run_id)
            except ReadFailed as exc:
                if exc.status != 404:
                    raise
            else:
                if run.state in wanted:
                    return run
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run {run_id!r} not in {', '.join(sorted(wanted))} within {timeout:g} s")
            hold = min(left, LONG_POLL_S)
            # answers once the projection passes seq (200, or 404 for a run not known yet), else 504 after hold
            self._get(f"/runs/{run_id}", {"min_seq": seq + 1, "timeout": f"{hold:.3f}"}, timeout=hold + self.timeout,
                      accept=(404, 504))


class _RunsPage(msgspec.Struct):
    runs: list[Run]
    next: str | None


class _RunHistory(msgspec.Struct):
    run_id: str
    history: list[Entry]
