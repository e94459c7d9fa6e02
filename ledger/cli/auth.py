"""``ledger auth init DIR``: one NATS nkey per role and the server's authorization for them (CONTRACT section 7)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ledger.cli.common import console, json_option


@click.group()
def auth() -> None:
    """Roles and credentials: the NATS keys of admin, service, operator, job and reader."""


@auth.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rotate", multiple=True, metavar="ROLE",
              help="Replace this role's key with a new one (repeatable); every other existing key is kept.")
@json_option
def init(directory: Path, rotate: tuple[str, ...], as_json: bool) -> None:
    """Write DIR/<role>.nk (the seed, mode 0600) for each role that has none, and DIR/auth.conf.

    auth.conf is the include file for nats-server.conf: the roles' public keys
    with their publish/subscribe permissions. Existing keys are never replaced,
    except those named by --rotate; then reload the server (`nats-server
    --signal reload`, or restart `ledger up --auth DIR`) and hand out the new key.
    """
    from ledger.nats.auth import AUTH_CONF, init_keys, key_path

    done = init_keys(directory, rotate=rotate)
    if as_json:
        print(json.dumps({"keys": {role: {"path": str(key_path(directory, role)), "action": action}
                                   for role, action in done.items()},
                          "auth_conf": str(directory / AUTH_CONF)}))
        return
    for role, action in done.items():
        console.print(f"{role:9} {key_path(directory, role)}  {action}", highlight=False)
    console.print(f"authorization: {directory / AUTH_CONF}  (include it in nats-server.conf, "
                  f"or run `ledger up --auth {directory}`)", highlight=False)
