"""Security against a real server: policies and modes, trust, expiry, passwords; certificates
and browse from the command line."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos import plugins
from edgeos.cli import app
from edgeos.config import load_config
from edgeos.errors import ConfigError, DeviceError

GATEWAY = '[gateway]\nid = "gw"\ndata_dir = "data"\n'
NS = "urn:edgeos:test:sec"
POLICIES = ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SERVER_POLICIES = [
    f"{p}_{m}"
    for p in ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss")
    for m in ("Sign", "SignAndEncrypt")
]
VARS = [
    {"ns": NS, "id": "s=Speed", "name": "Speed", "type": "Double", "value": 12.5, "folder": "Line1", "unit": "m/s"},
    {"ns": NS, "id": "s=Count", "name": "Count", "type": "Int32", "value": 3, "folder": "Line1", "writable": True},
    {"ns": NS, "id": "s=Running", "name": "Running", "type": "Boolean", "value": True, "folder": "Line1"},
    {"ns": NS, "id": "s=Recipe", "name": "Recipe", "type": "String", "value": "A7", "folder": "Line1"},
    {"ns": NS, "id": "s=Pair", "name": "Pair", "type": "Double", "value": 1.0, "folder": "Line1", "array": True},
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from edgeos.protocols.opcua.client import make_certificate

    d = tmp_path_factory.mktemp("pki")
    make_certificate(d / "server.der", d / "server.pem", "urn:edgeos:test:server", "localhost", server=True)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    make_certificate(
        d / "old.der", d / "old.pem", "urn:edgeos:test:server", "localhost", server=True, days=2, not_before=old
    )
    r = CliRunner().invoke(app, ["opcua", "cert", "--out-dir", str(d / "gw"), "--application-uri", "urn:edgeos:gw1"])
    assert r.exit_code == 0, r.output
    return d


def secure_device(endpoint, pki: Path, trust: Path, mode: str, policy: str, extra: str = "") -> str:
    return f"""
