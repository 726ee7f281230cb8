"""What docs/config.md (and README.md) promise about the config file, tested from outside.

Expectations come from the documents only. Defaults are checked by equivalence: a config
that leaves a key out must load to the same thing as one that writes the documented default
explicitly (and a non-default value must load to something different), so the tests do not
depend on the names of the loaded objects' attributes. Errors are checked through the
`edgeos check` CLI (exit code 2, one line per problem) and `edgeos.ConfigError`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import edgeos

EDGEOS = str(Path(sys.executable).parent / "edgeos")

BASE_GATEWAY = '[gateway]\nid = "gw1"\ndata_dir = "data"\n'
BASE_DEVICE = (
    '[[devices]]\nname = "press1"\nprotocol = "simulated"\n'
    '  [[devices.tags]]\n  name = "temperature"\n  signal = "sine"\n'
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config(
    tmp_path: Path,
    *,
    gateway: str = "",
    store: str = "",
    device: str = "",
    tag: str = "",
    tail: str = "",
    name: str = "edgeos.toml",
) -> Path:
    """A minimal valid config with extra lines in each section."""
    text = BASE_GATEWAY + gateway + "\n[store]\n" + store + "\n"
    text += '[[devices]]\nname = "press1"\nprotocol = "simulated"\n' + device + "\n"
    text += '  [[devices.tags]]\n  name = "temperature"\n  signal = "sine"\n' + tag + "\n"
    text += tail
    return write(tmp_path / name, text)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEOS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1"},
    )


def problems(path: Path) -> list[str]:
    """The problem lines `edgeos.load_config` reports (empty when the config loads)."""
    try:
        edgeos.load_config(path)
    except edgeos.ConfigError as e:
        return [line for line in str(e).splitlines() if line.strip()]
    return []


def assert_refused(path: Path, *needles: str) -> list[str]:
    found = problems(path)
    assert found, f"{path.name} was accepted, expected a config error"
    joined = "\n".join(found)
    for needle in needles:
        assert needle in joined, f"{needle!r} not in:\n{joined}"
    return found


def load(path: Path) -> edgeos.Config:
    found = problems(path)
    assert not found, "\n".join(found)
    return edgeos.load_config(path)


# --- edgeos init / edgeos check -------------------------------------------------------


def test_init_writes_a_config_that_check_accepts(tmp_path: Path) -> None:
    # README: `edgeos init edgeos.toml` "a commented example config (runs as written: a
    # simulated device)"; config.md: `edgeos check FILE` validates one.
    target = tmp_path / "sub" / "edgeos.toml"
    r = run_cli("init", "--local", str(target))
    assert r.returncode == 0, r.stderr
    text = target.read_text(encoding="utf-8")
    assert "#" in text  # commented
    parsed = tomllib.loads(text)
    assert any(d.get("protocol") == "simulated" for d in parsed["devices"])
    r = run_cli("check", "-c", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    assert load(target).devices


def test_init_to_stdout(tmp_path: Path) -> None:
    r = run_cli("init", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["gateway"]["id"]
    assert list(tmp_path.iterdir()) == []


def test_check_takes_the_config_as_argument_or_with_c(tmp_path: Path) -> None:
    path = config(tmp_path)
    for args in (("check", str(path)), ("check", "-c", str(path))):
        r = run_cli(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "press1" in r.stdout


def test_check_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        gateway="shutdown_timeout = 5\nqueue_batchs = 10\n",
        store='max_size = "12 potatoes"\n',
        tag='  amplitude = "lots"\n',
    )
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 2
    out = r.stdout + r.stderr
    lines = [
        ln.strip()
        for ln in out.splitlines()
        if ln.strip().startswith(f"{path}:") and ("found" in ln or "unknown key" in ln)
    ]
    assert len(lines) == 4, out
    assert "4 problems" in out, out
    assert any("gateway.shutdown_timeout" in ln for ln in lines)
    assert any("gateway.queue_batchs" in ln for ln in lines)
    assert any("store.max_size" in ln for ln in lines)
    assert any("tags[0](temperature).amplitude" in ln for ln in lines)


# --- rules that apply everywhere ---------------------------------------------------------


def test_every_problem_reported_in_one_pass(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        gateway='log_level = "verbose"\n',
        store='fsync_interval = "90s"\nunit_version = 4\n',
        device="poll_interval = 1\n",
        tag='  amplitude = "lots"\n',
        tail='[http]\nport = "9180"\n[health]\nsync_lag = 300\n',
    )
    found = problems(path)
    joined = "\n".join(found)
    for key in (
        "gateway.log_level",
        "store.fsync_interval",
        "store.unit_version",
        "devices[0]",
        "poll_interval",
        "amplitude",
        "http.port",
        "health.sync_lag",
    ):
        assert key in joined, joined
    assert len(found) >= 7, joined


def test_message_format_file_keypath_found_expected(tmp_path: Path) -> None:
    path = config(tmp_path, gateway="queue_batches = 3\n", tag='  amplitude = "lots"\n')
    found = problems(path)
    pattern = re.compile(r"^(?P<file>.+?): (?P<key>[\w.\[\]()-]+): found (?P<x>.+), expected (?P<y>.+)$")
    parsed = [pattern.match(line.strip()) for line in found]
    assert all(parsed), found
    assert {m["key"] for m in parsed if m} == {
        "gateway.queue_batches",
        "devices[0](press1).tags[0](temperature).amplitude",
    }
    assert all(m and m["file"].endswith("edgeos.toml") for m in parsed)
    amp = next(m for m in parsed if m and m["key"].endswith("amplitude"))
    assert amp["x"] == '"lots"' and "number" in amp["y"]


def test_key_path_names_device_and_tag_after_indices(tmp_path: Path) -> None:
    # `devices[2](press1).tags[17](flow).signal` is the 18th tag, `flow`, of the third device
    text = BASE_GATEWAY
    for dev in ("a", "b"):
        text += f'[[devices]]\nname = "{dev}"\nprotocol = "simulated"\n'
        text += '  [[devices.tags]]\n  name = "t"\n  signal = "sine"\n'
    text += '[[devices]]\nname = "press1"\nprotocol = "simulated"\n'
    for i in range(17):
        text += f'  [[devices.tags]]\n  name = "t{i}"\n  signal = "sine"\n'
    text += '  [[devices.tags]]\n  name = "flow"\n  signal = 42\n'
    path = write(tmp_path / "edgeos.toml", text)
    found = assert_refused(path)
    assert any(": devices[2](press1).tags[17](flow).signal: " in line for line in found), found


def test_tag_without_valid_name_keeps_its_index_alone(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        tail='  [[devices.tags]]\n  name = "bad name!"\n  signal = "sine"\n  amplitude = "lots"\n',
    )
    found = assert_refused(path)
    joined = "\n".join(found)
    assert "devices[0](press1).tags[1].amplitude" in joined, joined
    assert "tags[1](" not in joined, joined


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY + '\n[store]\nretention = = "90d"\n' + BASE_DEVICE,
    )
    found = assert_refused(path)
    assert any(ln.strip().startswith(f"{path}:6: ") for ln in found), found
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 2
    assert ":6: " in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("section", "line", "suggestion"),
    [
        ("gateway", "queue_batchs = 10\n", "queue_batches"),
        ("store", 'retension = "1d"\n', "retention"),
        ("device", 'poll_intervall = "1s"\n', "poll_interval"),
        ("tag", '  unti = "degC"\n', "unit"),
        ("tag", '  filters = [{ type = "deadband", abss = 0.5 }]\n', "abs"),
        ("tail", '[upstream]\nkeepalvie = "30s"\n', "keepalive"),
        ("tail", "[http]\nprot = 9180\n", "port"),
        ("tail", '[health]\nsync_lg = "5m"\n', "sync_lag"),
        ("tail", "[console]\nenabeld = true\n", "enabled"),
    ],
)
def test_unknown_key_is_an_error_with_closest_key_suggested(
    tmp_path: Path, section: str, line: str, suggestion: str
) -> None:
    path = config(tmp_path, **{section: line})
    found = assert_refused(path)
    bad = re.findall(r"(\w+) =", line)[-1]
    hit = [ln for ln in found if bad in ln]
    assert hit, found
    # the suggestion, not merely a list of every allowed key
    after_key = hit[0].split(bad, 1)[1]
    assert suggestion in re.split(r"allowed", after_key, maxsplit=1)[0], hit[0]


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = config(tmp_path, tail='[stroe]\nretention = "1d"\n')
    assert_refused(path, "stroe")


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ("gateway", 'queue_batches = "256"\n'),
        ("gateway", "log_level = 1\n"),
        ("device", 'enabled = "yes"\n'),
        ("tag", "  writable = 1\n"),
        ("tag", "  unit = 5\n"),
        ("device", 'tags_csv = ["a.csv"]\n'),
    ],
)
def test_wrong_types_are_refused(tmp_path: Path, section: str, line: str) -> None:
    path = config(tmp_path, **{section: line})
    key = line.split("=")[0].strip()
    found = assert_refused(path, key)
    assert any("found" in ln and "expected" in ln for ln in found if key in ln), found


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "a", "b"),
    [
        ("poll_interval", "250ms", "250000us"),
        ("poll_interval", "1.5s", "1500ms"),
        ("poll_interval", "1ms", "1000000ns"),
        ("poll_interval", "5m", "300s"),
        ("poll_interval", "1h", "60m"),
        ("poll_interval", "1d", "24h"),
    ],
)
def test_duration_units_mean_what_they_say(tmp_path: Path, key: str, a: str, b: str) -> None:
    x = load(config(tmp_path, device=f'{key} = "{a}"\n', name="a.toml"))
    y = load(config(tmp_path, device=f'{key} = "{b}"\n', name="b.toml"))
    z = load(config(tmp_path, device=f'{key} = "2ms"\n', name="c.toml"))
    assert x.devices == y.devices
    assert x.devices != z.devices


def test_duration_7d_accepted_for_retention(tmp_path: Path) -> None:
    x = load(config(tmp_path, store='retention = "7d"\n', name="a.toml"))
    y = load(config(tmp_path, store='retention = "168h"\n', name="b.toml"))
    assert x.store == y.store


@pytest.mark.parametrize("value", ["1", "1.5", '"250"', '"5 fortnights"', '"1x"', '"-1s"'])
def test_bad_durations_refused(tmp_path: Path, value: str) -> None:
    # "A bare number is refused, so `poll_interval = 1` cannot mean one thing to you and
    # another to edgeos."
    path = config(tmp_path, device=f"poll_interval = {value}\n")
    found = assert_refused(path, "poll_interval")
    assert any("expected" in ln and "duration" in ln for ln in found if "poll_interval" in ln), found


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ('"512MiB"', 512 * 2**20),
        ('"2GiB"', 2 * 2**30),
        ('"100MB"', 100 * 10**6),
        ('"2048KiB"', 2048 * 2**10),
        ('"2000kB"', 2000 * 10**3),
        ('"3GB"', 3 * 10**9),
        ('"1TiB"', 2**40),
        ('"1TB"', 10**12),
    ],
)
def test_size_units(tmp_path: Path, text: str, nbytes: int) -> None:
    # binary `KiB MiB GiB TiB`, decimal `kB MB GB TB`, or a whole number of bytes
    x = load(config(tmp_path, store=f"max_size = {text}\n", name="a.toml"))
    y = load(config(tmp_path, store=f"max_size = {nbytes}\n", name="b.toml"))
    z = load(config(tmp_path, store=f"max_size = {nbytes + 1}\n", name="c.toml"))
    assert x.store == y.store
    assert x.store != z.store


@pytest.mark.parametrize("value", ['"12 potatoes"', '"5XB"', "1.5", '"512KiB"', "1000"])
def test_bad_or_too_small_sizes_refused(tmp_path: Path, value: str) -> None:
    # max_size: size ≥ 1MiB
    assert_refused(config(tmp_path, store=f"max_size = {value}\n"), "store.max_size")


# --- documented ranges --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "ok", "bad"),
    [
        ("gateway", "shutdown_timeout", ['"100ms"', '"10m"'], ['"99ms"', '"11m"']),
        ("gateway", "queue_batches", ["4", "1000000"], ["3", "1000001"]),
        ("gateway", "log_level", ['"debug"', '"warning"', '"error"'], ['"verbose"', '"trace"']),
        ("store", "commit_interval", ['"0s"', '"1s"'], ['"2s"']),
        ("store", "fsync_interval", ['"0s"', '"60s"'], ['"61s"']),
        ("store", "retention", ['"1m"', '"90d"'], ['"59s"']),
        ("store", "memory_buffer", ['"1MiB"'], ['"1023KiB"']),
        ("store", "time_resolution", ['"1ns"', '"1s"'], ['"2s"']),
        ("store", "compact_after", ['"1s"', '"1d"'], ['"999ms"', '"25h"']),
        ("store", "unit_version", ["2", "3"], ["1", "4"]),
        ("device", "poll_interval", ['"1ms"', '"1d"'], ['"999us"', '"25h"']),
    ],
)
def test_documented_ranges(tmp_path: Path, section: str, key: str, ok: list[str], bad: list[str]) -> None:
    for i, value in enumerate(ok):
        path = config(tmp_path, name=f"ok{i}.toml", **{section: f"{key} = {value}\n"})
        assert problems(path) == [], f"{key} = {value} refused: {problems(path)}"
    for i, value in enumerate(bad):
        path = config(tmp_path, name=f"bad{i}.toml", **{section: f"{key} = {value}\n"})
        assert_refused(path, key)


# --- defaults -----------------------------------------------------------------------------


def test_gateway_defaults(tmp_path: Path) -> None:
    plain = load(config(tmp_path, name="a.toml"))
    explicit = load(
        config(
            tmp_path,
            gateway='log_level = "info"\nshutdown_timeout = "10s"\nqueue_batches = 256\n',
            name="b.toml",
        )
    )
    other = load(config(tmp_path, gateway="queue_batches = 257\n", name="c.toml"))
    assert plain.gateway == explicit.gateway
    assert plain.gateway != other.gateway


def test_store_defaults(tmp_path: Path) -> None:
    plain = load(config(tmp_path, name="a.toml"))
    explicit = load(
        config(
            tmp_path,
            store=(
                'commit_samples = 10000\ncommit_interval = "0s"\nfsync_interval = "2s"\n'
                'memory_buffer = "64MiB"\ntime_resolution = "1ms"\ncompact_after = "10m"\n'
                "unit_version = 3\n"
            ),
            name="b.toml",
        )
    )
    other = load(config(tmp_path, store='compact_after = "11m"\n', name="c.toml"))
    assert plain.store == explicit.store
    assert plain.store != other.store


def test_device_and_tag_defaults(tmp_path: Path) -> None:
    plain = load(config(tmp_path, name="a.toml"))
    explicit = load(
        config(
            tmp_path,
            device=('enabled = true\npoll_interval = "1s"\nreconnect_min = "500ms"\nreconnect_max = "30s"\n'),
            tag='  unit = ""\n  description = ""\n  writable = false\n  poll_interval = "1s"\n',
            name="b.toml",
        )
    )
    other = load(config(tmp_path, device='reconnect_min = "501ms"\n', name="c.toml"))
    assert plain.devices == explicit.devices
    assert plain.devices != other.devices


def test_tag_poll_interval_defaults_to_the_devices(tmp_path: Path) -> None:
    a = load(config(tmp_path, device='poll_interval = "250ms"\n', name="a.toml"))
    b = load(
        config(
            tmp_path,
            device='poll_interval = "250ms"\n',
            tag='  poll_interval = "250ms"\n',
            name="b.toml",
        )
    )
    assert a.devices == b.devices
    # and `edgeos check` counts the reads/s it asks for: 4 + 10 (one tag at 100ms)
    path = config(
        tmp_path,
        device='poll_interval = "250ms"\n',
        tail='  [[devices.tags]]\n  name = "fast"\n  signal = "ramp"\n  poll_interval = "100ms"\n',
        name="c.toml",
    )
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert re.search(r"\b14(\.0)? tag reads/s", r.stdout), r.stdout


def test_upstream_http_health_console_defaults(tmp_path: Path) -> None:
    plain = load(config(tmp_path, name="a.toml"))
    explicit = load(
        config(
            tmp_path,
            tail=(
                '[upstream]\nenabled = false\nhost = "127.0.0.1"\n'
                'topic = "edgeos/{gateway}/{device}/data"\n'
                'status_topic = "edgeos/{gateway}/status"\nmqtt_version = 5\n'
                'keepalive = "30s"\ntls = false\ntls_insecure = false\nmax_inflight = 16\n'
                'reconnect_min = "1s"\nreconnect_max = "60s"\nmax_message = "128KiB"\n'
                'replay_topic = "edgeos/{gateway}/replay"\nreplay_window = "24h"\n'
                '[http]\nenabled = true\naddress = "127.0.0.1"\nport = 9180\n'
                "max_connections = 32\nmetrics_per_tag = false\n"
                '[health]\ndevice_down = "60s"\nsync_lag = "5m"\n'
                "[console]\nenabled = true\nallow_anonymous = false\n"
            ),
            name="b.toml",
        )
    )
    assert plain.upstream == explicit.upstream
    assert plain.http == explicit.http
    assert plain.health == explicit.health
    assert plain.console == explicit.console
    other = load(config(tmp_path, tail='[upstream]\nreplay_window = "23h"\n', name="c.toml"))
    assert plain.upstream != other.upstream


def test_mqtt_version_forms(tmp_path: Path) -> None:
    # `5` or `"3.1.1"`; `"5"` is the same
    five = load(config(tmp_path, tail="[upstream]\nmqtt_version = 5\n", name="a.toml"))
    five_s = load(config(tmp_path, tail='[upstream]\nmqtt_version = "5"\n', name="b.toml"))
    v311 = load(config(tmp_path, tail='[upstream]\nmqtt_version = "3.1.1"\n', name="c.toml"))
    assert five.upstream == five_s.upstream
    assert v311.upstream != five.upstream
    assert_refused(config(tmp_path, tail="[upstream]\nmqtt_version = 4\n", name="d.toml"), "mqtt_version")


def test_max_size_default_is_a_quarter_of_the_file_system(tmp_path: Path) -> None:
    path = config(tmp_path)
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    m = re.search(r"max_size (\d+(?:\.\d+)?) MiB", r.stdout)
    assert m, r.stdout
    st = os.statvfs(tmp_path)
    quarter_mib = max(st.f_blocks * st.f_frsize / 4 / 2**20, 64)
    assert float(m[1]) == pytest.approx(quarter_mib, rel=0.02), r.stdout


def test_check_prints_the_configured_max_size(tmp_path: Path) -> None:
    r = run_cli("check", "-c", str(config(tmp_path, store='max_size = "8GiB"\n')))
    assert r.returncode == 0, r.stderr
    assert re.search(r"max_size (8192 MiB|8 GiB|8\.0 GiB)", r.stdout), r.stdout


# --- names, paths, devices ----------------------------------------------------------------


def test_names(tmp_path: Path) -> None:
    ok = "a" + "-._9" * 31 + "abc"  # 128 characters
    assert len(ok) == 128
    assert problems(config(tmp_path, tail=f'  [[devices.tags]]\n  name = "{ok}"\n  signal = "sine"\n')) == []
    bad = [
        ('[gateway]\nid = "gw 1"\ndata_dir = "data"\n' + BASE_DEVICE, "gateway.id"),
        (BASE_GATEWAY + BASE_DEVICE.replace('"press1"', '"-press"'), "devices[0]"),
        (BASE_GATEWAY + BASE_DEVICE.replace('"temperature"', '"' + ok + 'x"'), "tags[0]"),
        (BASE_GATEWAY + BASE_DEVICE.replace('"temperature"', '"tempé"'), "tags[0]"),
    ]
    for i, (text, where) in enumerate(bad):
        assert_refused(write(tmp_path / f"bad{i}.toml", text), where)


def test_duplicate_names_refused(tmp_path: Path) -> None:
    dup_tag = config(tmp_path, tail='  [[devices.tags]]\n  name = "temperature"\n  signal = "ramp"\n')
    assert_refused(dup_tag, "temperature")
    dup_dev = write(tmp_path / "d.toml", BASE_GATEWAY + BASE_DEVICE + BASE_DEVICE)
    assert_refused(dup_dev, "press1")


def test_device_needs_at_least_one_tag(tmp_path: Path) -> None:
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY + BASE_DEVICE + '[[devices]]\nname = "empty"\nprotocol = "simulated"\n',
    )
    assert_refused(path, "devices[1]")


def test_unknown_protocol_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY + BASE_DEVICE.replace('"simulated"', '"no_such_protocol"'),
    )
    assert_refused(path, "no_such_protocol")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfgdir = tmp_path / "etc"
    cfgdir.mkdir()
    write(cfgdir / "tags.csv", "name,signal\nflow,ramp\n")
    path = write(
        cfgdir / "edgeos.toml",
        '[gateway]\nid = "gw1"\ndata_dir = "data"\n'
        '[[devices]]\nname = "press1"\nprotocol = "simulated"\ntags_csv = "tags.csv"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("check", "-c", str(path), cwd=elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(cfgdir / "data") in r.stdout
    assert not (elsewhere / "data").exists()


# --- tags from CSV ------------------------------------------------------------------------


DOC_CSV = (
    "name;signal;amplitude;unit;poll_interval;writable;filters\n"
    "# lines starting with # and empty lines are skipped\n"
    "speed;sine;10;rpm;;yes;deadband(abs=0.5, max_silence=1m)\n"
    "torque;ramp;2.5;Nm;100ms;;\n"
)

DOC_CSV_AS_TOML = """
  [[devices.tags]]
  name = "speed"
  signal = "sine"
  amplitude = 10
  unit = "rpm"
  writable = true
  filters = [{ type = "deadband", abs = 0.5, max_silence = "1m" }]

  [[devices.tags]]
  name = "torque"
  signal = "ramp"
  amplitude = 2.5
  unit = "Nm"
  poll_interval = "100ms"
