"""The log on a 3-node JetStream cluster (contract section 6), on this machine's loopback.

Three real ``nats-server`` processes clustered on loopback (``tests/cluster.py``), then:

- publish throughput: the ledger's pipelined ``Publisher`` into the ``LEDGER`` stream at R1 and at
  R3 (ratio R3/R1), and raw nats-py ``js.publish_async`` into the R3 stream on the same cluster
  (the ceiling: no event encoding, no ledger bookkeeping);
- failover: a publisher keeps appending (pipelined chunks, each retried under its own event ids
  until acknowledged, as the job side does) while the stream leader is SIGKILLed; the longest time
  one event waited from its first send to its ack, the longest gap between two acks, and the
  largest lag of a read node (``ledger up --nats-url <cluster>``, polled on ``/health``) meanwhile, and
  how long after the kill it was back within 1,000 events of the stream (the publisher never stops).
  Median of ``--kills`` kills (the killed node is started again and caught up before the next);
- projection rate on a read node: ``ledger projector --until-idle`` from an empty views database
  over the whole stream, against the raw projector ceiling (``RawCeiling``: ordered read + decode +
  ``executemany``) on the same cluster.

Run: ``.venv/bin/python bench/cluster.py [--events N] [--kills K]``. Prints medians and the ceilings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import RawCeiling, cpu_model, median, nats_server_version, progress_printer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/cluster.py: the 3-node loopback cluster the tests use too


def events(n: int, prefix: str) -> list[Any]:
    """``n`` heartbeats spread over 100 runs (each run started first)."""
    from datetime import datetime, timezone

    from ledger.core import events as ev

    now = datetime.now(timezone.utc)
    out: list[Any] = []
    for r in range(100):
        out.append(ev.RunStarted(id=f"{prefix}-{r}-s", at=now, run_id=f"{prefix}-{r}", attempt=1, host="h", pid=1,
                                 command=["x"]))
    out += [ev.RunHeartbeat(id=f"{prefix}-h{i}", at=now, run_id=f"{prefix}-{i % 100}", attempt=1, step=i)
            for i in range(n - 100)]
    return out


async def fresh_stream(js: Any, replicas: int) -> None:
    from nats.js.errors import NotFoundError

    from ledger.nats.stream import ensure_stream

    try:
        await js.delete_stream("LEDGER")
    except NotFoundError:
        pass
    await ensure_stream(js, replicas=replicas)


async def ledger_publish_rate(url: str, replicas: int, n: int) -> float:
    """Events per second through the ledger's Publisher into a fresh stream of ``replicas``."""
    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import connect

    nc = await connect(url, name="bench-publish", reconnect=False)
    try:
        await fresh_stream(nc.jetstream(), replicas)
        batch = events(n, f"r{replicas}")
        publisher = Publisher(nc, max_in_flight=5_000, timeout=30)
        t0 = time.perf_counter()
        futures = [await publisher.submit(e) for e in batch]
        for f in futures:
            await publisher.wait(f)
        elapsed = time.perf_counter() - t0
        await publisher.close()
        return n / elapsed
    finally:
        await nc.close()


async def raw_publish_rate(url: str, n: int) -> float:
    """Events per second through nats-py ``publish_async`` (the same payloads and ids) into a fresh R3 stream."""
    from ledger.core.events import encode_event, subject_of
    from ledger.nats.stream import connect

    nc = await connect(url, name="bench-raw", reconnect=False)
    try:
        js = nc.jetstream(publish_async_max_pending=5_000)
        await fresh_stream(js, 3)
        batch = [(subject_of(e), encode_event(e), {"Nats-Msg-Id": e.id}) for e in events(n, "raw")]
        t0 = time.perf_counter()
        futures = [await js.publish_async(s, p, headers=h) for s, p, h in batch]
        await asyncio.gather(*futures)
        return n / (time.perf_counter() - t0)
    finally:
        await nc.close()


