"""The web view in a real browser (Debian's chromium through Playwright) over a real ledger:
pages, live updates, actions, the HTTP token, and the OpenAPI document."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from playwright.async_api import Browser, Page, async_playwright, expect

from ledger.core import events as ev
from ledger.nats.publisher import Publisher
from ledger.nats.server import free_port
from ledger.nats.stream import PullReader, stream_last_seq
from projections.http.auth import is_loopback
from projections.projector.projector import Projector
from tests.factory import exited, heartbeat, started, sweep
from tests.jobs import Up, ledger, run_events, types
from tests.serving import CHROMIUM, CHROMIUM_ARGS, seed_demo, serve

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SLOW_MS = 60_000
"""Anything a page does: generous, CI is slow and busy (a deadline bounds a wait, it measures nothing)."""
LIVE_MS = SLOW_MS
"""A change appended to the stream shows on an open page, without a reload, within this long. How fast it
shows is a figure for bench/web.py, not a deadline here: on a busy machine 2 s was not enough."""


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """A page, with what it logged as errors and every request it made to another origin."""

    def __init__(self, page: Page, origin: str) -> None:
        self.page = page
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda req: None if req.url.startswith((origin + "/", "data:"))
                else self.foreign.append(req.url))
        page.on("dialog", lambda dialog: dialog.accept())


@contextlib.asynccontextmanager
async def opened(browser: Browser, origin: str) -> AsyncIterator[Watched]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        yield Watched(await context.new_page(), origin)
    finally:
        await context.close()


async def badge(page: Page, run_id: str) -> Any:
    return page.locator(f'tr[data-run="{run_id}"] .badge')


class TestPages:
    async def test_runs_live_run_and_sweep(self, browser: Browser, js: JetStreamContext, publisher: Publisher,
                                           db_path: Path) -> None:
        """The runs page lists runs as rows with their states, follows a state change live without a reload,
        links to the sweep page and to the run page with its SVG timeline; all from the ledger's own origin,
        without console errors."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        await publisher.publish(started("r1", sweep_id="s1"))
        await publisher.publish(started("r2", t=1, sweep_id="s1"))
        seq = await publisher.publish(heartbeat("r2", t=2, step=10, progress=0.5))
        async with serve(js, db_path) as served, opened(browser, served.url) as watched:
            page = watched.page
            await served.state.notifier.wait_for(seq, 60)
            await page.goto(served.url + "/")
            rows = page.locator("table.runs tbody tr")
            await expect(rows).to_have_count(2, timeout=SLOW_MS)
            assert ["r2", "r1"] == [await r.get_attribute("data-run") for r in await rows.all()]  # newest first
            await expect(await badge(page, "r1")).to_have_text("running", timeout=SLOW_MS)
            await page.locator("body[data-live=on]").wait_for(state="attached", timeout=SLOW_MS)
            await page.evaluate("() => { window.notReloaded = true; }")

            await publisher.publish(exited("r1", 1, t=3))
            await expect(await badge(page, "r1")).to_have_text("failed", timeout=LIVE_MS)
            assert await page.evaluate("() => window.notReloaded === true")

            await page.locator('tr[data-run="r1"] td:nth-child(2) a').click()
            await expect(page.locator("h1")).to_contain_text("Sweep s1", timeout=SLOW_MS)
            await expect(page.locator(".stacked .seg")).to_have_count(2, timeout=SLOW_MS)
            await page.locator('a.id', has_text="r1").first.click()
            await expect(page.locator("h1")).to_contain_text("Run r1", timeout=SLOW_MS)
            svg = page.locator("svg.timeline")
            await expect(svg).to_be_visible(timeout=SLOW_MS)
            assert ["running", "failed"] == [await b.get_attribute("data-state")
                                             for b in await svg.locator("g.band").all()]
            assert "exit code 1" in (await svg.locator("g.band").nth(1).locator("title").text_content() or "")
            await expect(page.locator("table.audit tbody tr")).to_have_count(2, timeout=SLOW_MS)
            await page.goto(served.url + "/web/quarantine")
            await expect(page.locator("h1")).to_have_text("Quarantine", timeout=SLOW_MS)
            await page.get_by_role("link", name="Sweeps").click()
            await expect(page.locator("table.sweeps tbody tr")).to_have_count(1, timeout=SLOW_MS)
        assert [] == watched.errors
        assert [] == watched.foreign

    async def test_filters_and_paging(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """The runs page filters by sweep, state and id prefix, and pages newest first with an older link."""
        for i in range(105):
            await publisher.publish(started(f"a{i:03d}", t=i, sweep_id="s1" if i % 2 else "s2"))
        seq = await publisher.publish(exited("a003", 1, t=200))
        first = await api.get("/", params={"min_seq": seq})
        assert 200 == first.status_code and "text/html" in first.headers["content-type"]
        assert first.text.count("<tr data-run=") == 100
        assert first.text.index('data-run="a104"') < first.text.index('data-run="a103"')
        older = first.text.split('rel="next" href="')[1].split('"')[0].replace("&amp;", "&")
        second = await api.get(older)
        assert ['a004', 'a003', 'a002', 'a001', 'a000'] == [
            chunk.split('"')[0] for chunk in second.text.split('data-run="')[1:]]
        failed = await api.get("/", params={"state": "failed"})
        assert ["a003"] == [chunk.split('"')[0] for chunk in failed.text.split('data-run="')[1:]]
        prefixed = await api.get("/", params={"prefix": "a10", "sweep": "s1"})
        assert ["a103", "a101"] == [chunk.split('"')[0] for chunk in prefixed.text.split('data-run="')[1:]]
        assert 400 == (await api.get("/", params={"state": "dancing"})).status_code

    async def test_quarantine_page_escapes_raw_bytes(self, api: httpx.AsyncClient, js: JetStreamContext,
                                                     publisher: Publisher) -> None:
        """The quarantine page shows what was kept aside and why, its raw bytes escaped, never as markup."""
        await js.publish("ledger.run.r1.started", b"<script>alert(1)</script>\x01")
        seq = await publisher.publish(started("r1"))
        page = await api.get("/web/quarantine", params={"min_seq": seq})
        assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x01" in page.text
        assert "<script>alert" not in page.text
        assert "not JSON" in page.text

    async def test_screenshots(self, browser: Browser, js: JetStreamContext, publisher: Publisher,
                               db_path: Path, tmp_path: Path) -> None:
        """The README's screenshots are taken from the real pages over a realistic ledger (into
        docs/screenshots with LEDGER_SCREENSHOTS=1, so that an ordinary run leaves the tree as it was)."""
        shots = SCREENSHOTS if os.environ.get("LEDGER_SCREENSHOTS") == "1" else tmp_path
        seq = await seed_demo(publisher)
        shots.mkdir(parents=True, exist_ok=True)
        async with serve(js, db_path) as served, opened(browser, served.url) as watched:
            await served.state.notifier.wait_for(seq, 60)
            page = watched.page
            contents = {}
            for name, path, ready in [
                ("runs", "/", "table.runs tbody tr"),
                ("run", "/web/runs/lr-1e-3-s0", "svg.timeline g.attempt"),
                ("sweep", "/web/sweeps/lr-sweep", ".stacked .seg"),
            ]:
                await page.goto(served.url + path)
                await page.locator(ready).first.wait_for(timeout=SLOW_MS)
                await page.screenshot(path=str(shots / f"{name}.png"), full_page=name != "runs")
                contents[name] = await page.content()
        assert 'class="gap"' in contents["run"]  # the preemption left a heartbeat gap
        assert [] == watched.errors and [] == watched.foreign
        for name in ("runs", "run", "sweep"):
            assert (shots / f"{name}.png").stat().st_size > 10_000


class TestActions:
    async def test_pause_and_kill_from_the_pages(self, browser: Browser, js: JetStreamContext,
                                                 publisher: Publisher, db_path: Path) -> None:
        """Pause on the sweep page and kill on the run page append what the CLI appends, and say so."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        seq = await publisher.publish(started("r1", sweep_id="s1"))
        async with serve(js, db_path) as served, opened(browser, served.url) as watched:
            page = watched.page
            await served.state.notifier.wait_for(seq, 60)
            await page.goto(served.url + "/web/sweeps/s1")
            await page.get_by_role("button", name="Pause").click()
            await expect(page.locator("#flash")).to_have_text("sweep s1: paused", timeout=SLOW_MS)
            await expect(page.locator("h1 .badge")).to_have_text("paused", timeout=SLOW_MS)
            await page.goto(served.url + "/web/runs/r1")
            await page.get_by_role("button", name="Kill").click()
            await expect(page.locator("#flash")).to_have_text("run r1: killed", timeout=SLOW_MS)
            await expect(page.locator("h1 .badge")).to_have_text("killed", timeout=SLOW_MS)
        assert [] == watched.errors and [] == watched.foreign
        killed = [e for e in await run_events(js, "r1") if isinstance(e, ev.RunKilled)]
        assert [(1, "killed by user")] == [(e.attempt, e.reason) for e in killed]
        assert ["sweep.created", "sweep.paused"] == await _sweep_types(js, "s1")

    async def test_refusal_is_shown(self, browser: Browser, js: JetStreamContext, publisher: Publisher,
                                    db_path: Path) -> None:
        """An action the ledger refuses shows the CLI's one-line refusal and appends nothing: the page
        (from views that have not seen the cancel yet) offers Pause, the stream says cancelled."""
        await publisher.publish(sweep(ev.SweepCreated, "s9"))
        await Projector(js, db_path, idle_poll=0.2).run(until_idle=True)
        await publisher.publish(sweep(ev.SweepCancelled, "s9", t=1))
        async with serve(js, db_path, project=False) as served, opened(browser, served.url) as watched:
            page = watched.page
            await page.goto(served.url + "/web/sweeps/s9")
            await page.get_by_role("button", name="Pause").click()
            flash = page.locator("#flash.refused")
            await expect(flash).to_have_text("cannot pause sweep 's9': it is cancelled", timeout=SLOW_MS)
        assert [] == [e for e in watched.errors if "409" not in e]  # the browser logs the refusal's status
        assert ["sweep.created", "sweep.cancelled"] == await _sweep_types(js, "s9")

    async def test_cross_site_and_remote_without_token_are_refused(self, js: JetStreamContext,
                                                                   publisher: Publisher, db_path: Path) -> None:
        """A cross-site POST is refused, and so is any action on an API beyond loopback without a token."""
        seq = await publisher.publish(sweep(ev.SweepCreated, "s1"))
        async with serve(js, db_path) as served, httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            await served.state.notifier.wait_for(seq, 60)
            for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
                resp = await client.post("/web/sweeps/s1/pause", headers=headers)
                assert 403 == resp.status_code and "cross-site" in resp.json()["error"]
            served.state.loopback = False
            resp = await client.post("/web/sweeps/s1/pause")
            assert 403 == resp.status_code and "actions are off" in resp.json()["error"]
            page = await client.get("/web/sweeps/s1")
            assert "Actions are off" in page.text and "Pause</button>" not in page.text
        assert ["sweep.created"] == await _sweep_types(js, "s1")


async def _sweep_types(js: JetStreamContext, sweep_id: str) -> list[str]:
    """The types of a sweep's events, read back from the stream."""

    if await stream_last_seq(js) == 0:
        return []
    reader = PullReader(js, 1, subject=f"ledger.sweep.{sweep_id}.>")
    await reader.start()
    out: list[str] = []
    try:
        while True:
            batch = await reader.next_batch(1000, 0.5)
            if not batch:
                return out
            out += types([ev.decode_event(m.subject, m.data) for m in batch])
            if batch[-1].pending == 0:
                return out
    finally:
        await reader.stop()


class TestToken:
    @pytest.mark.parametrize("host,expected", [
        ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("0.0.0.0", False), ("", False), ("10.1.2.3", False), ("gpu-a1.example", False),
    ])
    def test_loopback_hosts(self, host: str, expected: bool) -> None:
        """Actions without a token are allowed only on an API that listens on a loopback address."""
        assert expected == is_loopback(host)

    async def test_token_guards_every_route_but_health_and_metrics(self, js: JetStreamContext,
                                                                   publisher: Publisher, db_path: Path) -> None:
        """With a token, reads answer 401 JSON without it and 200 with it; /health and /metrics stay open."""
        seq = await publisher.publish(started("r1"))
        async with serve(js, db_path, token="s3cret") as served, \
                httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            await served.state.notifier.wait_for(seq, 60)
            for path in ("/runs", "/runs/r1", "/sweeps", "/schema", "/web/events", "/web/runs/r1"):
                resp = await client.get(path)
                assert 401 == resp.status_code, path
                assert "token" in resp.json()["error"]
            assert 401 == (await client.get("/runs", headers={"Authorization": "Bearer wrong"})).status_code
            good = {"Authorization": "Bearer s3cret"}
            assert "r1" == (await client.get("/runs/r1", headers=good)).json()["run_id"]
            assert 200 == (await client.get("/health")).status_code
            assert 200 == (await client.get("/metrics")).status_code
            assert 401 == (await client.post("/web/sweeps/s1/pause")).status_code

    async def test_pages_ask_for_the_token_once(self, browser: Browser, js: JetStreamContext,
                                                publisher: Publisher, db_path: Path) -> None:
        """With a token set, a page asks for it in a form once; a wrong one is refused, the right one opens
        the pages (kept in an HttpOnly cookie)."""
        seq = await publisher.publish(started("r1"))
        async with serve(js, db_path, token="s3cret") as served, opened(browser, served.url) as watched:
            await served.state.notifier.wait_for(seq, 60)
            page = watched.page
            await page.goto(served.url + "/web/runs/r1")
            await page.fill("#token", "nope")
            await page.click("button[type=submit]")
            await expect(page.locator(".error")).to_have_text("Wrong token.", timeout=SLOW_MS)
            await page.fill("#token", "s3cret")
            await page.click("button[type=submit]")
            await expect(page.locator("h1")).to_contain_text("Run r1", timeout=SLOW_MS)
            await page.goto(served.url + "/")
            await expect(page.locator("table.runs tbody tr")).to_have_count(1, timeout=SLOW_MS)
            cookies = await page.context.cookies()
            assert [(True, "Strict")] == [(c["httpOnly"], c["sameSite"]) for c in cookies]
        assert [] == [e for e in watched.errors if "401" not in e]  # the browser logs the form's 401 status
        assert [] == watched.foreign


class TestSchema:
    async def test_openapi_lists_every_route_and_parameter(self, api: httpx.AsyncClient) -> None:
        """/schema is the OpenAPI document: every API route, its parameters and its answer's shape."""
        resp = await api.get("/schema")
        assert 200 == resp.status_code
        doc = resp.json()
        assert doc["openapi"].startswith("3.")
        for path in ("/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/runs/{run_id}/history", "/sweeps",
                     "/sweeps/{sweep_id}", "/sweeps/{sweep_id}/history", "/quarantine", "/health", "/metrics", "/",
                     "/web/runs/{run_id}", "/web/sweeps/{sweep_id}", "/web/sweeps/{sweep_id}/{verb}"):
            assert path in doc["paths"], path
        params = {p["name"] for p in doc["paths"]["/runs"]["get"]["parameters"]}
        assert {"sweep", "state", "prefix", "since", "sort", "limit", "after", "min_seq", "timeout"} <= params
        run_params = {p["name"] for p in doc["paths"]["/runs/{run_id}"]["get"]["parameters"]}
        assert {"run_id", "as_of", "as_of_seq", "min_seq"} <= run_params
        assert "Run" in str(doc["paths"]["/runs"]["get"]["responses"]["200"])
        assert (await api.get("/schema/openapi.json")).json() == doc

    async def test_schema_is_browsable_without_a_cdn(self, browser: Browser, api: httpx.AsyncClient) -> None:
        """/schema/docs lists every route with its parameters, loading nothing from another origin."""
        origin = str(api.base_url).rstrip("/")
        async with opened(browser, origin) as watched:
            await watched.page.goto(origin + "/schema/docs")
            await expect(watched.page.locator("h2", has_text="GET /runs/{run_id}/events")).to_have_count(
                1, timeout=SLOW_MS)
            await expect(watched.page.locator("section#Run")).to_contain_text("last_heartbeat_at", timeout=SLOW_MS)
        assert [] == watched.errors and [] == watched.foreign


class TestRunsQuery:
    async def test_sort_since_prefix_and_bad_parameters(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """GET /runs sorts newest first, filters by since and prefix, pages with its cursor, and answers 400
        to a bad sort, since, prefix or cursor."""
        for i, run_id in enumerate(["b1", "a1", "a2", "a3"]):
            seq = await publisher.publish(started(run_id, t=i * 60))
        body = (await api.get("/runs", params={"sort": "started", "limit": 2, "min_seq": seq})).json()
        assert (["a3", "a2"], True) == ([r["run_id"] for r in body["runs"]], body["next"] is not None)
        rest = (await api.get("/runs", params={"sort": "started", "after": body["next"]})).json()
        assert (["a1", "b1"], None) == ([r["run_id"] for r in rest["runs"]], rest["next"])
        since = (await api.get("/runs", params={"since": "2026-11-25T12:01:00Z", "sort": "started"})).json()
        assert ["a3", "a2", "a1"] == [r["run_id"] for r in since["runs"]]
        prefixed = (await api.get("/runs", params={"prefix": "a"})).json()
        assert ["a1", "a2", "a3"] == [r["run_id"] for r in prefixed["runs"]]
        for params in ({"sort": "size"}, {"since": "yesterday"}, {"since": "2026-11-25T12:00:00"},
                       {"prefix": "a.b"}, {"sort": "started", "after": "nocomma"}):
            resp = await api.get("/runs", params=params)
            assert 400 == resp.status_code and resp.json()["error"], params


class TestLedgerUp:
    async def test_live_page_and_ctrl_c(self, browser: Browser, cli_env: dict[str, str], tmp_path: Path,
                                        js: JetStreamContext) -> None:
        """Under `ledger up` an open page follows an emitted change, and Ctrl-C with the page still open
        stops the ledger cleanly (the live connection ends with the server)."""
        env = {**cli_env, "LEDGER_HTTP": f"127.0.0.1:{free_port()}", "LEDGER_DATA_DIR": str(tmp_path / "data"),
               "LEDGER_HEARTBEAT_TIMEOUT": str(10 * 365 * 86400)}
        running = Up([], env)
        try:
            assert 0 == ledger("emit", STARTED_U1, env=env).returncode
            origin = f"http://{env['LEDGER_HTTP']}"
            async with opened(browser, origin) as watched:
                page = watched.page
                await page.goto(origin + "/")
                await expect(await badge(page, "u1")).to_have_text("running", timeout=SLOW_MS)
                await page.locator("body[data-live=on]").wait_for(state="attached", timeout=SLOW_MS)
                assert 0 == ledger("emit", EXITED_U1, env=env).returncode
                await expect(await badge(page, "u1")).to_have_text("failed", timeout=LIVE_MS)
                assert 0 == running.stop()
            assert [] == [e for e in watched.errors if "ERR_" not in e]  # the server going away, after the stop
        finally:
            if running.proc.poll() is None:
                running.stop()


STARTED_U1 = '{"type":"run.started","id":"u1-start","at":"2026-11-25T12:00:00Z","run_id":"u1"}'
EXITED_U1 = '{"type":"run.exited","id":"u1-exit","at":"2026-11-25T12:01:00Z","run_id":"u1","exit_code":3}'
