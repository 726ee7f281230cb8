"""`edgeos service install/uninstall`: the systemd unit, its user, directories, a first config.

The unit and sysusers file are the ones in the repository's systemd/ (shipped inside the
package), with the path of this installation's `edgeos` and the chosen user written in. With a
root other than `/` (a staging tree for an image, and the tests) only files are written: no
user is created and systemctl is not called; the report says what remains to run on the target.
An existing config is never overwritten, and uninstalling removes the unit only: the data, the
config and the user stay (the data belongs to the user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

UNIT_NAME = "edgeos.service"
DEFAULT_USER = "edgeos"
UNIT_DIR = Path("etc/systemd/system")
SYSUSERS = Path("etc/sysusers.d/edgeos.conf")
CONFIG = Path("etc/edgeos/edgeos.toml")
STATE_DIR = Path("var/lib/edgeos")
_SHIPPED_EXE = "/usr/local/bin/edgeos"


@dataclass
class Report:
    """What was done, and what is left for an operator to run."""

    done: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)


def shipped(name: str) -> str:
    return (resources.files("edgeos.service") / "systemd" / name).read_text(encoding="utf-8")


def executable() -> str:
    """The `edgeos` of this installation (a venv's, /usr/local/bin's ...)."""
    beside = Path(sys.executable).parent / "edgeos"
    if beside.exists():
        return str(beside)
    found = shutil.which("edgeos")
    return str(Path(found).absolute()) if found else _SHIPPED_EXE


def render_unit(exe: str, user: str) -> str:
    text = shipped(UNIT_NAME).replace(_SHIPPED_EXE, exe)
    return text.replace(f"\nUser={DEFAULT_USER}\n", f"\nUser={user}\n").replace(
        f"\nGroup={DEFAULT_USER}\n", f"\nGroup={user}\n"
    )


def render_sysusers(user: str) -> str:
    lines = []
    for ln in shipped("edgeos.sysusers.conf").splitlines(keepends=True):
        if ln.startswith(("u ", "m ")):
            ln = ln.replace(f" {DEFAULT_USER} ", f" {user} ", 1)
        lines.append(ln)
    return "".join(lines)


def _live(root: Path) -> bool:
    """Installing into the running system (not a staging tree)."""
    return root.resolve() == Path("/")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _run(cmd: list[str], report: Report) -> bool:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        report.todo.append(f"{' '.join(cmd)}   (failed here: {e})")
        return False
    if done.returncode != 0:
        report.todo.append(f"{' '.join(cmd)}   (failed here: {(done.stderr or done.stdout).strip()})")
        return False
    report.done.append(f"ran {' '.join(cmd)}")
    return True


def _write(path: Path, text: str, mode: int, report: Report) -> None:
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    report.done.append(f"{'updated' if existed else 'wrote'} {path}")


def install(config_text: str, root: Path = Path("/"), user: str = DEFAULT_USER, exe: str | None = None) -> Report:
    """Unit, sysusers entry, user (live only), directories and `config_text` as the config
    unless one exists (`edgeos init`'s, given by the CLI)."""
    report = Report()
    live = _live(root)
    exe = exe or executable()
    if live and exe.startswith(("/home/", "/root/")):
        report.todo.append(
            f"{exe} is under /home or /root, which ProtectHome=yes hides from the service: install "
            "edgeos elsewhere (e.g. a venv in /opt/edgeos) or add ProtectHome=read-only in a drop-in"
        )
    _write(root / UNIT_DIR / UNIT_NAME, render_unit(exe, user), 0o644, report)
    sysusers = root / SYSUSERS
    _write(sysusers, render_sysusers(user), 0o644, report)

    config = root / CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    if config.exists():
        report.done.append(f"kept {config} (an existing config is never overwritten)")
    else:
        _write(config, config_text, 0o640, report)
    state = root / STATE_DIR
    if not state.exists():
        state.mkdir(0o750, parents=True)
        report.done.append(f"created {state}")

    if not live:
        report.todo += [
            f"on the target: systemd-sysusers /{SYSUSERS}   (creates user {user})",
            # No user here to give it to: the live install chowns it (root:<group>, 0640).
            f"on the target: chgrp {user} /{CONFIG}   (the config is 0640: {user} reads it through its group)",
            "on the target: systemctl daemon-reload && systemctl enable --now edgeos",
        ]
        return report
    if not _user_exists(user):
        if shutil.which("systemd-sysusers"):
            _run(["systemd-sysusers", str(sysusers)], report)
        else:
            home = f"/{STATE_DIR}"
            if _run(
                ["useradd", "--system", "--user-group", "--home-dir", home, "--shell", "/usr/sbin/nologin", user],
                report,
            ):
                _run(["usermod", "-aG", "dialout", user], report)
    else:
        report.done.append(f"user {user} exists")
    if _user_exists(user):
        pw = pwd.getpwnam(user)
        os.chown(state, pw.pw_uid, pw.pw_gid)
        os.chown(config, 0, pw.pw_gid)  # root's file, readable by the daemon's group
    if _systemd_running():
        _run(["systemctl", "daemon-reload"], report)
        report.todo.append("systemctl enable --now edgeos")
    else:
        report.todo.append(
            "systemd is not running here: on the gateway, systemctl daemon-reload && systemctl enable --now edgeos"
        )
    return report


def uninstall(root: Path = Path("/")) -> Report:
    """Stop and remove the unit; the data, the config, the sysusers entry and the user stay."""
    report = Report()
    live = _live(root)
    unit = root / UNIT_DIR / UNIT_NAME
    if live and _systemd_running() and unit.exists():
        _run(["systemctl", "disable", "--now", UNIT_NAME], report)
    if unit.exists():
        unit.unlink()
        report.done.append(f"removed {unit}")
    else:
        report.done.append(f"no unit at {unit}")
    if live and _systemd_running():
        _run(["systemctl", "daemon-reload"], report)
    for kept in (root / CONFIG, root / STATE_DIR, root / SYSUSERS):
        if kept.exists():
            report.done.append(f"kept {kept}")
    drop_ins = root / UNIT_DIR / f"{UNIT_NAME}.d"
    if drop_ins.exists():
        report.done.append(f"kept {drop_ins} (your overrides)")
    return report


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
