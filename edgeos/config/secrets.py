"""Files that hold secrets (passwords, private keys) must not be readable by others.

Decision (docs/reliability.md, "Secrets"):
- writable by group or others (mode & 0o022): REFUSED at load. Whoever can change the file
  can substitute the credentials or key the gateway presents; that is never a setup to run.
- readable by others (or group-executable, other bits beyond 0640): a WARNING at every load
  (`edgeos check` and the daemon's start), naming the file and the chmod that fixes it. Not a
  refusal: a package upgrade must not stop an unattended gateway that ran yesterday, and the
  file leaks nothing new by the daemon starting.
- allowed silently: 0600, 0400, and 0640 (group read) for the root:edgeos arrangement where
  the service reads a root-owned file through its group.
The config file itself never holds a secret (passwords only through password_file or
password_env; an unknown key such as `password` is refused), so its own mode is not checked.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from edgeos.config.schema import Problems

# Keys, in [upstream], [http], [console] and any device table, whose file holds a secret.
SECRET_KEYS = ("password_file", "key_file", "private_key", "user_private_key", "tls_key")
ALLOWED = 0o640  # owner read/write, group read
log = logging.getLogger("edgeos.config")


def check_secret_file(path: Path, key_path: str, problems: Problems) -> str | None:
    """Refuse (a problem) a secret file others may change; warn (returned and logged) when others
    may read it. A missing file is reported elsewhere."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        problems.add(
            key_path,
            f"{path} holds a secret and has mode {mode:04o}: others may change it; "
            f"run `chmod 600 {path}` (0600, or 0640 to let the service's group read it)",
        )
        return None
    if mode & ~ALLOWED & 0o777:
        msg = (
            f"{problems.file}: {key_path}: {path} holds a secret and has mode {mode:04o}: others may read it; "
            f"run `chmod 600 {path}`"
        )
        log.warning("%s", msg)
        return msg
    return None


def check_options(options: dict, base: Path, path: str, problems: Problems) -> None:
    """Check every secret file named in one table (`options`: key -> file name)."""
    for key in SECRET_KEYS:
        v = options.get(key)
        if isinstance(v, str) and v:
            p = Path(v) if os.path.isabs(v) else base / v
            check_secret_file(p, f"{path}.{key}", problems)
