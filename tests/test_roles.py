"""Roles and credentials (CONTRACT section 7): every role against every verb and the raw
JetStream actions that matter, on a real nats-server running ``ledger auth init``'s authorization."""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ledger.core import events as ev
from ledger.errors import CredentialsRefused, PermissionDenied
from ledger.nats.auth import ROLES, init_keys, key_path, read_auth_conf
from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import STREAM, connect, ensure_stream, on_denied, read_range, stream_config, stream_last_seq
from tests.jobs import ledger

AT = "2026-11-25T12:00:00Z"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("auth")
    init_keys(directory)
    return directory


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats-auth"), port=free_port(), auth=read_auth_conf(keys))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def admin(secured: EmbeddedNats, keys: Path) -> AsyncIterator[JetStreamContext]:
    """An admin connection on a fresh LEDGER stream holding one run and one sweep."""
    nc = await connect(secured.url, creds=str(key_path(keys, "admin")))
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await ensure_stream(js)
    pub = Publisher(nc)
    await pub.publish(ev.RunStarted(id="seed-1", at=AT, run_id="r0", sweep_id="s0"))  # type: ignore[arg-type]
    await pub.publish(ev.SweepCreated(id="seed-2", at=AT, sweep_id="s0"))  # type: ignore[arg-type]
    yield js
    await pub.close()
    await nc.close()


def _id() -> str:
    return uuid.uuid4().hex[:12]


def _run_started(nc: NATS) -> Awaitable[int]:
    return Publisher(nc).publish(ev.RunStarted(id=_id(), at=AT, run_id=f"r{_id()}"))  # type: ignore[arg-type]


def _run_crashed(nc: NATS) -> Awaitable[int]:
    return Publisher(nc).publish(ev.RunCrashed(id=_id(), at=AT, run_id="r0", reason="x"))  # type: ignore[arg-type]


def _run_killed(nc: NATS) -> Awaitable[int]:
    return Publisher(nc).publish(ev.RunKilled(id=_id(), at=AT, run_id="r0"))  # type: ignore[arg-type]


def _sweep_created(nc: NATS) -> Awaitable[int]:
    return Publisher(nc).publish(ev.SweepCreated(id=_id(), at=AT, sweep_id=f"s{_id()}"))  # type: ignore[arg-type]


def _sweep_finished(nc: NATS) -> Awaitable[int]:
    return Publisher(nc).publish(ev.SweepFinished(id=_id(), at=AT, sweep_id="s0"))  # type: ignore[arg-type]


async def _purge(nc: NATS) -> object:
    return await nc.jetstream().purge_stream(STREAM)


async def _delete_stream(nc: NATS) -> object:
    return await nc.jetstream().delete_stream(STREAM)


async def _delete_msg(nc: NATS) -> object:
    return await nc.jetstream().delete_msg(STREAM, 1)


async def _update_stream(nc: NATS) -> object:
    js = nc.jetstream()
    return await js.update_stream((await js.stream_info(STREAM)).config)


async def _create_stream(nc: NATS) -> object:
    return await nc.jetstream().add_stream(stream_config())  # it exists with this config: a no-op for a holder


async def _consumer(nc: NATS) -> object:
    js = nc.jetstream()
    info = await js.add_consumer(STREAM, api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, mem_storage=True,
                                                            filter_subject="ledger.run.r0.>"))
    return await js.delete_consumer(STREAM, info.name)


async def _durable(nc: NATS) -> object:
    js = nc.jetstream()
    await js.add_consumer(STREAM, api.ConsumerConfig(durable_name=f"d{_id()}", ack_policy=api.AckPolicy.EXPLICIT))
    return True


async def _read(nc: NATS) -> object:
    seen = [m.subject async for batch in read_range(nc.jetstream()) for m in batch]
    assert "ledger.run.r0.started" in seen
    return seen


async def _last_msg(nc: NATS) -> object:
    return await nc.jetstream().get_last_msg(STREAM, "ledger.run.r0.>")


async def _kill_watch(nc: NATS) -> object:
    """The kill watch's core subscription; a refusal arrives asynchronously, so it is waited for."""
    from tests.jobs import async_wait_until

    refusals: list[PermissionDenied] = []
    on_denied(nc, lambda subject, error: refusals.append(error))
    sub = await nc.subscribe("ledger.run.r0.killed")
    await nc.flush()
    if WATCH_REFUSED[0]:
        await async_wait_until(lambda: refusals, timeout=10, what="the refusal of the subscription")
    if refusals:
        raise refusals[0]
    return sub


