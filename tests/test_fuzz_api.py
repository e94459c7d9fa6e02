"""The HTTP API fuzzed from its own OpenAPI schema (``GET /schema``) with Hypothesis: every route,
every parameter, valid and hostile values. No 500, no traceback in a body, and a JSON ``error`` for
every 4xx of the JSON API; with a token, 401 JSON for every route but /health and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.nats.server import free_port
from projections.http.api import ApiState, api_server

TOKEN = "fuzz-token-0123456789"
SKIP = {"/web/events"}  # a server-sent event stream: it never ends by itself
HOSTILE = st.sampled_from([
    "", " ", "a.b", "*", ">", "..", "../../etc/passwd", "%00", "\x00", "a b", "x" * 300, "-1", "0",
    "99999999999999999999999", "1e309", "NaN", "true", "null", "[]", "{}", "'; drop table runs; --",
    "<script>", "\u202e", "é", "🙂", "2026-13-45T99:99:99Z", "1970-01-01T00:00:00Z",
])


def _value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """A string for a parameter: often valid for its schema, often hostile."""
    kind = schema.get("type")
    valid: st.SearchStrategy[str]
    if "enum" in schema:
        valid = st.sampled_from([str(v) for v in schema["enum"]])
    elif kind == "integer":
        valid = st.integers(min_value=-(2**70), max_value=2**70).map(str)
    elif kind == "number":
        valid = st.floats(allow_nan=True, allow_infinity=True).map(str)
    elif kind == "boolean":
        valid = st.sampled_from(["true", "false", "1", "0", "yes"])
    elif schema.get("format") == "date-time":
        valid = st.datetimes().map(lambda d: d.isoformat())
    else:
        valid = st.text(max_size=40)
    return st.one_of(valid, HOSTILE, st.text(max_size=200))


def _params(operation: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in operation.get("parameters", []) if p.get("in") in ("path", "query")]


@contextlib.contextmanager
def serving(state: ApiState) -> Iterator[httpx.Client]:
    """The API as `ledger up` serves it (uvicorn), on its own thread and event loop, and a client for it."""
    port = free_port()
    server = api_server(state, "127.0.0.1", port)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn exposes readiness only as a flag
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the API did not stop"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with serving(ApiState(tmp_path_factory.mktemp("fuzz") / "views.db")) as http:
        yield http


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with serving(ApiState(tmp_path_factory.mktemp("fuzz-token") / "views.db", http_token=TOKEN)) as http:
        yield http


@pytest.fixture(scope="module")
def operations(client: httpx.Client) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path template, operation) of every route the schema lists."""
    schema = client.get("/schema").json()
    found = [(method.upper(), path, op) for path, item in schema["paths"].items() for method, op in item.items()
             if method in ("get", "post") and path not in SKIP]
    assert any(path == "/runs" for _, path, _ in found) and any("{run_id}" in path for _, path, _ in found)
    return found


def _request(draw: st.DrawFn, operations: list[tuple[str, str, dict[str, Any]]]) -> tuple[str, str, str]:
    method, template, operation = draw(st.sampled_from(operations))
    path = template
    query: list[tuple[str, str]] = []
    for param in _params(operation):
        value = draw(_value(param.get("schema", {})))
        if param["name"] == "min_seq" and value.strip().isascii() and value.strip().isdigit() and int(value) > 0:
            value = "0"  # a real wait for the projection (up to 5 s, then 504): tested in test_api.py
        if param["in"] == "path":
            path = path.replace("{" + param["name"] + "}", urllib.parse.quote(value, safe="") or "%20")
        elif draw(st.booleans()):
            query.append((param["name"], value))
    if draw(st.booleans()):
        query.append((draw(st.sampled_from(["junk", "limit", "since", "as_of", "cursor"])), draw(HOSTILE)))
    return method, template, path + ("?" + urllib.parse.urlencode(query) if query else "")


def _is_page(template: str) -> bool:
    return template == "/" or (template.startswith("/web/") and template != "/web/login")


def check(method: str, template: str, url: str, status: int, body: bytes, content_type: str) -> None:
    """What every answer must be: no 500, no traceback, a JSON error for a 4xx of the JSON API."""
    text = body.decode(errors="replace")
    assert status != 500, f"{method} {url}: 500 {text[:300]}"
    assert status < 500 or status == 503, f"{method} {url}: {status} {text[:300]}"
    assert "Traceback" not in text and 'File "' not in text, f"{method} {url}: a traceback in the body"
    if 400 <= status < 500 and "json" in content_type:
        assert isinstance(json.loads(body).get("error"), str), f"{method} {url}: {status} {text[:200]}"
    if 400 <= status < 500 and not _is_page(template) and template != "/web/login":
        assert "json" in content_type, f"{method} {url}: {status} answered {content_type}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_every_route_survives_hostile_parameters(client: httpx.Client,
                                                 operations: list[tuple[str, str, dict[str, Any]]],
                                                 data: st.DataObject) -> None:
    """Any value for any parameter of any route: never a 500, never a traceback, a JSON error for a bad one."""
    method, template, url = data.draw(st.composite(lambda draw: _request(draw, operations))())
    response = client.request(method, url, headers={"accept": "application/json"})
    check(method, template, url, response.status_code, response.content, response.headers.get("content-type", ""))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), token=st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                                       st.just(TOKEN[:-1]), st.just(TOKEN + "x"), st.just(TOKEN)))
def test_with_a_token_every_route_but_health_and_metrics_needs_it(
        secured: httpx.Client, operations: list[tuple[str, str, dict[str, Any]]], data: st.DataObject,
        token: str | None) -> None:
    """With --http-token, a request without the right bearer token gets 401 JSON on every route but
    /health, /metrics and the login form."""
    method, template, url = data.draw(st.composite(lambda draw: _request(draw, operations))())
    headers = {"accept": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}".strip()  # clients refuse a header ending in a blank
    response = secured.request(method, url, headers=headers)
    check(method, template, url, response.status_code, response.content, response.headers.get("content-type", ""))
    if template in ("/health", "/metrics", "/web/login") or (token or "").strip() == TOKEN:
        return
    path = urllib.parse.unquote(url.split("?", 1)[0])
    unroutable = path.count("/") != template.count("/") or {".", ".."} & set(path.split("/"))  # clients fold dots
    if response.status_code in (404, 405) and unroutable:
        return  # an id holding "/" matches no route (or another route's path): nothing to guard
    assert response.status_code == 401, f"{method} {url} with {token!r}: {response.status_code}"
    assert "error" in response.json()


def test_schema_lists_the_json_api(client: httpx.Client) -> None:
    """The OpenAPI document at /schema names the read API's routes and their parameters."""
    schema = client.get("/schema").json()
    for path in ("/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/sweeps", "/sweeps/{sweep_id}", "/health"):
        assert path in schema["paths"], path
