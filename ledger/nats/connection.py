"""A NATS connection for job-side publishers that may start before NATS does.

nats-py reconnects by itself only after a first successful connect; this
keeps trying that first connect in the background, so a job started while
NATS is down goes on and its spool drains once NATS is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ledger.errors import StreamUnavailable
from ledger.nats.publisher import Publisher
from ledger.nats.stream import connect

Hook = Callable[[], Awaitable[None]]


class Connection:
    """The connection of one job-side process; ``publisher`` is None while NATS is unreachable."""

    def __init__(self, url: str, *, name: str = "run-ledger-job", retry_every: float = 1.0,
                 creds: str | None = None, ca: str | None = None) -> None:
        self.url = url
        self.name = name
        self.creds = creds  # the role's key file; None: $LEDGER_NATS_CREDS (connect() reads it)
        self.ca = ca
        self.retry_every = retry_every
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self._publisher: Publisher | None = None
        self._hooks: list[Hook] = []
        self.error: str | None = None

    @property
    def publisher(self) -> Publisher | None:
        nc = self.nc
        return self._publisher if nc is not None and nc.is_connected else None

    def on_connect(self, hook: Hook) -> None:
        """Call ``hook`` after every (re)connect, and now if connected."""
        self._hooks.append(hook)

    async def try_connect(self, timeout: float = 1.0) -> bool:
        if self.nc is not None:
            return self.nc.is_connected
        try:
            nc = await connect(self.url, name=self.name, timeout=timeout, reconnected_cb=self._reconnected,
                               creds=self.creds, ca=self.ca)
        except StreamUnavailable as exc:
            self.error = str(exc)
            return False
        self.nc, self.js = nc, nc.jetstream()
        self._publisher = Publisher(nc)
        self.error = None
        await self._reconnected()
        return True

    async def _reconnected(self) -> None:
        for hook in self._hooks:
            await hook()

    async def keep_trying(self) -> None:
        """Retry the first connect until it succeeds; nats-py does the rest."""
        while not await self.try_connect():
            await asyncio.sleep(self.retry_every)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection, waiting at most ``timeout`` s (a server that does not answer holds no job)."""
        nc, self.nc, self._publisher = self.nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                async with asyncio.timeout(timeout):
                    await nc.close()
            except Exception:  # closing a connection to a dead server: nothing to save
                pass
