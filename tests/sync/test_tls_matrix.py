"""MQTT TLS negative matrix against a real mosquitto: each misconfiguration is refused with an
error that names its cause, the correct variant beside it connects (the negative control), and
data kept locally during a refusal is delivered once the config is fixed.

Certificates are made here with `cryptography` (an expired one cannot be made with `openssl req`
in one step): a CA, a second CA nobody trusts, server certificates for 127.0.0.1, for another
name and an expired one, and client certificates from either CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import sqlite3
import textwrap
from pathlib import Path

import aiomqtt
import pytest

from edgeos.config import load_config
from edgeos.errors import SyncError
from edgeos.runtime import Runtime
from edgeos.sync import mqtt

x509 = pytest.importorskip("cryptography.x509")  # a dependency of asyncua (the [opcua] extra, in [test])
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

# -- a small PKI -------------------------------------------------------------------------------


def _write(base: Path, cert, key) -> None:
    base.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k = base.with_suffix(".key")
    k.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    k.chmod(0o600)


def make_ca(d: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeos test {name}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(d / name, cert, key)
    return cert, key


def make_leaf(d: Path, name: str, issuer, *, san: str = "127.0.0.1", days=(-1, 30), client: bool = False) -> None:
    icert, ikey = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    try:
        alt = x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        alt = x509.DNSName(san)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(icert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False)
        .sign(ikey, hashes.SHA256())
    )
    _write(d / name, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "ca"), make_ca(d, "other")
    make_leaf(d, "server", ca)
    make_leaf(d, "wronghost", ca, san="broker.example")
    make_leaf(d, "expired", ca, days=(-10, -2))
    make_leaf(d, "client", ca, client=True)
    make_leaf(d, "rogue", other, client=True)
    (d / "pw-right").write_text("right\n")
    (d / "pw-wrong").write_text("wrong\n")
    for p in d.glob("pw-*"):
        p.chmod(0o600)
    return d


@pytest.fixture
def tls_broker(make_broker, pki):
    """The suite's mosquitto with a TLS listener (server certificate `server`), optionally
    requiring a client certificate of the CA."""

    def make(server: str = "server", *, require_cert: bool = False, **kw):
        b = make_broker(tls={"ca": pki / "ca.pem", "cert": pki / f"{server}.pem", "key": pki / f"{server}.key"}, **kw)
        if require_cert:
            b.stop()
            plain = b._config

            def config() -> Path:
                conf = plain()
                conf.write_text(conf.read_text() + "require_certificate true\n")
                return conf

            b._config = config
            b.start()
        return b

    return make


async def attempt(pki: Path, broker, **options) -> str | None:
    """One session of the real transport: None when it connected and a publish was acknowledged,
    else the SyncError's text."""
    opts = {"host": "127.0.0.1", "port": broker.port, "status_topic": "edgeos/gw/status", "tls": True, **options}
    t = mqtt.MqttTransport("gw", opts, pki)
    try:
        async with t.session() as s:
            await s.publish("edgeos/gw/probe", b"x")
    except SyncError as e:
        return str(e)
    return None


CAUSES = {
    "wrong_ca": "not signed by the CA of ca_file",
    "hostname": "not issued for this host name",
    "expired": "it has expired",
    "untrusted_client": "rejected this gateway's client certificate",
    "no_client_cert": "requires a client certificate",
    "bad_password": "refused the credentials",
}


def assert_names_only(cause: str, error: str | None) -> None:
    assert error is not None, f"{cause}: connected"
    assert CAUSES[cause] in error, error
    others = [c for k, c in CAUSES.items() if k != cause and c in error]
    assert not others, f"{cause} reported as {others}: {error}"


@pytest.fixture
def quick_connect(monkeypatch):
    # A broker that drops a rejected client certificate after the handshake (TLS 1.3) sends no
    # CONNACK: the transport waits CONNECT_TIMEOUT for it. Time, not protocol, is shortened.
    monkeypatch.setattr(mqtt, "CONNECT_TIMEOUT", 1.5)


# -- the matrix --------------------------------------------------------------------------------


async def test_wrong_ca_is_refused_naming_the_ca(pki, tls_broker):
    b = tls_broker("server")
    assert_names_only("wrong_ca", await attempt(pki, b, ca_file="other.pem"))
    assert await attempt(pki, b, ca_file="ca.pem") is None  # control: the right CA connects