[[devices]]
name = "plc"
protocol = "opcua"
endpoint = "{endpoint}"
security_mode = "{mode}"
security_policy = "{policy}"
certificate = "{pki / "gw" / "cert.der"}"
private_key = "{pki / "gw" / "key.pem"}"
trust_dir = "{trust}"
mode = "poll"
poll_interval = "100ms"
{extra}
tags = [{{ name = "speed", node = "nsu={NS};s=Speed" }}]
"""


async def read_once(dev) -> float:
    adapter = plugins.load(plugins.PROTOCOLS, "opcua").create(dev)
    await adapter.connect()
    try:
        b = await adapter.read(adapter.poll_groups()[0], 0)
        return float(b.values[0])
    finally:
        await adapter.close()


def test_cert_makes_a_key_only_its_owner_reads_and_puts_the_uri_in_the_san(pki) -> None:
    from edgeos.protocols.opcua.client import application_uri_of

    assert stat.S_IMODE(os.stat(pki / "gw" / "key.pem").st_mode) == 0o600
    assert application_uri_of(pki / "gw" / "cert.der") == "urn:edgeos:gw1"


async def test_every_policy_and_mode_after_trusting_the_server_with_the_command_given(
    opcua_peer, pki, tmp_path, write_config
) -> None:
    sec = {"policies": SERVER_POLICIES, "cert": str(pki / "server.der"), "key": str(pki / "server.pem")}
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
    trust = tmp_path / "trust"
    dev = load_config(write_config(GATEWAY + secure_device(peer.endpoint, pki, trust, "Sign", POLICIES[0]))).devices[0]
    with pytest.raises(DeviceError) as info:
        await read_once(dev)
    msg = str(info.value)
    assert info.value.code == "untrusted" and "not trusted" in msg
    command = msg.split("trust it with: ")[1].split()
    assert command[:3] == ["edgeos", "opcua", "trust"] and await asyncio.to_thread(os.path.isfile, command[3])
    r = CliRunner().invoke(app, command[1:])
    assert r.exit_code == 0, r.output
    for policy in POLICIES:
        for mode in ("Sign", "SignAndEncrypt"):
            body = secure_device(peer.endpoint, pki, trust, mode, policy)
            dev = load_config(write_config(GATEWAY + body, name=f"{policy}-{mode}.toml")).devices[0]
            assert await read_once(dev) == 12.5, (policy, mode)
    r = CliRunner().invoke(app, ["check", str(write_config(GATEWAY + body, name="check.toml"))])
    assert r.exit_code == 0, r.output
    assert f"opcua {peer.endpoint}: SignAndEncrypt Aes256_Sha256_RsaPss, anonymous" in r.output
    assert f"certificate {pki / 'gw' / 'cert.der'} expires " in r.output


async def test_an_expired_server_certificate_is_refused_even_when_trusted(opcua_peer, pki, tmp_path, write_config):
    from edgeos.protocols.opcua.client import trust_certificate

    sec = {"policies": ["Basic256Sha256_SignAndEncrypt"], "cert": str(pki / "old.der"), "key": str(pki / "old.pem")}
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
    trust = tmp_path / "trust"
    trust_certificate(pki / "old.der", trust)
    body = secure_device(peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256")
    dev = load_config(write_config(GATEWAY + body)).devices[0]
    with pytest.raises(DeviceError) as info:
        await read_once(dev)
    assert info.value.code == "expired" and "not now" in str(info.value)


async def test_a_right_password_connects_and_a_wrong_one_is_refused(
    opcua_peer, pki, tmp_path, write_config, monkeypatch
) -> None:
    from edgeos.protocols.opcua.client import trust_certificate

    sec = {
        "policies": ["Basic256Sha256_SignAndEncrypt"],
        "cert": str(pki / "server.der"),
        "key": str(pki / "server.pem"),
    }
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec, "users": {"operator": "s3cret"}})
    trust = tmp_path / "trust"
    trust_certificate(pki / "server.der", trust)
    body = secure_device(
        peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256", 'username = "operator"\npassword_env = "PLC_PW"'
    )
    monkeypatch.setenv("PLC_PW", "s3cret")
    dev = load_config(write_config(GATEWAY + body)).devices[0]
    assert await read_once(dev) == 12.5
    monkeypatch.setenv("PLC_PW", "wrong")
    with pytest.raises(DeviceError) as info:
        await read_once(dev)
    assert "connect" in str(info.value)
    # The status alone names neither the user nor where its password comes from.
    assert "(user 'operator': check the password in $PLC_PW)" in str(info.value), info.value
    assert "wrong" not in str(info.value)


async def test_an_x509_user_identity_is_accepted_and_another_refused(opcua_peer, pki, tmp_path, write_config) -> None:
    from edgeos.protocols.opcua.client import make_certificate, trust_certificate

    make_certificate(pki / "alice.der", pki / "alice.pem", "urn:edgeos:user:alice", "localhost", common_name="alice")
    sec = {
        "policies": ["Basic256Sha256_SignAndEncrypt"],
        "cert": str(pki / "server.der"),
        "key": str(pki / "server.pem"),
    }
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec, "user_cert": str(pki / "alice.der")})
    trust = tmp_path / "trust"
    trust_certificate(pki / "server.der", trust)
    for user, ok in (("alice", True), ("server", False)):
        extra = f'user_certificate = "{pki / (user + ".der")}"\nuser_private_key = "{pki / (user + ".pem")}"'
        body = secure_device(peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256", extra)
        dev = load_config(write_config(GATEWAY + body, name=f"{user}.toml")).devices[0]
        if ok:
            assert await read_once(dev) == 12.5
        else:
            with pytest.raises(DeviceError, match="BadUserAccessDenied|Bad") as info:
                await read_once(dev)
            assert f"(user certificate {pki / 'server.der'}: the server must accept it" in str(info.value)


def test_none_is_refused_unless_said_and_deprecated_policies_unless_allowed(write_config, pki) -> None:
    body = '[[devices]]\nname = "plc"\nprotocol = "opcua"\nendpoint = "opc.tcp://127.0.0.1:4840"\n'
    body += f'tags = [{{ name = "a", node = "nsu={NS};s=A" }}]\n'
    with pytest.raises(ConfigError, match='security_mode: missing: .*"None" to connect without any security'):
        load_config(write_config(GATEWAY + body))
    dep = secure_device("opc.tcp://127.0.0.1:4840", pki, pki / "t", "Sign", "Basic256")
    with pytest.raises(ConfigError, match="deprecated policy"):
        load_config(write_config(GATEWAY + dep))
    load_config(write_config(GATEWAY + dep.replace('mode = "poll"', 'mode = "poll"\nallow_deprecated = true')))


def test_browse_writes_a_tags_csv_that_check_accepts(opcua_peer, write_config, tmp_path) -> None:
    peer = opcua_peer({"namespaces": ["urn:other", NS], "vars": VARS})
    out = tmp_path / "tags.csv"
    r = CliRunner().invoke(app, ["browse", peer.endpoint, "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"Line1.Speed", "Line1.Count", "Line1.Running", "Line1.Recipe"}, rows  # the array is skipped
    assert rows["Line1.Speed"]["node"] == f"nsu={NS};s=Speed" and rows["Line1.Speed"]["unit"] == "m/s"
    assert rows["Line1.Count"]["writable"] == "true" and rows["Line1.Speed"]["writable"] == "false"
    assert rows["Line1.Running"]["type"] == "bool" and rows["Line1.Recipe"]["type"] == "string"
    cfg = write_config(
        GATEWAY
        + f'[[devices]]\nname = "plc"\nprotocol = "opcua"\nendpoint = "{peer.endpoint}"\n'
        + 'security_mode = "None"\ntags_csv = "tags.csv"\n'
    )
    r = CliRunner().invoke(app, ["check", str(cfg)])
    assert r.exit_code == 0, r.output
    assert f"opcua {peer.endpoint}: no security, anonymous" in r.output
    assert "subscribe: 4 monitored items" in r.output


async def test_a_server_that_does_not_trust_the_gateway_says_which_certificate(
    opcua_peer, pki, tmp_path, write_config
) -> None:
    """The server's BadCertificateUntrusted names no certificate: the error names the gateway's."""
    from edgeos.protocols.opcua.client import trust_certificate

    (tmp_path / "clients").mkdir()
    sec = {
        "policies": ["Basic256Sha256_SignAndEncrypt"],
        "cert": str(pki / "server.der"),
        "key": str(pki / "server.pem"),
        "trusted_clients": str(tmp_path / "clients"),
    }
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
    trust = tmp_path / "trust"
    trust_certificate(pki / "server.der", trust)
    body = secure_device(peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256")
    dev = load_config(write_config(GATEWAY + body)).devices[0]
    with pytest.raises(DeviceError) as info:
        await read_once(dev)
    mine = pki / "gw" / "cert.der"
    assert f"the server does not trust the gateway's certificate {mine}" in str(info.value), info.value


def _cert_without_uri(cert: Path, key: Path) -> None:
    """A valid client certificate whose subjectAltName names only a host, no ApplicationUri."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nouri")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(k, hashes.SHA256())
    )
    cert.write_bytes(c.public_bytes(serialization.Encoding.DER))
    key.write_bytes(
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


async def test_a_gateway_certificate_without_an_application_uri_is_named(opcua_peer, pki, tmp_path, write_config):
    """An independent tester's finding: with no URI in the certificate, asyncua's default (another
    product's) was sent as the session's ApplicationUri, which a server checks against the
    certificate (Part 4 5.6.2: Bad_CertificateUriInvalid); edgeos check said nothing."""
    from edgeos.protocols.opcua.client import trust_certificate

    sec = {"policies": ["Basic256Sha256_SignAndEncrypt"], "cert": str(pki / "server.der")}
    sec["key"] = str(pki / "server.pem")
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
    trust = tmp_path / "trust"
    trust_certificate(pki / "server.der", trust)
    (tmp_path / "nouri").mkdir()
    _cert_without_uri(tmp_path / "nouri" / "cert.der", tmp_path / "nouri" / "key.pem")
    body = secure_device(peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256")
    body = body.replace(str(pki / "gw"), str(tmp_path / "nouri"))
    cfg = write_config(GATEWAY + body)
    with pytest.raises(DeviceError) as info:
        await read_once(load_config(cfg).devices[0])
    assert info.value.code == "certificate" and "names no ApplicationUri" in str(info.value), info.value
    r = CliRunner().invoke(app, ["check", str(cfg)])
    assert "names no ApplicationUri" in r.output and "edgeos opcua cert" in r.output, r.output


async def test_security_none_against_a_secure_only_server_names_what_it_offers(opcua_peer, pki, write_config):
    """An independent tester's finding: asyncua's "No matching endpoints: 1, http://..." named
    neither side; now as the other mismatches."""
    sec = {"policies": ["Basic256Sha256_SignAndEncrypt"], "cert": str(pki / "server.der")}
    sec["key"] = str(pki / "server.pem")
    peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
    body = f"""
[[devices]]
name = "plc"
protocol = "opcua"
endpoint = "{peer.endpoint}"
security_mode = "None"
mode = "poll"
tags = [{{ name = "speed", node = "nsu={NS};s=Speed" }}]
"""
    with pytest.raises(DeviceError) as info:
        await read_once(load_config(write_config(GATEWAY + body)).devices[0])
    msg = str(info.value)
    assert info.value.code == "security", msg
    assert "offers no endpoint with None; it offers: SignAndEncrypt/Basic256Sha256" in msg, msg


async def test_a_server_certificate_of_another_application_is_warned_about(
    opcua_peer, pki, tmp_path, write_config, caplog
) -> None:
    """Part 4 6.1.3: the server's certificate names its ApplicationUri. Trusted by the operator,
    a mismatch is not refused, but said (an independent tester's finding: nothing was)."""
    from edgeos.protocols.opcua.client import trust_certificate

    trust = tmp_path / "trust"
    trust_certificate(pki / "server.der", trust)
    for server_uri, warned in (("urn:edgeos:test:server", False), ("urn:someone:else", True)):
        sec = {
            "policies": ["Basic256Sha256_SignAndEncrypt"],
            "cert": str(pki / "server.der"),
            "key": str(pki / "server.pem"),
            "application_uri": server_uri,
        }
        peer = opcua_peer({"namespaces": [NS], "vars": VARS, "security": sec})
        body = secure_device(peer.endpoint, pki, trust, "SignAndEncrypt", "Basic256Sha256")
        caplog.clear()
        assert await read_once(load_config(write_config(GATEWAY + body)).devices[0]) == 12.5
        said = [r.getMessage() for r in caplog.records if "names ApplicationUri" in r.getMessage()]
        assert bool(said) == warned, (server_uri, said)
        if warned:
            assert "urn:edgeos:test:server" in said[0] and server_uri in said[0]
