"""bandit over edgeos/ and protocols/: no high-severity finding beyond the judged baseline; a
deliberately planted one (shell=True with a config value) must be caught. (pip-audit needs a
vulnerability service: scripts/check runs it; see docs/reliability.md.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BANDIT = str(Path(sys.executable).with_name("bandit"))


def _bandit(*targets: Path, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [BANDIT, "-q", "-r", *map(str, targets), "--severity-level", "high", "-b", "scripts/bandit-baseline.json"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_bandit_finds_no_high_severity_issue():
    r = _bandit(Path("edgeos"), Path("protocols"), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_negative_control_a_planted_high_severity_issue_is_caught(tmp_path):
    for d in ("edgeos", "protocols", "scripts"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (tmp_path / "edgeos" / "planted.py").write_text(
        "import subprocess\n\n\ndef run(cmd: str) -> None:\n    subprocess.call(cmd, shell=True)\n"
    )
    r = _bandit(Path("edgeos"), Path("protocols"), cwd=tmp_path)
    assert r.returncode != 0 and "planted.py" in r.stdout, r.stdout + r.stderr