async def test_hostname_mismatch_is_refused(pki, tls_broker):
    wrong, right = tls_broker("wronghost"), tls_broker("server")
    assert_names_only("hostname", await attempt(pki, wrong, ca_file="ca.pem"))
    assert await attempt(pki, right, ca_file="ca.pem") is None  # control: same CA, SAN 127.0.0.1


async def test_expired_certificate_is_refused(pki, tls_broker):
    expired, valid = tls_broker("expired"), tls_broker("server")
    assert_names_only("expired", await attempt(pki, expired, ca_file="ca.pem"))
    assert await attempt(pki, valid, ca_file="ca.pem") is None  # control: same CA, in date


async def test_untrusted_or_missing_client_certificate_is_refused(pki, tls_broker, quick_connect):
    b = tls_broker("server", require_cert=True)
    rogue = await attempt(pki, b, ca_file="ca.pem", cert_file="rogue.pem", key_file="rogue.key")
    assert_names_only("untrusted_client", rogue)
    assert_names_only("no_client_cert", await attempt(pki, b, ca_file="ca.pem"))
    # control: a client certificate from the broker's CA connects
    assert await attempt(pki, b, ca_file="ca.pem", cert_file="client.pem", key_file="client.key") is None


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_bad_password_over_tls_is_refused(pki, tls_broker, version):
    b = tls_broker("server", users={"gw": "right"})
    kw = {"ca_file": "ca.pem", "username": "gw", "mqtt_version": version}
    assert_names_only("bad_password", await attempt(pki, b, password_file="pw-wrong", **kw))
    assert await attempt(pki, b, password_file="pw-right", **kw) is None  # control


# -- paho's own error codes are not CONNACK verdicts ---------------------------------------------


