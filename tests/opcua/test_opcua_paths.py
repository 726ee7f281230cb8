"""File names in an OPC UA device's config are relative to the config file, not to where the
daemon runs (systemd starts it in /)."""

from __future__ import annotations

from edgeos.config import load_config


def test_certificate_and_password_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "pki").mkdir()
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "edgeos.toml").write_text(
        """
[gateway]
id = "g"
data_dir = "data"
[[devices]]
name = "plc"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
security_mode = "None"
username = "operator"
password_file = "pw"
trust_dir = "pki"
tags = [{ name = "a", node = "ns=2;s=A" }]
"""
    )
    monkeypatch.chdir("/")  # where systemd runs the daemon
    cfg = load_config(tmp_path / "edgeos.toml")
    o = cfg.devices[0].options
    assert o["password_file"] == str(tmp_path / "pw") and o["trust_dir"] == str(tmp_path / "pki")
