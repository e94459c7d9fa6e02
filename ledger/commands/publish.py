"""Verbs that append to the stream: ``ledger emit``."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from ledger.commands.common import fail, json_option, nats_url_option

@click.command()
@click.argument("event", required=False)
@nats_url_option
@json_option
def emit(event: str | None, nats_url: str | None, as_json: bool) -> None:
    """Publish one event given as JSON (argument, or stdin) and print its stream sequence."""
    from ledger.publisher import Publisher
    from ledger.stream import DEFAULT_NATS_URL, connect

    payload = (event if event is not None else sys.stdin.read()).strip().encode()
    if not payload:
        fail("no event given: pass JSON as an argument or on stdin")

    async def go() -> int:
        nc = await connect(nats_url or DEFAULT_NATS_URL, reconnect=False)
        try:
            return await Publisher(nc).publish_json(payload)
        finally:
            await nc.close()

    seq = asyncio.run(go())
    print(json.dumps({"seq": seq}) if as_json else seq)