def test_paho_no_connection_code_is_not_read_as_bad_credentials():
    """paho's MQTT_ERR_NO_CONN is 4, and so is MQTT 3.1.1's CONNACK "bad user name or password":
    only a CONNACK (a paho ReasonCode) speaks of the credentials."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    no_conn = aiomqtt.MqttCodeError(4, "publish")
    for connecting in (True, False):
        text = mqtt._explain(no_conn, "broker b", connecting=connecting)
        assert "credentials" not in text and "lost the connection to broker b" in text, text
    # control: the CONNACK refusals still name the credentials
    for code in (134, 135):
        refused = aiomqtt.exceptions.MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=code))
        assert "refused the credentials" in mqtt._explain(refused, "broker b")


def test_an_eof_during_the_tls_handshake_names_the_client_certificate():
    """TLS 1.3 verifies the client's certificate after the handshake, and the broker's alert
    can be lost in its close (a suite run on a loaded machine saw a bare EOF where the alert
    usually is): with TLS on, an EOF says so, not 'a TLS port reached without tls?'."""
    eof = "failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)"
    e = aiomqtt.MqttError("Operation timed out")
    with_cert = mqtt._explain(e, "broker b", socket_error=eof, tls=True, client_cert=True)
    assert "may have rejected this gateway's client certificate" in with_cert and "without tls" not in with_cert
    without = mqtt._explain(e, "broker b", socket_error=eof, tls=True, client_cert=False)
    assert "requires a client certificate (set cert_file and key_file)" in without, without
    plain = mqtt._explain(e, "broker b", socket_error=eof)
    assert "a TLS port reached without tls?" in plain, plain


async def test_broker_going_away_at_stop_is_not_a_credentials_error(tmp_path, pki, tls_broker, caplog):
    b = tls_broker("server")
    cfg = load_config(write(tmp_path, b.port, 'ca_file = "ca.pem"', pki))
    caplog.set_level(logging.INFO, logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.published_samples > 0)
        b.stop()
        await wait_until(lambda: rt.sync.status.failures >= 1)
        rt.stop()
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and not any("credentials" in m for m in errors), errors
    assert any("lost the connection" in m or "refused the connection" in m for m in errors), errors


# -- end to end: refused, kept, fixed, delivered ----------------------------------------------


def write(d: Path, port: int, tls_lines: str, pki: Path) -> Path:
    for name in ("ca.pem", "other.pem"):
        (d / name).write_bytes((pki / name).read_bytes())
    p = d / "edgeos.toml"
    p.write_text(
        textwrap.dedent(f"""
        [gateway]
        id = "gw1"
        data_dir = "data"
        shutdown_timeout = "5s"
        [store]
        commit_interval = "50ms"
        [[devices]]
        name = "press"
        protocol = "simulated"
        poll_interval = "20ms"
        tags = [{{ name = "a" }}, {{ name = "b", signal = "random_walk" }}]
        [upstream]
        enabled = true
        host = "127.0.0.1"
        port = {port}
        reconnect_min = "50ms"
        reconnect_max = "300ms"
        tls = true
        """)
        + tls_lines
        + "\n"
    )
    return p


async def wait_until(pred, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)


def stored_seqs(data_dir: Path) -> set[int]:
    db = sqlite3.connect(f"{(data_dir / 'edgeos.db').as_uri()}?mode=ro", uri=True)
    try:
        return {i for (i,) in db.execute("SELECT id FROM units")}
    finally:
        db.close()


async def test_wrong_ca_keeps_data_locally_and_a_fixed_config_delivers_it(tmp_path, pki, tls_broker, caplog, subscribe):
    b = tls_broker("server")
    cfg = load_config(write(tmp_path, b.port, 'ca_file = "other.pem"', pki))
    caplog.set_level(logging.ERROR, logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.failures >= 3)
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    refusals = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(refusals) == 1, refusals  # named once, then rate limited
    assert CAUSES["wrong_ca"] in refusals[0]
    assert rt.sync.status.published_samples == 0 and rt.counters.stored > 0
    kept = stored_seqs(cfg.gateway.data_dir)
    assert kept
    # The fix: the right CA. A restarted runtime sends everything that accumulated, once.
    cfg = load_config(write(tmp_path, b.port, 'ca_file = "ca.pem"', pki))
    async with subscribe(b, tls_params=aiomqtt.TLSParameters(ca_certs=str(pki / "ca.pem"))) as got:
        rt = Runtime(cfg)
        task = asyncio.create_task(rt.run())
        try:
            await wait_until(lambda: rt.sync is not None and rt.sync.cursor >= rt.sync.status.head > max(kept), 30)
        finally:
            rt.stop()
            await asyncio.wait_for(task, 20)
        stored = stored_seqs(cfg.gateway.data_dir)
        await wait_until(lambda: {s for s, _, _ in got.units()} >= stored)
    seqs = [s for s, _, _ in got.units()]
    assert seqs == sorted(stored) and set(kept) <= set(seqs)


async def test_a_server_that_refuses_the_credentials_is_passed_over_and_tls_applies_to_each(
    tmp_path, pki, tls_broker, caplog
):
    """`upstream.servers`: on a refused CONNACK the sync tries the next server, and TLS and the
    credentials apply to every server of the list (issue 25). The first node knows the gateway
    under another password (a node whose user database lags behind its cluster's); the second
    has the right one. Both listen with TLS only: a later server tried without it would fail."""
    refusing = tls_broker("server", users={"gw": "an-older-password"})
    taking = tls_broker("server", users={"gw": "right"})
    p = write(tmp_path, taking.port, 'ca_file = "ca.pem"\nusername = "gw"\npassword_file = "pw-right"', pki)
    (tmp_path / "pw-right").write_bytes((pki / "pw-right").read_bytes())
    (tmp_path / "pw-right").chmod(0o600)
    text = p.read_text().replace(
        f'host = "127.0.0.1"\nport = {taking.port}\n',
        f'servers = ["127.0.0.1:{refusing.port}", "127.0.0.1:{taking.port}"]\n',
    )
    assert "servers = " in text
    p.write_text(text)
    cfg = load_config(p)
    caplog.set_level(logging.ERROR, logger="edgeos.sync")
    rt = Runtime(cfg)
    task = asyncio.create_task(rt.run())
    try:
        await wait_until(lambda: rt.sync is not None and rt.sync.status.published_samples > 0)
        st = rt.sync.status
        assert st.server == f"broker 127.0.0.1:{taking.port}"
        assert st.failures >= 1, "the first server was not tried first"
    finally:
        rt.stop()
        await asyncio.wait_for(task, 20)
    refusals = [r.getMessage() for r in caplog.records if CAUSES["bad_password"] in r.getMessage()]
    assert refusals and f"127.0.0.1:{refusing.port}" in refusals[0], refusals
