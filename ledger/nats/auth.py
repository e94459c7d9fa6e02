"""Roles and credentials (CONTRACT section 7): one nkey per role, and the
nats-server authorization that gives each role exactly the subjects its work
needs.

The subjects come from what each client really sends:

- every reader of the stream: ``$JS.API.STREAM.INFO.LEDGER`` (``check_stream``),
  ``$JS.API.STREAM.MSG.GET.LEDGER`` / ``$JS.API.DIRECT.GET.LEDGER`` (``get_last_msg``:
  a job's start check and kill watch, expected-sequence appends), an ephemeral
  pull consumer (``$JS.API.CONSUMER.CREATE.LEDGER[.>]``, ``...MSG.NEXT.LEDGER.*``,
  ``...DELETE.LEDGER.*``: ``PullReader``, used by the start check, audit, as-of
  reads, export, replay, tail and the projector), its replies on ``_INBOX.>``;
- a job: its run events (``ledger.run.*.<event>``) but not ``run.killed``, and a
  core subscription on ``ledger.run.*.killed`` (the kill watch);
- an operator: a job's rights, sweep events and ``run.killed`` (``ledger sweep``,
  ``ledger runs kill``, ``ledger sweep next``'s ``run.initializing``);
- the service (``ledger up``): reads, the derived events of the monitor and the
  reactors (``run.crashed``, ``run.killed``, ``sweep.finished``), and
  ``$JS.API.STREAM.CREATE.LEDGER``; never update (its metadata holds the import
  marks, its limits could drop messages), purge or delete;
- an admin: everything (``>``): import (``update_stream``), purge, delete, compact.

NATS permissions cannot restrict a consumer's filter subject, so whoever may
read may read the whole stream: a job can read other runs' events, never write them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

from ledger.errors import LedgerError

ROLES: Final = ("admin", "service", "operator", "job", "reader")
AUTH_CONF: Final = "auth.conf"
"""The include file for nats-server.conf that ``ledger auth init`` writes next to the keys."""

_API: Final = "$JS.API"
READ_API: Final = (
    f"{_API}.INFO",
    f"{_API}.STREAM.INFO.LEDGER",
    f"{_API}.STREAM.MSG.GET.LEDGER",
    f"{_API}.DIRECT.GET.LEDGER",
    f"{_API}.DIRECT.GET.LEDGER.>",
    f"{_API}.CONSUMER.CREATE.LEDGER",
    f"{_API}.CONSUMER.CREATE.LEDGER.>",
    f"{_API}.CONSUMER.INFO.LEDGER.*",
    f"{_API}.CONSUMER.MSG.NEXT.LEDGER.*",
    f"{_API}.CONSUMER.DELETE.LEDGER.*",
)
"""The JetStream API requests of every reader of the stream (ephemeral consumers, message gets, info)."""
ADMIN_API: Final = (
    f"{_API}.STREAM.UPDATE.>",
    f"{_API}.STREAM.PURGE.>",
    f"{_API}.STREAM.DELETE.>",
    f"{_API}.STREAM.MSG.DELETE.>",
    f"{_API}.CONSUMER.DURABLE.CREATE.>",
    f"{_API}.STREAM.RESTORE.>",
    f"{_API}.STREAM.SNAPSHOT.>",
)
"""Stream administration: refused (explicit deny) to every role but ``admin``."""
INBOX: Final = "_INBOX.>"
KILLED: Final = "ledger.run.*.killed"


class Permissions(msgspec.Struct, frozen=True):
    """One role's publish and subscribe allow/deny lists, as nats-server reads them."""

    publish_allow: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()


