"""The HTTP API of CONTRACT section 4, served by uvicorn over real views."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from ledger.core import events as ev
from ledger.core.machine import RUN_STATES
from ledger.nats.publisher import Publisher
from tests.factory import exited, heartbeat, preempting, started, sweep

RUN_FIELDS = {"run_id", "sweep_id", "state", "attempt", "created_at", "started_at", "ended_at", "last_heartbeat_at",
              "step", "progress", "exit_code", "signal", "preempting", "reproduced_from", "seq"}
ENTRY_FIELDS = {"state", "at", "recorded_at", "seq", "event_id", "event_type", "reason"}
SWEEP_FIELDS = {"sweep_id", "state", "created_at", "updated_at", "runs", "queue"}


async def get_json(client: httpx.AsyncClient, path: str, status: int = 200, **params: Any) -> Any:
    resp = await client.get(path, params=params)
    assert status == resp.status_code, resp.text
    return resp.json()


class TestRuns:
    async def test_read_your_write_with_min_seq(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A publisher reads its own write by passing the sequence it got back as min_seq."""
        seq = await publisher.publish(started("r1", sweep_id="s1", host="gpu-1"))
        run = await get_json(api, "/runs/r1", min_seq=seq)
        assert RUN_FIELDS == set(run)
        assert ("r1", "s1", "running", 1, seq) == (run["run_id"], run["sweep_id"], run["state"], run["attempt"], run["seq"])
        assert run["started_at"].endswith("Z")

    async def test_min_seq_not_reached_is_504(self, api: httpx.AsyncClient) -> None:
        """A min_seq the projection does not reach in time answers 504 with an error."""
        body = await get_json(api, "/runs/r1", status=504, min_seq=10_000, timeout=0.2)
        assert "10000" in body["error"]

    async def test_unknown_run_is_404(self, api: httpx.AsyncClient) -> None:
        """An unknown run id answers 404 with an error object."""
        body = await get_json(api, "/runs/nope", status=404)
        assert "nope" in body["error"]

    @pytest.mark.parametrize("path,params", [
        ("/runs", {"limit": "abc"}), ("/runs", {"limit": "0"}), ("/runs", {"state": "dancing"}),
        ("/runs", {"sweep": "a.b"}), ("/runs/r1", {"min_seq": "-1"}), ("/runs/r1", {"min_seq": "x"}),
        ("/runs/r1", {"min_seq": "1", "timeout": "soon"}), ("/quarantine", {"after": "z"}),
    ], ids=["limit-text", "limit-zero", "unknown-state", "unsafe-sweep", "negative-min-seq", "text-min-seq",
            "text-timeout", "text-after"])
    async def test_bad_parameters_are_400(self, api: httpx.AsyncClient, path: str, params: dict[str, str]) -> None:
        """A bad query parameter answers 400 with an error saying which."""
        body = await get_json(api, path, status=400, **params)
        assert body["error"]

    async def test_list_filters_and_pages(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """Runs filter by sweep and state, and page with a cursor until next is null."""
        for i in range(5):
            await publisher.publish(started(f"a{i}", sweep_id="s1"))
        await publisher.publish(started("b0", sweep_id="s2"))
        seq = await publisher.publish(exited("a3", 1))
        page = await get_json(api, "/runs", sweep="s1", limit=2, min_seq=seq)
        seen = [r["run_id"] for r in page["runs"]]
        while page["next"]:
            page = await get_json(api, "/runs", sweep="s1", limit=2, after=page["next"])
            seen += [r["run_id"] for r in page["runs"]]
        assert ["a0", "a1", "a2", "a3", "a4"] == seen
        failed = await get_json(api, "/runs", state="failed")
        assert (["a3"], None) == ([r["run_id"] for r in failed["runs"]], failed["next"])

    async def test_history_keeps_both_clocks(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """Each state change is one entry with the producer's and the stream's time and the reason."""
        await publisher.publish(started("r1"))
        await publisher.publish(heartbeat("r1"))
        seq = await publisher.publish(exited("r1", 3))
        body = await get_json(api, "/runs/r1/history", min_seq=seq)
        assert "r1" == body["run_id"]
        assert [ENTRY_FIELDS] * 2 == [set(e) for e in body["history"]]
        assert [("running", "run.started"), ("failed", "run.exited")] == [
            (e["state"], e["event_type"]) for e in body["history"]]
        assert "exit code 3" == body["history"][1]["reason"]
        assert body["history"][1]["at"] == "2026-11-25T12:00:02Z"


class TestSweeps:
    async def test_sweep_counts_and_queue(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """A sweep shows its runs per state and its preempted runs, oldest first."""
        await publisher.publish(sweep(ev.SweepCreated, "s1"))
        for run in ["r1", "r2", "r3"]:
            await publisher.publish(started(run, sweep_id="s1"))
        for run in ["r2", "r1"]:
            await publisher.publish(preempting(run))
            await publisher.publish(exited(run, 143))
        seq = await publisher.publish(sweep(ev.SweepPaused, "s1", t=5, reason="maintenance"))
        body = await get_json(api, "/sweeps/s1", min_seq=seq)
        assert SWEEP_FIELDS == set(body)
        assert set(RUN_STATES) == set(body["runs"])
        assert ("paused", 1, 2, ["r2", "r1"]) == (body["state"], body["runs"]["running"], body["runs"]["preempted"],
                                                  body["queue"])
        listed = await get_json(api, "/sweeps")
        assert ["s1"] == [s["sweep_id"] for s in listed["sweeps"]]
        hist = await get_json(api, "/sweeps/s1/history")
        assert [("running", None), ("paused", "maintenance")] == [(e["state"], e["reason"]) for e in hist["history"]]
        await get_json(api, "/sweeps/nope", status=404)


class TestOperations:
    async def test_quarantine_listing(self, api: httpx.AsyncClient, publisher: Publisher, js: JetStreamContext) -> None:
        """Quarantined messages are listed with seq, subject, reason and raw payload."""
        bad = (await js.publish("ledger.run.r1.started", b"oops")).seq
        seq = await publisher.publish(started("r1"))
        body = await get_json(api, "/quarantine", min_seq=seq)
        assert [(bad, "ledger.run.r1.started", "oops")] == [(i["seq"], i["subject"], i["raw"]) for i in body["items"]]
        assert "not JSON" in body["items"][0]["reason"]

    async def test_health_reports_lag(self, api: httpx.AsyncClient, publisher: Publisher) -> None:
        """Health reports the applied and the stream's last sequence, and their difference."""
        seq = await publisher.publish(started("r1"))
        body = await get_json(api, "/health", min_seq=seq)
        assert {"status": "ok", "last_seq": seq, "stream_last_seq": seq, "lag": 0} == body

    async def test_metrics_in_prometheus_format(self, api: httpx.AsyncClient, publisher: Publisher,
                                                js: JetStreamContext) -> None:
        """/metrics exposes events applied, quarantined, lag and batch timings."""
        await js.publish("ledger.run.r1.started", b"oops")
        seq = await publisher.publish(started("r1"))
        await get_json(api, "/health", min_seq=seq)
        resp = await api.get("/metrics")
        assert 200 == resp.status_code
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.text
        for name in ['ledger_events_total{outcome="applied"}', 'ledger_events_total{outcome="quarantined"}',
                     "ledger_projector_lag", "ledger_projector_batch_seconds_bucket"]:
            assert name in text
