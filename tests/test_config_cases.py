"""Config behaviour as data: tests/cases/<case>/edgeos.toml with error.txt or expected.txt.

error.txt: every line must appear in the error (substring, so wording can improve).
expected.txt: every line must appear in `edgeos check` output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos.cli import app
from edgeos.config import load_config
from edgeos.errors import ConfigError

CASES = Path(__file__).parent / "cases"
ERROR_CASES = sorted(p.name for p in CASES.iterdir() if (p / "error.txt").exists())
VALID_CASES = sorted(p.name for p in CASES.iterdir() if (p / "expected.txt").exists())


def _lines(p: Path) -> list[str]:
    return [ln for ln in p.read_text().splitlines() if ln.strip()]


def test_there_are_enough_bad_configs() -> None:
    assert len(ERROR_CASES) >= 15


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_config_is_refused_with_a_precise_message(case: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CASES / case / "edgeos.toml")
    message = str(info.value)
    for expected in _lines(CASES / case / "error.txt"):
        assert expected in message, f"{case}: {expected!r} not in:\n{message}"


@pytest.mark.parametrize("case", ERROR_CASES[:3])
def test_cli_check_exits_2_and_prints_every_problem(case: str) -> None:
    result = CliRunner().invoke(app, ["check", str(CASES / case / "edgeos.toml")])
    assert result.exit_code == 2
    for expected in _lines(CASES / case / "error.txt"):
        assert expected in result.output


@pytest.mark.parametrize("case", VALID_CASES)
def test_valid_config_check_summary(case: str) -> None:
    result = CliRunner().invoke(app, ["check", str(CASES / case / "edgeos.toml")])
    assert result.exit_code == 0, result.output
    for expected in _lines(CASES / case / "expected.txt"):
        assert expected in result.output, f"{expected!r} not in:\n{result.output}"


def test_many_problems_are_all_reported_in_one_pass() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CASES / "many_problems_one_pass" / "edgeos.toml")
    assert len(info.value.problems) >= 4
