"""`edgeos check --security` on real files: certificates made here (valid, expiring soon,
expired), a modbus-only config that must not need asyncua (nor cryptography: the openssl
command reads the dates then), and the shipped unit scored by systemd-analyze."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos.cli import app
from edgeos.config import load_config
from edgeos.service import security

x509 = pytest.importorskip("cryptography.x509")  # made here; read by the module with or without it
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

NOW = dt.datetime.now(dt.UTC)


def cert(path: Path, days_left: float, *, der: bool = False) -> Path:
    """A self-signed certificate ending `days_left` days from now (negative: expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, path.stem)])
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=400))
        .not_valid_after(NOW + dt.timedelta(days=days_left, hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(c.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM))
    k = path.with_suffix(".key")
    k.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    k.chmod(0o600)
    return path


MODBUS = """
[gateway]
id = "gw"
data_dir = "data"
[[devices]]
name = "plc"
protocol = "modbus"
host = "10.0.0.7"
tags = [{ name = "t", address = "hr1" }]
"""


def test_every_connection_and_listener_with_certificate_days(tmp_path):
    cert(tmp_path / "ca.pem", 400)
    cert(tmp_path / "client.pem", 10)  # soon: warned
    cert(tmp_path / "opcua.der", -3, der=True)  # expired: warned
    cert(tmp_path / "https.pem", 200)
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "console.pw").write_text("admin:$2b$placeholder\n")
    for p in ("pw", "console.pw"):
        (tmp_path / p).chmod(0o600)
    (tmp_path / "servers").mkdir()
    (tmp_path / "edgeos.toml").write_text(
        MODBUS
        + textwrap.dedent("""
        [[devices]]
        name = "cell1"
        protocol = "opcua"
        endpoint = "opc.tcp://10.0.0.9:4840"
        security_mode = "SignAndEncrypt"
        security_policy = "Basic256Sha256"
        certificate = "opcua.der"
        private_key = "opcua.key"
        trust_dir = "servers"
        tags = [{ name = "speed", node = "ns=2;i=1" }]
        [[devices]]
        name = "open"
        protocol = "opcua"
        endpoint = "opc.tcp://10.0.0.10:4840"
        security_mode = "None"
        tags = [{ name = "speed", node = "ns=2;i=1" }]
        [upstream]
        enabled = true
        host = "10.0.0.1"
        tls = true
        ca_file = "ca.pem"
        cert_file = "client.pem"
        key_file = "client.key"
        username = "gw"
        password_file = "pw"
        [http]
        address = "0.0.0.0"
        tls_cert = "https.pem"
        tls_key = "https.key"
        [console]
        password_file = "console.pw"
        """)
    )
    result = CliRunner().invoke(app, ["check", "--security", str(tmp_path / "edgeos.toml")])
    assert result.exit_code == 0, result.output
    out = result.output
    sec = out[out.index("\nsecurity\n") :]
    assert "mqtt 10.0.0.1:8883" in sec and "TLS, CA from ca_file, host name verified" in sec
    assert "user 'gw', password from file, client certificate" in sec
    assert "ca_file " in sec and "ca.pem: 400 days left" in sec
    assert "client.pem: 10 days left" in sec
    assert "modbus tcp 10.0.0.7:502" in sec and "Modbus has no security" in sec
    assert "OPC UA SignAndEncrypt Basic256Sha256" in sec and "opcua.der: EXPIRED 3 days ago" in sec
    assert "OPC UA security None" in sec
    assert "0.0.0.0:9180" in sec and "https.pem: 200 days left" in sec and "console: password" in sec
    assert "control.sock" in sec
    warnings = [ln for ln in sec.splitlines() if ln.strip().startswith("WARNING")]
    assert any("client.pem expires in 10 days" in w for w in warnings), warnings
    assert any("opcua.der has expired" in w for w in warnings), warnings
    assert any("device open: OPC UA security mode None" in w for w in warnings), warnings
    assert any("http listens on 0.0.0.0" in w for w in warnings), warnings
    # Negative controls: the valid, distant certificates and the TLS upstream are not warned about.
    assert not any("ca.pem" in w or "https.pem" in w or "upstream" in w for w in warnings), warnings
    assert "secret" not in out


def test_modbus_only_config_needs_neither_asyncua_nor_cryptography(tmp_path):
    cert(tmp_path / "ca.pem", 50)
    (tmp_path / "edgeos.toml").write_text(
        MODBUS + '[upstream]\nenabled = true\nhost = "127.0.0.1"\ntls = true\nca_file = "ca.pem"\n'
    )
    code = (
        "import sys\n"
        "sys.modules['asyncua'] = None\n"  # an import of either now raises ImportError
        "sys.modules['cryptography'] = None\n"
        "from edgeos.cli import main\n"
        f"sys.argv = ['edgeos', 'check', '--security', {str(tmp_path / 'edgeos.toml')!r}]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ca.pem: 50 days left" in done.stdout, done.stdout  # read by the openssl command
    assert "security warnings: 0" in done.stdout, done.stdout
    assert "asyncua" not in done.stderr


def test_plain_upstream_to_another_machine_is_warned(tmp_path):
    warned = {}
    for host in ("broker.example", "127.0.0.1"):
        (tmp_path / "edgeos.toml").write_text(MODBUS + f'[upstream]\nenabled = true\nhost = "{host}"\n')
        lines = security.report(load_config(tmp_path / "edgeos.toml"))
        warned[host] = [ln for ln in lines if "WARNING upstream: no TLS" in ln]
    assert warned["broker.example"] and not warned["127.0.0.1"]  # loopback: the control


def test_unit_exposure_is_measured_and_a_bare_unit_is_warned():
    shipped = security.unit_exposure()
    assert shipped.security.startswith("exposure "), shipped.security
    assert float(shipped.security.split()[1]) <= security.MAX_EXPOSURE and not shipped.warnings
    bare = security.unit_exposure(unit_text="[Service]\nExecStart=/bin/true\n")  # no sandbox at all
    assert float(bare.security.split()[1]) > security.MAX_EXPOSURE and bare.warnings, bare


def test_without_systemd_analyze_it_says_so():
    item = security.unit_exposure(analyze="")
    assert "not measured: systemd-analyze is not installed" in item.security
