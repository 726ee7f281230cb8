"""`edgeos service install --root` into a staging tree, then uninstall: the unit goes, the
data and the config stay; an existing config is never overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edgeos.cli import app
from edgeos.config import load_config

EXE = str(Path(sys.executable).parent / "edgeos")


def _cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def test_install_into_root_then_uninstall_keeps_data_and_config(tmp_path):
    root = tmp_path / "root"
    out = _cli("service", "install", "--root", str(root), "--user", "gwd")
    unit = root / "etc/systemd/system/edgeos.service"
    config = root / "etc/edgeos/edgeos.toml"
    text = unit.read_text()
    assert f"ExecStart={EXE} run -c /etc/edgeos/edgeos.toml" in text
    assert "\nUser=gwd\n" in text and "\nGroup=gwd\n" in text
    assert "u gwd - " in (root / "etc/sysusers.d/edgeos.conf").read_text()
    assert (root / "var/lib/edgeos").is_dir()
    assert "systemd-sysusers" in out and "systemctl" in out  # left for the target: files only here
    # The config is 0640 and no user exists here to own it: the target's step is listed.
    assert oct(config.stat().st_mode & 0o777) == "0o640" and "chgrp gwd /etc/edgeos/edgeos.toml" in out
    # The starting config is `edgeos init`'s for the unit: it checks, and its data is /var/lib/edgeos.
    cfg = load_config(config)
    assert cfg.gateway.data_dir == Path("/var/lib/edgeos") and cfg.devices
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    # The sysusers entry, applied to the staging tree as the target's systemd-sysusers would.
    sysusers = ["systemd-sysusers", f"--root={root}", str(root / "etc/sysusers.d/edgeos.conf")]
    done = subprocess.run(sysusers, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (root / "etc/passwd").read_text().startswith("gwd:x:")
    groups = (root / "etc/group").read_text().splitlines()
    assert any(ln.startswith("dialout:") and ln.endswith(":gwd") for ln in groups)

    # A second install (an upgrade) never overwrites the operator's config.
    config.write_text(config.read_text() + "\n# mine\n")
    out = _cli("service", "install", "--root", str(root), "--user", "gwd")
    assert config.read_text().endswith("# mine\n") and "kept" in out

    data = root / "var/lib/edgeos/edgeos.db"
    data.write_bytes(b"samples")
    dropin = root / "etc/systemd/system/edgeos.service.d/serial.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nPrivateDevices=no\n")
    out = _cli("service", "uninstall", "--root", str(root))
    assert not unit.exists() and "removed" in out
    assert data.read_bytes() == b"samples" and config.read_text().endswith("# mine\n")
    assert dropin.exists()  # the operator's overrides are theirs too