"""

DEVICE_HEAD = '[[devices]]\nname = "press1"\nprotocol = "simulated"\n'


def csv_device(tmp_path: Path, csv_text: str | bytes, name: str = "press1_tags.csv") -> Path:
    csv_path = tmp_path / name
    if isinstance(csv_text, bytes):
        csv_path.write_bytes(csv_text)
    else:
        csv_path.write_text(csv_text, encoding="utf-8")
    return write(
        tmp_path / f"{name}.toml",
        BASE_GATEWAY + DEVICE_HEAD + f'tags_csv = "{name}"\n',
    )


def toml_reference(tmp_path: Path) -> edgeos.Config:
    return load(write(tmp_path / "ref.toml", BASE_GATEWAY + DEVICE_HEAD + DOC_CSV_AS_TOML))


def test_documented_csv_example_equals_its_toml(tmp_path: Path) -> None:
    got = load(csv_device(tmp_path, DOC_CSV))
    assert got.devices == toml_reference(tmp_path).devices
    r = run_cli("check", "-c", str(tmp_path / "press1_tags.csv.toml"))
    assert r.returncode == 0, r.stderr
    assert re.search(r"\b11(\.0)? tag reads/s", r.stdout), r.stdout


@pytest.mark.parametrize(
    "variant",
    ["comma", "tab", "bom", "reordered", "blank_lines"],
)
def test_csv_delimiters_encoding_and_column_order(tmp_path: Path, variant: str) -> None:
    ref = toml_reference(tmp_path)
    if variant == "comma":
        text = (
            "name,signal,amplitude,unit,poll_interval,writable,filters\n"
            'speed,sine,10,rpm,,yes,"deadband(abs=0.5, max_silence=1m)"\n'
            "torque,ramp,2.5,Nm,100ms,,\n"
        )
    elif variant == "tab":
        text = DOC_CSV.replace(";", "\t")
    elif variant == "bom":
        text = "\ufeff" + DOC_CSV
    elif variant == "reordered":
        text = (
            "filters;unit;writable;name;poll_interval;amplitude;signal\n"
            "deadband(abs=0.5, max_silence=1m);rpm;yes;speed;;10;sine\n"
            ";Nm;;torque;100ms;2.5;ramp\n"
        )
    else:
        text = DOC_CSV.replace("\n", "\n\n", 2) + "\n# trailing comment\n\n"
    got = load(csv_device(tmp_path, text.encode("utf-8")))
    assert got.devices == ref.devices


@pytest.mark.parametrize(
    ("true_word", "false_word"),
    [("true", "false"), ("yes", "no"), ("1", "0"), ("y", "n"), ("on", "off"), ("x", "")],
)
def test_csv_booleans(tmp_path: Path, true_word: str, false_word: str) -> None:
    text = f"name;signal;writable\na;sine;{true_word}\nb;sine;{false_word}\n"
    got = load(csv_device(tmp_path, text))
    ref = load(
        write(
            tmp_path / "ref.toml",
            BASE_GATEWAY
            + DEVICE_HEAD
            + '  [[devices.tags]]\n  name = "a"\n  signal = "sine"\n  writable = true\n'
            + '  [[devices.tags]]\n  name = "b"\n  signal = "sine"\n  writable = false\n',
        )
    )
    assert got.devices == ref.devices


def test_csv_filter_chain_of_several_steps(tmp_path: Path) -> None:
    # several steps separated by `;`; in a `;` file the chain is quoted
    text = 'name;signal;filters\na;sine;"deadband(abs=0.5, max_silence=1m); moving_average(count=4)"\n'
    got = load(csv_device(tmp_path, text))
    ref_toml = (
        BASE_GATEWAY
        + DEVICE_HEAD
        + '  [[devices.tags]]\n  name = "a"\n  signal = "sine"\n'
        + '  filters = [{ type = "deadband", abs = 0.5, max_silence = "1m" },'
        + ' { type = "moving_average", count = 4 }]\n'
    )
    assert got.devices == load(write(tmp_path / "ref.toml", ref_toml)).devices


def test_csv_problem_names_file_and_line(tmp_path: Path) -> None:
    # `press1_tags.csv:3: amplitude: found "lots", expected a number`
    text = "name;signal;amplitude\n# a comment\nflow;sine;lots\n"
    found = assert_refused(csv_device(tmp_path, text))
    assert any(ln.strip().endswith('press1_tags.csv:3: amplitude: found "lots", expected a number') for ln in found), (
        found
    )
    r = run_cli("check", "-c", str(tmp_path / "press1_tags.csv.toml"))
    assert r.returncode == 2
    assert 'press1_tags.csv:3: amplitude: found "lots", expected a number' in r.stdout + r.stderr


def test_csv_unknown_column_refused(tmp_path: Path) -> None:
    found = assert_refused(csv_device(tmp_path, "name;signal;amplitud\nflow;sine;3\n"), "amplitud")
    assert any("press1_tags.csv" in ln for ln in found), found


def test_csv_and_toml_tag_names_must_be_unique_together(tmp_path: Path) -> None:
    write(tmp_path / "t.csv", "name,signal\ntemperature,ramp\n")
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY
        + DEVICE_HEAD
        + 'tags_csv = "t.csv"\n  [[devices.tags]]\n  name = "temperature"\n  signal = "sine"\n',
    )
    assert_refused(path, "temperature")
    # without the clash, both sources make the device's tags
    write(tmp_path / "t.csv", "name,signal\nflow,ramp\n")
    assert len(load(path).devices[0].tags) == 2


def test_missing_tags_csv_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "edgeos.toml", BASE_GATEWAY + DEVICE_HEAD + 'tags_csv = "nope.csv"\n')
    assert_refused(path, "nope.csv")


# --- filters ------------------------------------------------------------------------------


def test_filter_on_string_tag_refused_with_documented_message(tmp_path: Path) -> None:
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY
        + DEVICE_HEAD
        + '  [[devices.tags]]\n  name = "state"\n  signal = "text"\n'
        + '  filters = [{ type = "deadband", abs = 0.05 }]\n',
    )
    assert_refused(path, "filter 'deadband' needs a numeric tag; tag 'state' is a string")


def test_bool_tags_take_any_filter_and_unknown_filters_are_refused(tmp_path: Path) -> None:
    ok = config(
        tmp_path,
        tail=(
            '  [[devices.tags]]\n  name = "run"\n  signal = "bool"\n  filters = [{ type = "deadband", abs = 0.5 }]\n'
        ),
    )
    assert problems(ok) == []
    bad = config(tmp_path, tag='  filters = [{ type = "no_such_filter" }]\n', name="b.toml")
    assert_refused(bad, "no_such_filter")


# --- upstream, http, health, console ------------------------------------------------------


def test_upstream_password_never_in_the_config(tmp_path: Path) -> None:
    path = config(tmp_path, tail='[upstream]\nusername = "u"\npassword = "secret"\n')
    found = assert_refused(path, "upstream.password")
    assert not any("secret" in ln for ln in found), found


def test_upstream_servers(tmp_path: Path) -> None:
    good = config(
        tmp_path,
        tail='[upstream]\nservers = ["a.example:1883", "b.example", "[::1]:8883", "[fe80::1]"]\n',
        name="good.toml",
    )
    assert problems(good) == []
    bad = config(
        tmp_path,
        tail='[upstream]\nservers = ["ok.example:1883", "::1:1883", "[10.0.0.1]:1883", "h:notaport"]\n',
        name="bad.toml",
    )
    found = assert_refused(bad)
    joined = "\n".join(found)
    # "Every malformed entry is named in one error."
    server_lines = [ln for ln in found if "upstream.servers" in ln]
    assert len(server_lines) == 1, found
    for entry in ("::1:1883", "[10.0.0.1]:1883", "h:notaport"):
        assert entry in server_lines[0], joined
    assert "ok.example" not in joined.replace("upstream.servers", ""), joined


def test_upstream_max_message_at_least_4kib(tmp_path: Path) -> None:
    assert problems(config(tmp_path, tail='[upstream]\nmax_message = "4KiB"\n', name="a.toml")) == []
    assert_refused(config(tmp_path, tail='[upstream]\nmax_message = "4095"\n', name="b.toml"), "max_message")


def test_http_tls_cert_and_key_both_or_neither(tmp_path: Path) -> None:
    write(tmp_path / "cert.pem", "x")
    assert_refused(config(tmp_path, tail='[http]\ntls_cert = "cert.pem"\n'), "tls_")


def test_console_off_loopback_needs_password_or_anonymous(tmp_path: Path) -> None:
    refused = config(tmp_path, tail='[http]\naddress = "0.0.0.0"\n', name="a.toml")
    assert_refused(refused)
    allowed = config(
        tmp_path,
        tail='[http]\naddress = "0.0.0.0"\n[console]\nallow_anonymous = true\n',
        name="b.toml",
    )
    assert problems(allowed) == []


def test_health_devices_must_name_configured_devices(tmp_path: Path) -> None:
    good = config(tmp_path, tail='[health.devices]\npress1 = "10m"\n', name="a.toml")
    assert load(good).health != load(config(tmp_path, name="b.toml")).health
    assert_refused(config(tmp_path, tail='[health.devices]\npress2 = "10m"\n', name="c.toml"), "press2")
    assert_refused(config(tmp_path, tail="[health.devices]\npress1 = 600\n", name="d.toml"), "press1")


def test_inline_tags_equal_tag_tables(tmp_path: Path) -> None:
    inline = load(
        write(
            tmp_path / "a.toml",
            BASE_GATEWAY
            + DEVICE_HEAD
            + 'tags = [{ name = "temperature", signal = "sine" }, { name = "b", signal = "ramp" }]\n',
        )
    )
    tables = load(config(tmp_path, tail='  [[devices.tags]]\n  name = "b"\n  signal = "ramp"\n', name="b.toml"))
    assert inline.devices == tables.devices


def test_protocol_checks_reported_at_the_tag_and_csv_row(tmp_path: Path) -> None:
    # "A protocol's own checks of a tag are reported at the same place (its CSV row for a CSV
    # tag)."
    toml = write(tmp_path / "x.toml", BASE_GATEWAY + BASE_DEVICE.replace('"sine"', '"bogus"'))
    found = assert_refused(toml)
    assert any(f"{toml}: devices[0](press1).tags[0](temperature).signal: " in ln for ln in found), found
    csv = csv_device(tmp_path, "name,signal\nok,sine\n\nflow,bogus\n")
    found = assert_refused(csv)
    assert any(ln.strip().startswith(f"{tmp_path / 'press1_tags.csv'}:4: ") and "signal" in ln for ln in found), found


def test_several_csv_and_toml_problems_in_one_pass(tmp_path: Path) -> None:
    write(
        tmp_path / "t.csv",
        'name;signal;amplitude;filters\nok;sine;1;\nbad1;sine;lots;\nbad2;sine;1;"deadband(abss=1)"\n',
    )
    path = write(
        tmp_path / "edgeos.toml",
        BASE_GATEWAY.replace('"gw1"', '"gw 1"')
        + DEVICE_HEAD
        + 'tags_csv = "t.csv"\n'
        + '  [[devices.tags]]\n  name = "temperature"\n  signal = "sine"\n  amplitude = "x"\n',
    )
    found = assert_refused(path)
    joined = "\n".join(found)
    assert "gateway.id" in joined, joined
    assert "devices[0](press1).tags[0](temperature).amplitude" in joined, joined
    assert f"{tmp_path / 't.csv'}:3: amplitude" in joined, joined
    assert f"{tmp_path / 't.csv'}:4: " in joined and "abss" in joined, joined


def test_names_must_start_with_letter_or_digit(tmp_path: Path) -> None:
    for i, name in enumerate(["_press", ".press", "-press", "press/1", ""]):
        text = BASE_GATEWAY + BASE_DEVICE.replace('"press1"', f'"{name}"')
        assert_refused(write(tmp_path / f"n{i}.toml", text), "devices[0]")
    for i, name in enumerate(["9press", "P.r_e-s"]):
        text = BASE_GATEWAY + BASE_DEVICE.replace('"press1"', f'"{name}"')
        assert problems(write(tmp_path / f"ok{i}.toml", text)) == []


def test_http_tls_key_without_cert_refused(tmp_path: Path) -> None:
    write(tmp_path / "key.pem", "x")
    assert_refused(config(tmp_path, tail='[http]\ntls_key = "key.pem"\n'), "tls_")


def test_upstream_host_with_servers_warns(tmp_path: Path) -> None:
    # "with `servers` given, `host` is not used (a warning says so)"
    path = config(
        tmp_path,
        tail='[upstream]\nenabled = true\nhost = "x.example"\nservers = ["a.example:1883"]\n',
    )
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert any("host" in ln and "x.example" in ln for ln in out.splitlines()), out
    plain = config(tmp_path, tail='[upstream]\nenabled = true\nservers = ["a.example:1883"]\n', name="b.toml")
    r2 = run_cli("check", "-c", str(plain))
    assert r2.returncode == 0
    assert "is not used" not in r2.stdout + r2.stderr
