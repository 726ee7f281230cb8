"""Config behaviour as data: tests/cases/<case>/edgeos.toml with error.txt or expected.txt.

error.txt: every line must appear in the error (substring, so wording can improve).
expected.txt: every line must appear in `edgeos check` output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeos import plugins
from edgeos.cli import app
from edgeos.config import load_config
from edgeos.errors import ConfigError
from edgeos.model import ValueKind

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


# -- filters on string tags: refused unless the filter plugin says it handles text ------------

TEXT_TAG = """
[gateway]
id = "gw1"
data_dir = "data"

[[devices]]
name = "press1"
protocol = "simulated"
tags = [{{ name = "state", signal = "text", filters = [{{ type = "{filter}" }}] }}]
"""


class _TextPlugin:
    """An OEM filter plugin, built here: tests/fixture_plugin is installed as it is."""

    name = "last_text"
    fields: dict = {}

    def __init__(self, accepts_text: bool) -> None:
        self.accepts_text = accepts_text

    def create(self, n_tags: int, params: dict) -> None:
        raise AssertionError("the loader only checks")


@pytest.mark.parametrize("accepts_text", [True, False])
def test_a_filter_plugin_opts_in_to_string_tags(accepts_text: bool, tmp_path: Path, monkeypatch) -> None:
    original = plugins.load
    plugin = _TextPlugin(accepts_text)
    monkeypatch.setattr(plugins, "load", lambda g, n: plugin if n == plugin.name else original(g, n))
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(TEXT_TAG.format(filter=plugin.name))
    if accepts_text:
        (tag,) = load_config(cfg).devices[0].tags
        assert [f.name for f in tag.filters] == ["last_text"]
    else:
        with pytest.raises(ConfigError, match="filter 'last_text' needs a numeric tag; tag 'state' is a string"):
            load_config(cfg)


def test_a_bool_tag_keeps_its_numeric_filter() -> None:
    running, state = load_config(CASES / "valid_filter_on_bool_tag" / "edgeos.toml").devices[0].tags
    assert running.meta.kind is ValueKind.BOOL and [f.name for f in running.filters] == ["deadband"]
    assert state.meta.kind is ValueKind.STRING


def test_problems_under_a_tag_name_it_and_keep_the_index() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CASES / "tag_path_names_tag" / "edgeos.toml")
    paths = [p.path for p in info.value.problems]
    assert paths == [
        "devices[0](press1).tags[0](flow).filters[1].offset",
        "devices[0](press1).tags[1].name",
        "devices[0](press1).tags[3].name",
        "devices[0](press1).tags[3].amplitud",
        "devices[0](press1).tags[2](mode).states",  # the protocol's check, at the config's index
    ]


def test_a_choice_written_bare_or_as_text_is_the_same_choice() -> None:
    cfg = load_config(CASES / "valid_bare_choices" / "edgeos.toml")
    assert cfg.upstream.options["mqtt_version"] == "5"  # written 5
    assert cfg.store.unit_version == 3  # written "3"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("unit_version = 3.0", "store.unit_version: found 3.0, expected one of 2, 3"),
        ("unit_version = true", "store.unit_version: found True, expected one of 2, 3"),
        ('unit_version = "three"', 'store.unit_version: found "three", expected one of 2, 3'),
    ],
)
def test_a_choice_is_never_a_float_or_a_bool(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "edgeos.toml"
    text = (CASES / "valid_bare_choices" / "edgeos.toml").read_text()
    p.write_text(text.replace('unit_version = "3"', line))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert message in str(info.value)


def test_servers_beside_host_uses_servers_and_says_host_is_not_used(tmp_path: Path, caplog) -> None:
    from edgeos.sync.mqtt import servers

    p = tmp_path / "edgeos.toml"
    text = (CASES / "valid_bare_choices" / "edgeos.toml").read_text()
    p.write_text(text.replace('host = "127.0.0.1"', 'host = "10.0.0.9"\nservers = ["127.0.0.1:1884", "b"]'))
    with caplog.at_level("WARNING", logger="edgeos.config"):
        cfg = load_config(p)
    assert servers(cfg.upstream.options) == [("127.0.0.1", 1884), ("b", 1883)]
    assert "upstream.host '10.0.0.9' is not used: upstream.servers lists the brokers" in caplog.text


def test_every_malformed_server_is_named_by_its_index(tmp_path: Path) -> None:
    p = tmp_path / "edgeos.toml"
    text = (CASES / "valid_bare_choices" / "edgeos.toml").read_text()
    p.write_text(text.replace('host = "127.0.0.1"', 'servers = ["a:1884", "[::1", "b", "b:0"]'))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert 'servers[1] "[::1" (no closing ]' in msg and 'servers[3] "b:0" (port' in msg, msg
    assert "servers[0]" not in msg and "servers[2]" not in msg, msg


def test_an_unknown_key_of_a_filter_without_parameters_says_it_takes_none(tmp_path: Path) -> None:
    p = tmp_path / "edgeos.toml"
    p.write_text(
        '[gateway]\nid = "g"\ndata_dir = "d"\n[[devices]]\nname = "a"\nprotocol = "simulated"\n'
        '[[devices.tags]]\nname = "t"\nfilters = [{ type = "rate", foo = 1 }]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "filters[0].foo: unknown key 'foo'; allowed: none (it takes no keys)" in str(info.value)


def test_a_refused_value_is_not_also_said_missing() -> None:
    """security_mode = "none" is refused (the choices are case-sensitive); the key is there, so
    no "missing" follows it, here or for a Modbus host of the wrong type."""
    with pytest.raises(ConfigError) as info:
        load_config(CASES / "opcua_refused_values" / "edgeos.toml")
    paths = [p.path for p in info.value.problems]
    assert paths.count("devices[0].security_mode") == 1 and paths.count("devices[1].host") == 1, paths
    assert "missing" not in str(info.value)
    assert len(paths) == 6, str(info.value)


def test_a_node_id_cell_with_the_delimiter_says_to_quote_it_once_for_every_device(tmp_path: Path) -> None:
    """A ';' CSV whose node ids hold ';' unquoted: the problem says to quote the cell, and is said
    once per row, not once per device reading the file (440 problems for 2 devices of 220 rows)."""
    (tmp_path / "tags.csv").write_text('name;node\nspeed;ns=2;s=Speed\ntemp;"ns=2;s=Temp"\n')
    devices = "".join(
        f'[[devices]]\nname = "plc{k}"\nprotocol = "opcua"\nendpoint = "opc.tcp://127.0.0.1:4840"\n'
        'security_mode = "None"\ntags_csv = "tags.csv"\n'
        for k in range(2)
    )
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text('[gateway]\nid = "gw"\ndata_dir = "data"\n' + devices)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    (problem,) = info.value.problems
    assert problem.line == 2 and 'a cell that holds ";", such as an OPC UA node id, goes in double quotes' in str(
        problem
    )


def test_a_plugin_hook_that_raises_is_a_problem_naming_the_plugin(tmp_path: Path) -> None:
    """A third-party validate() or tag_kind() that raises was a traceback from `edgeos check`,
    hiding every other problem; it is one problem naming the plugin and its package."""
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        '[gateway]\nid = "gw"\ndata_dir = "data"\n'
        '[[devices]]\nname = "a"\nprotocol = "misbehaving"\nmode = "validate_raises"\ntags = [{ name = "x" }]\n'
        '[[devices]]\nname = "b"\nprotocol = "misbehaving"\ntags = [{ name = "y", kind_raises = true }]\n'
        '[[devices]]\nname = "c"\nprotocol = "simulated"\npoll_interval = "0s"\ntags = [{ name = "z" }]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "devices[0].protocol: plugin 'misbehaving' (from edgeos-fixture-plugin" in text, text
    assert "its validate() failed: KeyError: 'plugin bug in validate'" in text
    assert "its tag_kind() failed: ZeroDivisionError: plugin bug in tag_kind" in text
    assert "devices[2].poll_interval" in text  # the other problems, in the same pass
    assert len(info.value.problems) == 3, text


def test_a_plugin_describe_that_raises_is_a_line_of_check_not_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeos.cli import app

    p = tmp_path / "edgeos.toml"
    p.write_text(
        '[gateway]\nid = "g"\ndata_dir = "d"\n'
        '[[devices]]\nname = "a"\nprotocol = "misbehaving"\nmode = "describe_raises"\ntags = [{ name = "x" }]\n'
        '[[devices]]\nname = "b"\nprotocol = "misbehaving"\ntags = [{ name = "y" }]\n'
    )
    r = CliRunner().invoke(app, ["check", "-c", str(p)])
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "plugin 'misbehaving' (from edgeos-fixture-plugin" in r.output, r.output
    assert "its describe() failed: IndexError: plugin bug in describe" in r.output and "mode ok" in r.output


def test_a_plugin_s_default_is_parsed_or_said() -> None:
    from edgeos.config.schema import Field, Problems, parse_table

    assert Field("duration", 1_000_000_000).default_value() == 10**9  # already in ns
    assert Field("size", "1KiB").default_value() == 1024
    problems = Problems("f")
    owner = lambda: "plugin 'x' (from x-pkg 1.0)"  # noqa: E731
    assert parse_table({}, {"every": Field("duration", "soon")}, "devices[0]", problems, owner=owner) == {"every": None}
    (p,) = problems.items
    assert p.path == "devices[0].every" and "the default plugin 'x' (from x-pkg 1.0) declares" in p.message