def health(http: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{http}/health", timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # type: ignore[no-any-return]
    except OSError:
        return {}


async def one_failover(cluster: Any, url: str, http: str, prefix: str, say: Any) -> dict[str, float]:
    """Kill the stream leader under a steady publisher; the worst ack wait and the read node's worst lag."""
    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import connect
    from tests.cluster import stream_leader

    nc = await connect(url, name="bench-failover")
    js = nc.jetstream()
    publisher = Publisher(nc, timeout=5.0)
    waits: list[float] = []
    acked_at: list[float] = []
    stop = asyncio.Event()
    lags: list[int] = []
    lag_at: list[tuple[float, int]] = []

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            chunk = events(150, f"{prefix}-{i}")[100:]  # 50 heartbeats
            i += 1
            first = {e.id: time.perf_counter() for e in chunk}
            todo = chunk
            while todo:
                futures = []
                for e in todo:
                    try:
                        futures.append(await publisher.submit(e))
                    except Exception:  # not sent (disconnected): retried below
                        futures.append(None)
                sent = [f for f in futures if f is not None]
                if sent:
                    await asyncio.wait(sent, timeout=publisher.timeout)
                publisher.forget([f for f in sent if not f.done()])
                retry = []
                now = time.perf_counter()
                for e, f in zip(todo, futures):
                    if f is not None and f.done() and f.exception() is None:
                        waits.append(now - first[e.id])
                        acked_at.append(now)
                    else:
                        retry.append(e)
                todo = retry
                if todo:
                    await asyncio.sleep(0.1)

    async def watch() -> None:
        while not stop.is_set():
            h = await asyncio.to_thread(health, http)
            if "lag" in h:
                lags.append(int(h["lag"]))
                lag_at.append((time.perf_counter(), int(h["lag"])))
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(publish()), asyncio.create_task(watch())]
    await asyncio.sleep(2.0)  # steady publishing before the kill
    while not lags or lags[-1] > 1_000:  # and the read node keeping up with it
        await asyncio.sleep(0.1)
    leader = await stream_leader(js)
    waits.clear()
    lags.clear()
    killed_at = time.perf_counter()
    cluster.kill(leader)
    say(f"killed the stream leader {leader}")
    while not [t for t in acked_at if t > killed_at + 0.5] or time.perf_counter() - killed_at < 8:
        await asyncio.sleep(0.1)
    after = sorted(t for t in acked_at if t > killed_at - 1.0)
    pause = max((b - a for a, b in zip(after, after[1:])), default=0.0)
    await asyncio.sleep(2.0)
    while time.perf_counter() - killed_at < 60 and not [t for t, lag in lag_at if t > killed_at + 8 and lag <= 1_000]:
        await asyncio.sleep(0.1)  # the read node back within 1,000 events of the stream (the publisher goes on)
    worst = max(lag_at, key=lambda p: p[1] if p[0] > killed_at else -1)[0]
    back = min((t for t, lag in lag_at if t > worst and lag <= 1_000), default=float("nan")) - killed_at
    stop.set()
    await asyncio.gather(*tasks)
    await publisher.close()
    await asyncio.to_thread(cluster.start_node, leader)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the restarted node current again before the next kill
        info = await js.stream_info("LEDGER")
        if info.cluster and all(p.current for p in info.cluster.replicas or []) and len(info.cluster.replicas or []) == 2:
            break
        await asyncio.sleep(0.2)
    await nc.close()
    return {"max_ack_wait_s": max(waits), "publishing_paused_s": pause,
            "read_node_max_lag": float(max(lags, default=0)), "read_node_back_s": back}


async def raw_ceiling(url: str, work: Path, total: int) -> float:
    from ledger.nats.stream import PullReader, connect

    nc = await connect(url, name="bench-ceiling", reconnect=False)
    ceiling = RawCeiling(work / "ceiling.db")
    try:
        elapsed, _ = await ceiling.run(nc.jetstream(), total, PullReader, 30.0,
                                       lambda done: RuntimeError(f"ceiling stalled at seq {done}"))
    finally:
        ceiling.close()
        await nc.close()
    return total / elapsed


