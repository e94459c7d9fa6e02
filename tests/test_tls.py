"""TLS between clients and the NATS server (CONTRACT section 7): a CA and certificates made by the
test itself, a real nats-server with TLS and the roles, clients on ``tls://`` with ``--nats-ca``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ledger.core import events as ev
from ledger.errors import StreamUnavailable
from ledger.nats.auth import init_keys, key_path, read_auth_conf
from ledger.nats.publisher import Publisher
from ledger.nats.server import EmbeddedNats, free_port
from ledger.nats.stream import connect, ensure_stream, read_range
from tests.jobs import ledger


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``hosts`` signed by it: (ca.pem, server.pem, server-key.pem)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("ledger test CA")).issuer_name(_name("ledger test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path_ = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path_.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return ca_path, cert_path, key_path_


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedNats, Path, Path]]:
    """A nats-server with TLS and the roles: (server, CA file, auth dir)."""
    base = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca(base / "pki")
    init_keys(base / "auth")
    server = EmbeddedNats(base / "nats", port=free_port(), auth=read_auth_conf(base / "auth"), tls=(cert, key))
    server.start()
    yield server, ca, base / "auth"
    server.stop()


async def test_tls_url_with_the_test_ca(tls_server: tuple[EmbeddedNats, Path, Path]) -> None:
    """A client on tls:// that trusts the test CA appends and reads back over TLS with its role key."""
    server, ca, keys = tls_server
    assert server.url.startswith("tls://")
    nc = await connect(server.url, creds=str(key_path(keys, "service")), ca=str(ca))
    try:
        assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        js = nc.jetstream()
        await ensure_stream(js)
        pub = Publisher(nc)
        seq = await pub.publish(ev.RunCrashed(id="tls-1", at="2026-11-25T12:00:00Z", run_id="rt", reason="x"))  # type: ignore[arg-type]
        seen = [m.seq async for batch in read_range(js, subject="ledger.run.rt.>") for m in batch]
        assert seen == [seq]
        await pub.close()
    finally:
        await nc.close()


async def test_a_server_the_ca_does_not_vouch_for_is_refused(tls_server: tuple[EmbeddedNats, Path, Path],
                                                            tmp_path: Path) -> None:
    """A client whose CA did not sign the server's certificate does not connect (one line)."""
    server, _, keys = tls_server
    other_ca, _, _ = make_ca(tmp_path / "other")
    with pytest.raises(StreamUnavailable, match="cannot connect to NATS"):
        await connect(server.url, creds=str(key_path(keys, "admin")), ca=str(other_ca))


def test_cli_over_tls(tls_server: tuple[EmbeddedNats, Path, Path], tmp_path: Path) -> None:
    """`ledger emit` on a tls:// URL with --nats-ca and --nats-creds appends; without the CA it says why."""
    server, ca, keys = tls_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_NATS_URL"] = server.url
    event = '{"type":"run.started","id":"tls-cli","at":"2026-11-25T12:00:00Z","run_id":"rtc"}'
    done = ledger("emit", "--nats-ca", str(ca), "--nats-creds", str(key_path(keys, "job")), event, env=env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0
    refused = ledger("emit", "--nats-creds", str(key_path(keys, "job")), event, env=env)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "cannot connect to NATS" in refused.stderr


@pytest.mark.parametrize("name", ["nats-server.conf", "nats-cluster.conf"])
def test_deploy_configs_are_valid_for_nats_server(tmp_path: Path, name: str) -> None:
    """deploy/'s NATS configs (roles and TLS, for clients and cluster routes) pass `nats-server -t`."""
    import subprocess

    from ledger.nats.server import nats_server_binary

    etc = tmp_path / "etc"
    make_ca(etc / "tls")
    init_keys(etc / "auth")
    text = (Path(__file__).parent.parent / "deploy" / name).read_text()
    assert "include ./auth/auth.conf" in text and "tls {" in text
    if name == "nats-cluster.conf":
        assert text.count("tls {") == 2 and "tls://" in text
    conf = etc / name
    conf.write_text(text.replace("/etc/run-ledger", str(etc)).replace("/var/lib/run-ledger", str(tmp_path / "var")))
    done = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