WATCH_REFUSED: list[bool] = [False]
"""Whether the role under test must be refused the kill watch (then its refusal is waited for)."""


ACTIONS: dict[str, tuple[Callable[[NATS], Awaitable[object]], set[str], bool]] = {
    # action: (what it does, the roles allowed, whether it appends)
    "append run event": (_run_started, {"admin", "operator", "job"}, True),
    "append run.crashed": (_run_crashed, {"admin", "service", "operator", "job"}, True),
    "append run.killed": (_run_killed, {"admin", "service", "operator"}, True),
    "append sweep event": (_sweep_created, {"admin", "operator"}, True),
    "append sweep.finished": (_sweep_finished, {"admin", "service", "operator"}, True),
    "purge": (_purge, {"admin"}, False),
    "delete stream": (_delete_stream, {"admin"}, False),
    "delete message": (_delete_msg, {"admin"}, False),
    "update stream": (_update_stream, {"admin"}, False),
    "create stream": (_create_stream, {"admin", "service"}, False),
    "create and delete a consumer": (_consumer, set(ROLES), False),
    "create a durable consumer": (_durable, {"admin"}, False),
    "read messages": (_read, set(ROLES), False),
    "get the last message of a subject": (_last_msg, set(ROLES), False),
    "kill watch subscription": (_kill_watch, {"admin", "service", "operator", "job"}, False),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(ACTIONS))
async def test_raw_jetstream_matrix(admin: JetStreamContext, secured: EmbeddedNats, keys: Path, role: str,
                                    action: str) -> None:
    """Each role may do a raw JetStream action exactly where the role table says; a refusal appends nothing."""
    do, allowed, appends = ACTIONS[action]
    WATCH_REFUSED[0] = role not in allowed
    before = await stream_last_seq(admin)
    nc = await connect(secured.url, creds=str(key_path(keys, role)))
    try:
        if role in allowed:
            await do(nc)
            if action in ("purge", "delete stream"):
                return
            if appends:
                assert await stream_last_seq(admin) == before + 1
        else:
            with pytest.raises(PermissionDenied, match=r"^permission denied: \S"):
                async with asyncio_timeout(4):  # refused at once, not at a request's timeout
                    await do(nc)
                    raise AssertionError("no refusal")
            info = await admin.stream_info(STREAM)
            assert info.state.last_seq == before and info.state.messages >= 2  # nothing appended, nothing removed
    finally:
        await nc.close()


def asyncio_timeout(seconds: float) -> Any:
    import asyncio

    return asyncio.timeout(seconds)


async def test_no_key_or_a_wrong_key_is_refused(secured: EmbeddedNats, tmp_path: Path) -> None:
    """Without a key, or with a key the server does not know, connecting is CredentialsRefused in one line."""
    with pytest.raises(CredentialsRefused, match="refused the credentials"):
        await connect(secured.url)
    stranger = tmp_path / "stranger"
    init_keys(stranger)
    with pytest.raises(CredentialsRefused, match="refused the credentials"):
        await connect(secured.url, creds=str(key_path(stranger, "admin")))


def test_auth_init_keys_and_never_overwrites(tmp_path: Path) -> None:
    """`ledger auth init` writes one 0600 seed per role and auth.conf; again, it keeps every key unless --rotate."""
    directory = tmp_path / "auth"
    first = ledger("auth", "init", str(directory), "--json", env=dict(os.environ))
    assert first.returncode == 0, first.stderr
    assert {r: v["action"] for r, v in json.loads(first.stdout)["keys"].items()} == dict.fromkeys(ROLES, "created")
    seeds = {role: key_path(directory, role).read_bytes() for role in ROLES}
    for role in ROLES:
        assert stat.S_IMODE(key_path(directory, role).stat().st_mode) == 0o600
        assert seeds[role].startswith(b"SU")
    conf = (directory / "auth.conf").read_text()
    assert conf.count("nkey: U") == len(ROLES)
    again = ledger("auth", "init", str(directory), "--json", env=dict(os.environ))
    assert {r: v["action"] for r, v in json.loads(again.stdout)["keys"].items()} == dict.fromkeys(ROLES, "kept")
    assert {role: key_path(directory, role).read_bytes() for role in ROLES} == seeds
    rotated = ledger("auth", "init", str(directory), "--rotate", "job", "--json", env=dict(os.environ))
    assert json.loads(rotated.stdout)["keys"]["job"]["action"] == "rotated"
    assert key_path(directory, "job").read_bytes() != seeds["job"]
    assert key_path(directory, "admin").read_bytes() == seeds["admin"]
    assert (directory / "auth.conf").read_text() != conf


