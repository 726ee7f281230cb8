"""Secrets and attack surface: secret files checked for their mode at load; with the default
config (`edgeos init`), the running daemon listens on loopback and its own Unix socket only.

Listening sockets are read from /proc: the daemon's socket inodes (/proc/PID/fd) matched
against /proc/PID/net/{tcp,tcp6,udp,udp6,unix}. Each check has a negative control that must
be caught: a secret file others may change, loaded with the check disabled; a process that
listens on 0.0.0.0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos.config import load as L
from edgeos.config import load_config
from edgeos.errors import ConfigError

EDGEOS = str(Path(sys.executable).with_name("edgeos"))

# -- secrets ---------------------------------------------------------------------------------

UPSTREAM = """
[gateway]
id = "gw1"
data_dir = "data"
[upstream]
enabled = true
port = 1
username = "gw1"
password_file = "pw"
[[devices]]
name = "d"
protocol = "simulated"
tags = [{ name = "t" }]
"""


def _config(tmp_path: Path, mode: int) -> Path:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    os.chmod(pw, mode)
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(UPSTREAM)
    return cfg


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_a_private_secret_file_loads_silently(tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="edgeos.config")
    load_config(_config(tmp_path, mode))
    assert "holds a secret" not in caplog.text


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o650])
def test_a_secret_file_others_may_read_is_warned_about(tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="edgeos.config")
    load_config(_config(tmp_path, mode))
    assert f"upstream.password_file: {tmp_path / 'pw'} holds a secret and has mode {mode:04o}" in caplog.text
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_secret_file_others_may_change_is_refused(tmp_path, mode):
    with pytest.raises(ConfigError, match=f"upstream.password_file: .*mode {mode:04o}: others may change it"):
        load_config(_config(tmp_path, mode))


def test_a_device_private_key_is_checked_too(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(key, 0o664)
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        '[gateway]\nid = "g"\ndata_dir = "data"\n[[devices]]\nname = "plc"\nprotocol = "opcua"\n'
        'endpoint = "opc.tcp://127.0.0.1:4840"\nsecurity_mode = "Sign"\ncertificate = "cert.der"\n'
        'private_key = "key.pem"\ntags = [{ name = "a", node = "ns=2;s=A" }]\n'
    )
    with pytest.raises(ConfigError, match=r"devices\[0\]\.private_key: .*key\.pem holds a secret and has mode 0664"):
        load_config(cfg)


def test_negative_control_without_the_check_a_writable_secret_loads(tmp_path, monkeypatch):
    """The refusal above comes from the check, not from something else in the config."""
    monkeypatch.setattr(L, "check_secret_files", lambda *a: None)
    load_config(_config(tmp_path, 0o666))  # would be refused with the check in place


# -- attack surface ----------------------------------------------------------------------------


def _hex_addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return addr, int(port, 16)


def listening_sockets(pid: int) -> list[tuple[str, str, int | str]]:
    """(kind, address, port or path) of every socket `pid` listens on (TCP LISTEN, bound UDP, Unix)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out: list[tuple[str, str, int | str]] = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode not in inodes:
                continue
            if (kind.startswith("tcp") and state == "0A") or (kind.startswith("udp") and state == "07"):
                addr, port = _hex_addr(local)
                out.append((kind, addr, port))
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; flag 00010000 = listening
        if f[6] in inodes and int(f[3], 16) & 0x10000:
            out.append(("unix", "", f[7] if len(f) > 7 else "(unnamed)"))
    return out


def non_loopback(socks: list[tuple[str, str, int | str]]) -> list[tuple[str, str, int | str]]:
    bad = []
    for kind, addr, where in socks:
        if kind == "unix":
            continue
        ip = ipaddress.ip_address(addr)
        if not (ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)):
            bad.append((kind, addr, where))
    return bad


def test_with_the_default_config_the_daemon_listens_on_loopback_only(tmp_path):
    cfg = tmp_path / "edgeos.toml"
    subprocess.run([EDGEOS, "init", str(cfg), "--local"], check=True, capture_output=True)
    # The default config, but for the HTTP server's port (9180 may be taken on a shared machine;
    # its address stays the default).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(cfg.read_text() + f"\n[http]\nport = {port}\n")
    proc = subprocess.Popen(
        [EDGEOS, "run", str(cfg)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        socks: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            socks = listening_sockets(proc.pid)
            if any(k == "unix" for k, _, _ in socks) and any(p == port for _, _, p in socks):
                break
            time.sleep(0.1)
        time.sleep(1.0)  # anything started after the control socket (an HTTP server) is up too
        socks = listening_sockets(proc.pid)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    print(f"security.default_listeners: {len(socks)} ({socks})")
    assert any(k == "unix" for k, _, _ in socks), f"no control socket seen: {socks}\n{out}"
    assert any(k.startswith("tcp") and p == port for k, _, p in socks), f"no HTTP listener seen: {socks}\n{out}"
    assert not non_loopback(socks), f"the default config listens beyond loopback: {non_loopback(socks)}"
    for kind, _, path in socks:
        if kind == "unix" and isinstance(path, str) and path.startswith("/"):
            mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o600
            assert not mode & 0o077, f"{path}: mode {mode:04o}, expected 0600"


def test_negative_control_a_process_listening_on_every_address_is_caught():
    code = (
        "import socket,time\n"
        "a=socket.socket(); a.bind(('0.0.0.0',0)); a.listen()\n"
        "b=socket.socket(); b.bind(('127.0.0.1',0)); b.listen()\n"
        "print('up',flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        socks = listening_sockets(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert len(socks) == 2
    assert [a for _, a, _ in non_loopback(socks)] == ["0.0.0.0"]