async def stream_last(url: str) -> int:
    from ledger.nats.stream import connect, stream_last_seq

    nc = await connect(url, reconnect=False)
    try:
        return await stream_last_seq(nc.jetstream())
    finally:
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per publish measurement")
    parser.add_argument("--kills", type=int, default=3, help="leader kills (the median is reported)")
    parser.add_argument("--repeat", type=int, default=3, help="publish measurements per kind (median)")
    args = parser.parse_args()
    from tests.cluster import LocalCluster
    from tests.jobs import LEDGER

    say = progress_printer(time.perf_counter())
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        cluster = LocalCluster(work / "nats").start()
        url = cluster.url
        node: subprocess.Popen[str] | None = None
        try:
            r1 = [asyncio.run(ledger_publish_rate(url, 1, args.events)) for _ in range(args.repeat)]
            say(f"R1 publish: {median(r1):,.0f} events/s")
            raw = [asyncio.run(raw_publish_rate(url, args.events)) for _ in range(args.repeat)]
            say(f"raw publish_async R3: {median(raw):,.0f} events/s")
            r3 = [asyncio.run(ledger_publish_rate(url, 3, args.events)) for _ in range(args.repeat)]
            say(f"R3 publish: {median(r3):,.0f} events/s")

            http = f"127.0.0.1:{_free_port()}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
            env.update({"LEDGER_NATS_URL": url, "LEDGER_DATA_DIR": str(work / "read-node"), "LEDGER_HTTP": http})
            node = subprocess.Popen([*LEDGER, "up", "--json"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            assert node.stdout is not None
            node.stdout.readline()  # ready
            kills = [asyncio.run(one_failover(cluster, url, http, f"k{k}", say)) for k in range(args.kills)]
            for k in kills:
                say(f"failover: {json.dumps({key: round(v, 3) for key, v in k.items()})}")

            total = asyncio.run(stream_last(url))
            t0 = time.perf_counter()
            subprocess.run([*LEDGER, "projector", "--until-idle", "--data-dir", str(work / "fresh")], env=env,
                           check=True, capture_output=True)
            projector_rate = total / (time.perf_counter() - t0)
            ceiling = asyncio.run(raw_ceiling(url, work, total))
        finally:
            if node is not None:
                node.terminate()
                node.wait(30)
            cluster.stop()

    print(f"\nrun-ledger on a 3-node JetStream cluster (loopback) - {cpu_model()}, nats-server {nats_server_version()}")
    print(f"publish, ledger Publisher R1:            {median(r1):>9,.0f} events/s  (median of {args.repeat} x {args.events:,})")
    print(f"publish, ledger Publisher R3:            {median(r3):>9,.0f} events/s  (R3/R1 = {median(r3) / median(r1):.2f})")
    print(f"publish, raw nats-py publish_async R3:   {median(raw):>9,.0f} events/s  (ledger R3 / raw = "
          f"{median(r3) / median(raw):.2f})")
    print(f"failover, longest wait for one ack:      {median([k['max_ack_wait_s'] for k in kills]):>9.2f} s  "
          f"(median of {args.kills} leader kills; max {max(k['max_ack_wait_s'] for k in kills):.2f} s)")
    print(f"failover, longest gap between acks:      {median([k['publishing_paused_s'] for k in kills]):>9.2f} s  "
          "(the publisher's pause: the election)")
    print(f"failover, read node's largest lag:       {median([k['read_node_max_lag'] for k in kills]):>9,.0f} events")
    print(f"failover, read node within 1,000 again: {median([k['read_node_back_s'] for k in kills]):>9.2f} s after the kill")
    print(f"projection on a read node (R3 stream):   {projector_rate:>9,.0f} events/s  ({total:,} events, "
          "ledger projector --until-idle, process start included)")
    print(f"raw projector ceiling, same cluster:     {ceiling:>9,.0f} events/s  (read node / ceiling = "
          f"{projector_rate / ceiling:.2f})")
    return 0


def _free_port() -> int:
    from ledger.nats.server import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