_JOB_PUB: Final = (*READ_API, "ledger.run.>")
PERMISSIONS: Final[dict[str, Permissions]] = {
    "admin": Permissions(publish_allow=(">",), subscribe_allow=(">",)),
    "service": Permissions(
        publish_allow=(*READ_API, f"{_API}.STREAM.CREATE.LEDGER",
                       "ledger.run.*.crashed", KILLED, "ledger.sweep.*.finished"),
        subscribe_allow=(INBOX, "ledger.>"),
        publish_deny=ADMIN_API),
    "operator": Permissions(
        publish_allow=(*_JOB_PUB, "ledger.sweep.>"),
        subscribe_allow=(INBOX, KILLED),
        publish_deny=ADMIN_API),
    "job": Permissions(
        publish_allow=_JOB_PUB,
        subscribe_allow=(INBOX, KILLED),
        publish_deny=(*ADMIN_API, KILLED, "ledger.sweep.>")),
    "reader": Permissions(
        publish_allow=READ_API,
        subscribe_allow=(INBOX,),
        publish_deny=(*ADMIN_API, "ledger.>")),
}
"""The role table of CONTRACT section 7, in subjects."""


def key_path(directory: Path, role: str) -> Path:
    return Path(directory) / f"{role}.nk"


def public_key(seed: bytes) -> str:
    """The public nkey (``U...``) of a user seed (``SU...``)."""
    import nkeys  # type: ignore[import-untyped]

    try:
        kp = nkeys.from_seed(bytearray(seed.strip()))
    except Exception as exc:  # nkeys raises its own types for a bad seed
        raise LedgerError(f"not an nkey user seed: {exc or type(exc).__name__}") from exc
    return str(kp.public_key.decode())


def new_seed() -> bytes:
    """A fresh user nkey seed (``SU...``)."""
    import nacl.signing
    import nkeys  # type: ignore[import-untyped]

    raw = bytes(nacl.signing.SigningKey.generate())
    return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER))


def _write_key(path: Path, seed: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(seed + b"\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def authorization_conf(public_keys: dict[str, str]) -> str:
    """The ``authorization { users = [...] }`` block for these roles' public keys."""
    lines = ["# run-ledger roles (CONTRACT section 7), written by `ledger auth init`.",
             "# Include it in nats-server.conf:  include ./auth.conf", "authorization {", "  users = ["]
    for role in ROLES:
        if role not in public_keys:
            continue
        perm = PERMISSIONS[role]
        pub = f"allow: {_quoted(perm.publish_allow)}" + (f", deny: {_quoted(perm.publish_deny)}" if perm.publish_deny else "")
        sub = f"allow: {_quoted(perm.subscribe_allow)}" + (f", deny: {_quoted(perm.subscribe_deny)}" if perm.subscribe_deny else "")
        lines += [f"    # {role}",
                  f"    {{ nkey: {public_keys[role]}, permissions: {{",
                  f"        publish: {{ {pub} }},",
                  f"        subscribe: {{ {sub} }} }} }}"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def init_keys(directory: Path, *, rotate: tuple[str, ...] = ()) -> dict[str, str]:
    """Create the missing role keys in ``directory`` (and replace those in ``rotate``); write ``auth.conf``.

    An existing key is never replaced unless its role is named in ``rotate``.
    Returns role -> what happened (``created``, ``kept``, ``rotated``).
    """
    unknown = [r for r in rotate if r not in ROLES]
    if unknown:
        raise LedgerError(f"unknown role {unknown[0]!r}: roles are {', '.join(ROLES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    done: dict[str, str] = {}
    publics: dict[str, str] = {}
    for role in ROLES:
        path = key_path(directory, role)
        if path.exists() and role not in rotate:
            seed = path.read_bytes()
            done[role] = "kept"
        else:
            done[role] = "rotated" if path.exists() else "created"
            seed = new_seed()
            _write_key(path, seed)
        publics[role] = public_key(seed)
    conf = directory / AUTH_CONF
    tmp = conf.with_name(conf.name + ".tmp")
    tmp.write_text(authorization_conf(publics))
    os.replace(tmp, conf)
    return done


def read_auth_conf(directory: Path) -> str:
    """The authorization include written by ``ledger auth init`` in ``directory`` (LedgerError if missing)."""
    conf = Path(directory) / AUTH_CONF
    if not conf.exists():
        raise LedgerError(f"{conf} does not exist: run `ledger auth init {directory}` first")
    return conf.read_text()


def is_jwt_creds(text: str) -> bool:
    """Whether a credentials file is a decorated JWT ``.creds`` file (else: a bare nkey seed)."""
    return "BEGIN NATS USER JWT" in text