def _env(secured: EmbeddedNats, keys: Path, role: str | None, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update({"LEDGER_NATS_URL": secured.url, "LEDGER_SPOOL": str(tmp_path / "spool.db")})
    if role is not None:
        env["LEDGER_NATS_CREDS"] = str(key_path(keys, role))
    return env


def _event(kind: str, **fields: str) -> str:
    return json.dumps({"type": kind, "id": _id(), "at": AT, **fields})


VERBS: dict[str, tuple[Callable[[], list[str]], set[str]]] = {
    "emit run.started": (lambda: ["emit", _event("run.started", run_id=f"r{_id()}")], {"admin", "operator", "job"}),
    "emit sweep.created": (lambda: ["emit", _event("sweep.created", sweep_id=f"s{_id()}")], {"admin", "operator"}),
    "runs kill": (lambda: ["runs", "kill", "r0"], {"admin", "operator", "service"}),
    "sweep create": (lambda: ["sweep", "create", f"s{_id()}"], {"admin", "operator"}),
    "sweep cancel": (lambda: ["sweep", "cancel", "s0"], {"admin", "operator"}),
    "events export": (lambda: ["events", "export", "-o", "-"], set(ROLES)),
    "audit": (lambda: ["audit", "r0"], set(ROLES)),
    "run": (lambda: ["run", "--run-id", f"r{_id()}", "--", "true"], {"admin", "operator", "job"}),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("verb", list(VERBS))
async def test_verb_matrix(admin: JetStreamContext, secured: EmbeddedNats, keys: Path, tmp_path: Path,
                           role: str, verb: str) -> None:
    """Each role may run a `ledger` verb exactly where the role table says; a refusal is one line, exit 1,
    nothing appended."""
    args, allowed = VERBS[verb]
    before = await stream_last_seq(admin)
    done = ledger(*args(), env=_env(secured, keys, role, tmp_path))
    if role in allowed:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied: " in lines[0], done.stderr
    assert await stream_last_seq(admin) == before


async def test_import_is_admin_only(admin: JetStreamContext, secured: EmbeddedNats, keys: Path,
                                    tmp_path: Path) -> None:
    """`ledger events import` needs the admin key: an operator is refused before anything is appended."""
    export = tmp_path / "export.jsonl"
    done = ledger("events", "export", "-o", str(export), env=_env(secured, keys, "reader", tmp_path))
    assert done.returncode == 0, done.stderr
    before = await stream_last_seq(admin)
    refused = ledger("events", "import", str(export), "--append", env=_env(secured, keys, "operator", tmp_path))
    assert refused.returncode != 0 and "permission denied: update stream LEDGER" in refused.stderr
    assert await stream_last_seq(admin) == before
    allowed = ledger("events", "import", str(export), "--append", env=_env(secured, keys, "admin", tmp_path))
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("role", [None, "stranger"])
def test_verbs_without_the_right_key_say_so_in_one_line(secured: EmbeddedNats, keys: Path, tmp_path: Path,
                                                        role: str | None) -> None:
    """A verb with no key or an unknown key exits 1 with one line saying the server refused the credentials."""
    env = _env(secured, keys, None, tmp_path)
    if role == "stranger":
        init_keys(tmp_path / "other")
        env["LEDGER_NATS_CREDS"] = str(key_path(tmp_path / "other", "admin"))
    done = ledger("emit", _event("run.started", run_id="r9"), env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials" in lines[0], done.stderr


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", "x" * 200, "a.>", "a\tb"])
async def test_ids_that_escape_their_subject_never_reach_nats(admin: JetStreamContext, secured: EmbeddedNats,
                                                              keys: Path, tmp_path: Path, bad: str) -> None:
    """Run and sweep ids that would escape their subject are refused by the client before anything is sent."""
    before = await stream_last_seq(admin)
    env = _env(secured, keys, "operator", tmp_path)
    for args in (["emit", _event("run.started", run_id=bad)], ["emit", _event("sweep.created", sweep_id=bad)],
                 ["runs", "kill", bad], ["sweep", "cancel", bad], ["run", "--run-id", bad, "--", "true"]):
        done = ledger(*args, env=env)
        assert done.returncode != 0, args
        assert "permission denied" not in done.stderr, args  # refused by the client, not by the server
    assert await stream_last_seq(admin) == before


def test_ledger_run_passes_the_key_to_its_job(admin: JetStreamContext, secured: EmbeddedNats, keys: Path,
                                              tmp_path: Path) -> None:
    """`ledger run --nats-creds` hands its key and URL to the job, whose own client then publishes with it."""
    env = _env(secured, keys, None, tmp_path)
    script = "import os; print(os.environ['LEDGER_NATS_CREDS'])"
    done = ledger("run", "--nats-creds", str(key_path(keys, "job")), "--run-id", "rk", "--", "python3", "-c", script,
                  env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(str(key_path(keys, "job")))


def test_up_with_auth_beyond_loopback_needs_a_token(keys: Path, tmp_path: Path) -> None:
    """`ledger up --auth` with the HTTP API beyond loopback and no token refuses to start, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    done = ledger("up", "--auth", str(keys), "--data-dir", str(tmp_path / "d"), "--http", f"0.0.0.0:{free_port()}",
                  "--nats-port", str(free_port()), env=env)
    assert done.returncode == 1 and "needs a token" in done.stderr


def test_up_with_auth(keys: Path, tmp_path: Path) -> None:
    """`ledger up --auth DIR` runs its NATS with the roles: an operator's appends reach the views, a job's
    sweep command is refused, a client without a key is turned away."""
    from tests.jobs import Up, wait_until

    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    http = f"127.0.0.1:{free_port()}"
    env.update({"LEDGER_AUTH_DIR": str(keys), "LEDGER_DATA_DIR": str(tmp_path / "data"), "LEDGER_HTTP": http,
                "LEDGER_NATS_PORT": str(free_port())})
    running = Up([], env)
    try:
        client = {**env, "LEDGER_NATS_URL": str(running.info["nats"]), "LEDGER_SPOOL": str(tmp_path / "spool.db")}
        client.pop("LEDGER_AUTH_DIR")
        refused = ledger("emit", _event("run.started", run_id="r1"), env=client)
        assert refused.returncode == 1 and "refused the credentials" in refused.stderr
        op = {**client, "LEDGER_NATS_CREDS": str(key_path(keys, "operator"))}
        assert ledger("sweep", "create", "sq", env=op).returncode == 0
        assert ledger("emit", _event("run.started", run_id="rq", sweep_id="sq"), env=op).returncode == 0
        job = {**client, "LEDGER_NATS_CREDS": str(key_path(keys, "job"))}
        shown = ledger("runs", "list", "--json", env=job)
        assert shown.returncode == 0, shown.stderr
        wait_until(lambda: "rq" in ledger("runs", "list", "--json", env=job).stdout, what="the projector")
        pause = ledger("sweep", "pause", "sq", env=job)
        assert pause.returncode == 1 and "permission denied: append sweep.paused to sweep sq" in pause.stderr
    finally:
        running.stop()


async def test_python_client_takes_a_key(admin: JetStreamContext, secured: EmbeddedNats, keys: Path,
                                         tmp_path: Path) -> None:
    """The Python client publishes with the job key it is given; a run.killed it may not append is
    reported as refused and set aside, never appended."""
    from ledger.jobs.client import AsyncLedger

    said: list[str] = []
    before = await stream_last_seq(admin)
    client = await AsyncLedger.connect(secured.url, spool=tmp_path / "spool.db", creds=str(key_path(keys, "job")),
                                       report=said.append)
    try:
        await client.publish(ev.RunStarted(id=_id(), at=AT, run_id="rpy"), wait=10)  # type: ignore[arg-type]
        await client.publish(ev.RunKilled(id=_id(), at=AT, run_id="rpy"), wait=10)  # type: ignore[arg-type]
        assert await client.close(drain=10)
    finally:
        await client.close(drain=0)
    assert await stream_last_seq(admin) == before + 1
    assert any("permission denied: append run.killed to run rpy" in line for line in said), said
