"""The shipped unit: `systemd-analyze verify` passes, its sandbox scores 2.0 or lower, and what
it forbids (MemoryDenyWriteExecute) does not break what the daemon loads."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from edgeos.service import install

EXE = str(Path(sys.executable).parent / "edgeos")


def _unit(tmp_path: Path) -> Path:
    path = tmp_path / "edgeos.service"
    path.write_text(install.render_unit(EXE, "edgeos"))
    return path


def test_unit_verifies(tmp_path):
    unit = _unit(tmp_path)
    assert f"ExecStart={EXE} run -c /etc/edgeos/edgeos.toml" in unit.read_text()
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Unknown or misspelt directives are only warned about: none may be.
    assert "edgeos.service" not in done.stderr, done.stderr


def test_unit_exposure_at_most_2(tmp_path):
    unit = _unit(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for edgeos\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "MemoryDenyWriteExecute=yes"):
        assert directive in text


PROBE = textwrap.dedent(
    """
    import asyncio, ctypes, mmap, sys, tempfile
    from pathlib import Path

    # The kernel's own MemoryDenyWriteExecute (PR_SET_MDWE, Linux 6.3): what systemd 254+
    # uses for the directive, and the same rule as its seccomp filter on older ones.
    if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("PR_SET_MDWE unavailable: " + str(ctypes.get_errno()))
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping allowed: MDWE not in force")
    except PermissionError:
        pass

    import numpy, ssl, sqlite3
    from edgeos import filters
    assert filters.COMPILED
    from cryptography.hazmat.primitives.asymmetric import rsa
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    import asyncua, aiomqtt

    from edgeos.config import load_config
    from edgeos.runtime import Runtime

    d = Path(tempfile.mkdtemp())
    (d / "edgeos.toml").write_text('''
    [gateway]
    id = "gw"
    data_dir = "data"
    [[devices]]
    name = "sim"
    protocol = "simulated"
    poll_interval = "20ms"
    tags = [{ name = "t", filters = [{ type = "swinging_door", deviation = 0.1 }] }]
    ''')

    async def main():
        rt = Runtime(load_config(d / "edgeos.toml"))
        task = asyncio.create_task(rt.run())
        await asyncio.sleep(0.5)
        rt.stop()
        await task
        assert rt.counters.stored > 0, rt.counters

    asyncio.run(main())
    print("ok")
    """
)


def test_memory_deny_write_execute_breaks_nothing_we_load(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
