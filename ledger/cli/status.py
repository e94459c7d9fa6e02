"""``ledger status``: the cluster as this node sees it (contract section 6).

The NATS server it reached and the cluster's nodes, the ``LEDGER`` stream's
leader and each replica (``current`` or behind, by how much), and, from this
node's ``ledger up`` (``--http``), how far its views are behind the stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any

import click

from ledger.cli.common import console, http_option, json_option, nats_url_option, nats_url_or_default, print_json


@click.command()
@nats_url_option
@http_option
@json_option
def status(nats_url: str | None, http: str, as_json: bool) -> None:
    """The cluster's nodes, the stream's leader and replicas with their lag, and this node's projection lag."""
    from ledger.nats.stream import connect
    from ledger.nats.topology import cluster_status

    url = nats_url_or_default(nats_url)

    async def go() -> dict[str, Any]:
        nc = await connect(url, reconnect=False)
        try:
            return await cluster_status(nc.jetstream())
        finally:
            await nc.close()

    found = asyncio.run(go())
    found["projection"] = _projection(http)
    if as_json:
        print_json(found)
        return
    _print(found, http)


def _projection(http: str) -> dict[str, Any] | None:
    """This node's ``/health`` (its status and lag), whether ok or degraded; None when no ``ledger up`` answers."""
    token = os.environ.get("LEDGER_HTTP_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://{http}/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: degraded, with the same body
        try:
            body = json.loads(exc.read())
        except ValueError:
            return None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    keep = ("status", "last_seq", "stream_last_seq", "lag", "reason")
    return {key: body[key] for key in keep if key in body}


def _print(found: dict[str, Any], http: str) -> None:
    stream = found["stream"]
    where = f"cluster {found['cluster']}" if found["cluster"] else "a single server"
    console.print(f"NATS: connected to [bold]{found['server']}[/] ({where}); nodes {', '.join(found['nodes'])}",
                  highlight=False)
    console.print(f"stream {stream['name']}: {stream['replicas']} replica(s), last seq {stream['last_seq']}, "
                  f"leader [bold]{stream['leader'] or 'none (an election is under way)'}[/]", highlight=False)
    for peer in stream["peers"]:
        state = "[green]current[/]" if peer["current"] else "[yellow]behind[/]"
        offline = "  [red]offline[/]" if peer["offline"] else ""
        console.print(f"  {peer['name']:<12} {peer['role']:<8} {state}  lag {peer['lag']}{offline}", highlight=False)
    proj = found["projection"]
    if proj is None:
        console.print(f"views: no ledger up answers at http://{http}", highlight=False)
        return
    reason = f" ({proj['reason']})" if proj.get("reason") else ""
    console.print(f"views (http://{http}): {proj['status']}{reason}, last seq {proj['last_seq']}, lag {proj['lag']}",
                  highlight=False)
