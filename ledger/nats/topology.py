"""What the NATS side of a ledger looks like from here: the server this
process is connected to, the cluster's nodes, and the ``LEDGER`` stream's
Raft leader and replicas (each ``current`` or not, and how far behind), for
``ledger status`` and ``/health`` (contract section 6).

Only ``stream_info`` and the connection's own INFO are read: no system
account is needed.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext

from ledger.nats.stream import STREAM


def nodes_of(js: JetStreamContext) -> list[str]:
    """The cluster's client URLs this connection knows: those it was given and those the cluster announces."""
    nc = js._nc
    urls = {f"{u.hostname}:{u.port}" for u in nc.servers if u.hostname}
    urls.update((nc._server_info or {}).get("connect_urls") or [])
    return sorted(urls)


async def cluster_status(js: JetStreamContext, name: str = STREAM) -> dict[str, Any]:
    """The connected server, the cluster's nodes, and the stream's leader and replicas.

    ``stream.peers``: one entry per replica, the leader first, each with
    ``current`` (caught up with the leader), ``lag`` (operations behind),
    ``offline`` and ``active_s`` (seconds since the leader last heard from it).
    """
    info = js._nc._server_info or {}
    stream = await js.stream_info(name)
    peers: list[dict[str, Any]] = []
    cluster = stream.cluster
    if cluster is not None and cluster.leader:
        peers.append({"name": cluster.leader, "role": "leader", "current": True, "lag": 0, "offline": False,
                      "active_s": 0.0})
    for peer in (cluster.replicas or []) if cluster is not None else []:
        peers.append({"name": peer.name, "role": "replica", "current": bool(peer.current), "lag": int(peer.lag or 0),
                      "offline": bool(peer.offline), "active_s": round((peer.active or 0) / 1e9, 3)})
    return {
        "server": info.get("server_name") or info.get("server_id"),
        "cluster": info.get("cluster"),
        "nodes": nodes_of(js),
        "stream": {
            "name": name,
            "replicas": int(stream.config.num_replicas or 1),
            "last_seq": int(stream.state.last_seq),
            "leader": cluster.leader if cluster is not None else info.get("server_name"),
            "peers": peers,
        },
    }
