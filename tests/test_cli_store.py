"""Query commands against a real store: tags, query (raw, aggregated, formats), export."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeos import Batch, Quality, TagMeta, ValueKind
from edgeos.cli import app
from edgeos.config.units import parse_time_ns
from edgeos.store import StoreWriter

T0 = 1_767_225_600 * 10**9
SEC = 10**9
TAGS = [
    TagMeta(0, "press", "temp", unit="degC"),
    TagMeta(1, "oven", "temp"),
    TagMeta(2, "oven", "state", ValueKind.STRING),
]


@pytest.fixture
def store_dir(tmp_path):
    w = StoreWriter(tmp_path, TAGS)
    for s in range(180):
        t = T0 + s * SEC
        w.write(
            [
                Batch("press", np.array([0], np.int32), [t], [float(s)], np.zeros(1, np.uint32)),
                Batch(
                    "oven",
                    np.array([1, 2], np.int32),
                    [t, t],
                    [s * 10.0, np.nan],
                    np.array([Quality.BAD_TIMEOUT if s == 30 else 0, 0], np.uint32),
                    np.array([None, "HEAT" if s < 90 else "HOLD"], object),
                ),
            ]
        )
    w.maintain(T0 + 10**12, compact_all=True)  # half compacted ...
    w.write(
        [Batch("press", np.array([0], np.int32), [T0 + 180 * SEC], [180.0], np.zeros(1, np.uint32))]
    )  # ... half hot
    w.close()
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def test_tags_lists_last_values(store_dir):
    code, out = run("tags", "--data-dir", str(store_dir))
    assert code == 0, out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert "180.0" in lines["press/temp"] and "degC" in lines["press/temp"]
    assert "1790.0" in lines["oven/temp"] and "HOLD" in lines["oven/state"]


def test_tags_takes_the_config_positionally_as_run_and_status_do(store_dir):
    cfg = store_dir / "edgeos.toml"
    cfg.write_text(f'[gateway]\nid = "g"\ndata_dir = "{store_dir}"\n')
    code, out = run("tags", str(cfg))
    assert code == 0 and "press/temp" in out, out
    assert run("tags", str(cfg), "-c", str(cfg))[0] == 0  # the same file twice: fine
    code, out = run("tags", str(cfg), "-c", str(store_dir / "other.toml"))
    assert code == 2 and "two configs given" in out, out


def test_query_raw_csv_with_iso_range(store_dir):
    code, out = run(
        "query", "oven/temp", "--since", "2026-01-01T00:00:10Z", "--until", "2026-01-01T00:00:19Z",
        "--data-dir", str(store_dir), "--format", "csv",
    )  # fmt: skip
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["value"]) for r in rows] == [s * 10.0 for s in range(10, 20)]
    assert rows[0]["time"] == "2026-01-01T00:00:10.000Z" and rows[0]["quality"] == "GOOD"


def test_query_shows_bad_samples_with_their_reason(store_dir):
    code, out = run(
        "query", "oven/temp", "--since", "@1767225630", "--until", "@1767225630", "--data-dir", str(store_dir)
    )
    assert code == 0 and "BAD_TIMEOUT" in out


def test_query_aggregates_into_clock_aligned_buckets(store_dir):
    code, out = run(
        "query", "press/temp", "oven/temp", "--since", "@1767225600", "--until", "@1767225779",
        "--every", "1m", "--agg", "max", "--format", "json", "--data-dir", str(store_dir),
    )  # fmt: skip
    assert code == 0, out
    rows = [json.loads(ln) for ln in out.splitlines()]
    press = [(r["time"], r["max"], r["samples"]) for r in rows if r["tag"] == "press/temp"]
    assert press == [
        ("2026-01-01T00:00:00.000Z", 59.0, 60),
        ("2026-01-01T00:01:00.000Z", 119.0, 60),
        ("2026-01-01T00:02:00.000Z", 179.0, 60),
    ]
    oven = [r["samples"] for r in rows if r["tag"] == "oven/temp"]
    assert oven == [59, 60, 60]  # the Bad sample is not aggregated


def test_query_errors_are_clear(store_dir):
    code, out = run("query", "temp", "--data-dir", str(store_dir))
    assert code == 1 and "ambiguous" in out and "oven/temp" in out and "press/temp" in out
    code, out = run("query", "oven/nope", "--data-dir", str(store_dir))
    assert code == 1 and "no tag 'oven/nope'" in out
    code, out = run("query", "oven/temp", "--since", "yesterday-ish", "--data-dir", str(store_dir))
    assert code == 2 and "--since" in out and "expected a time" in out
    code, out = run("tags", "--data-dir", str(store_dir / "nowhere"))
    assert code == 1 and "no edgeos store" in out
    # An aggregate without buckets, or buckets of 0, is said, not answered with raw rows.
    code, out = run("query", "oven/temp", "--agg", "max", "--data-dir", str(store_dir))
    assert code == 2 and "--agg max needs --every" in out
    code, out = run("query", "oven/temp", "--every", "0s", "--data-dir", str(store_dir))
    assert code == 2 and "--every" in out and "longer than 0" in out
    # A file that cannot be written: one line, not a traceback.
    code, out = run(
        "export", "--since", "1h", "--out", str(store_dir / "no" / "such" / "x.csv"), "--data-dir", str(store_dir)
    )
    assert code == 1 and out.startswith("edgeos: --out ") and "Traceback" not in out


def test_export_streams_every_sample_sorted_by_time(store_dir, tmp_path):
    target = tmp_path / "out.csv"
    code, out = run(
        "export", "--since", "@1767225600", "--until", "@1767229200", "--out", str(target), "--data-dir", str(store_dir)
    )
    assert code == 0, out
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 181 + 180 + 180
    times = [r["time"] for r in rows]
    assert times == sorted(times)
    states = [r["value"] for r in rows if r["tag"] == "oven/state"]
    assert states[0] == "HEAT" and states[-1] == "HOLD"
    bad = [r for r in rows if r["quality"] == "BAD_TIMEOUT"]
    assert len(bad) == 1 and bad[0]["tag"] == "oven/temp"


def test_export_from_1970_reads_only_the_stored_span(store_dir, tmp_path, monkeypatch):
    # An independent tester's export of 140 rows with --since @0 took 15.8 s: it read every
    # hour since 1970, one query per tag and hour. Windows now cover the stored span only.
    from edgeos.store.reader import StoreReader

    calls = []
    real = StoreReader.history

    def counted(self, tag, since_ns=None, until_ns=None):
        calls.append((since_ns, until_ns))
        return real(self, tag, since_ns, until_ns)

    monkeypatch.setattr(StoreReader, "history", counted)
    target = tmp_path / "out.csv"
    code, out = run("export", "--since", "@0", "--until", "now", "--out", str(target), "--data-dir", str(store_dir))
    assert code == 0, out
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 181 + 180 + 180  # every sample, as from the narrow range
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert len(calls) <= 3 * 2  # 3 tags, the 3 minutes stored within at most 2 hourly windows
    assert min(lo for lo, _ in calls) >= T0


def test_export_skips_the_empty_years_between_an_old_sample_and_the_rest(tmp_path, monkeypatch):
    """One sample years old (an OPC UA value whose source time is the PLC's last write) made
    the stored span years long, and an export read every hour of it, one query per tag and
    hour (23 s for a handful of rows, an independent tester's finding). After an empty window
    the next starts where the tags have data again: compacted or hot, every sample once."""
    from edgeos.store.reader import StoreReader

    old = T0 - 5 * 365 * 24 * 3600 * SEC
    w = StoreWriter(tmp_path, TAGS)
    w.write([Batch("press", np.array([0], np.int32), [old], [-1.0], np.zeros(1, np.uint32))])
    for s in range(10):
        w.write([Batch("oven", np.array([1], np.int32), [T0 + s * 3600 * SEC], [float(s)], np.zeros(1, np.uint32))])
    w.maintain(T0 + 5 * 3600 * SEC, compact_all=True)  # the old one and the first hours compacted
    w.write([Batch("press", np.array([0], np.int32), [T0 + 20 * 3600 * SEC], [7.0], np.zeros(1, np.uint32))])
    # One hot unit reaching across the years: an old source time beside today's in one poll.
    both = [old + SEC, T0 + 30 * 3600 * SEC]
    w.write([Batch("oven", np.array([1, 1], np.int32), both, [-2.0, 8.0], np.zeros(2, np.uint32))])
    w.close()
    calls = []
    real = StoreReader.history

    def counted(self, tag, since_ns=None, until_ns=None):
        calls.append(since_ns)
        return real(self, tag, since_ns, until_ns)

    monkeypatch.setattr(StoreReader, "history", counted)
    target = tmp_path / "out.csv"
    code, out = run("export", "--since", "@0", "--until", "now", "--out", str(target), "--data-dir", str(tmp_path))
    assert code == 0, out
    rows = [(r["tag"], float(r["value"])) for r in csv.DictReader(target.open())]
    want = [("press/temp", -1.0), ("oven/temp", -2.0)] + [("oven/temp", float(s)) for s in range(10)]
    assert rows == want + [("press/temp", 7.0), ("oven/temp", 8.0)]
    assert len(calls) < 3 * 40, len(calls)  # about 31 hours of data, not 5 years of hours


def test_reading_commands_need_no_secret_from_the_environment(store_dir, tmp_path, monkeypatch):
    # The upstream password comes from the service's environment, not the engineer's shell:
    # status, tags and query read the store without it (an independent tester's finding);
    # check and run still refuse the config without it.
    monkeypatch.delenv("EDGEOS_TEST_UNSET_PW", raising=False)
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        f'[gateway]\nid="g"\ndata_dir="{store_dir}"\n[[devices]]\nname="x"\nprotocol="simulated"\n'
        'tags=[{name="t"}]\n[upstream]\nenabled=true\nhost="127.0.0.1"\nusername="u"\n'
        'password_env="EDGEOS_TEST_UNSET_PW"\n'
    )
    code, out = run("tags", "-c", str(cfg))
    assert code == 0 and "press/temp" in out, out
    code, out = run("query", "press/temp", "--since", "@1767225779", "--until", "@1767225781", "-c", str(cfg))
    assert code == 0 and "179.0" in out, out
    code, out = run("status", "-c", str(cfg))
    assert "password_env" not in out and "invalid config" not in out  # not running here: says so
    code, out = run("check", str(cfg))
    assert code != 0 and "EDGEOS_TEST_UNSET_PW" in out and "is not set" in out


def test_reading_commands_read_the_store_of_a_config_invalid_elsewhere(store_dir, tmp_path):
    # A config mid-edit (or refused by a reload while the daemon runs on the one it loaded):
    # status, tags and query still read the data directory its [gateway] table names, and say
    # that the config is invalid; check refuses it. A [gateway] table of its own problems
    # leaves nothing to read: every problem is listed, as before.
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        f'[gateway]\nid="g"\ndata_dir="{store_dir}"\n[[devices]]\nname="x"\nprotocol="simulated"\n'
        'tags=[{name="t"}]\npoll_intervall="1s"\n'
    )
    warning = f"invalid config (1 problem; `edgeos check` lists them): reading {store_dir}"
    code, out = run("tags", "-c", str(cfg))
    assert code == 0 and "press/temp" in out and warning in out, out
    code, out = run("query", "press/temp", "--since", "@1767225779", "--until", "@1767225781", "-c", str(cfg))
    assert code == 0 and "179.0" in out and warning in out, out
    code, out = run("status", "-c", str(cfg))
    assert code == 1 and warning in out and f"no status in {store_dir}" in out, out
    code, out = run("check", str(cfg))
    assert code == 2 and "poll_intervall" in out, out

    cfg.write_text('[gateway]\nid="g"\n[[devices]]\nname="x"\nprotocol="nope"\n')
    for args in (("tags",), ("status",)):
        code, out = run(*args, "-c", str(cfg))
        assert code == 2 and "data_dir" in out and "nope" in out and "[gateway] table names" not in out, out


def test_query_reads_the_data_dir_from_the_config(store_dir, tmp_path):
    cfg = tmp_path / "edgeos.toml"
    cfg.write_text(
        f'[gateway]\nid="g"\ndata_dir="{store_dir}"\n[[devices]]\nname="x"\nprotocol="simulated"\ntags=[{{name="t"}}]\n'
    )
    code, out = run("query", "press/temp", "--since", "@1767225779", "--until", "@1767225781", "-c", str(cfg))
    assert code == 0 and "179.0" in out and "180.0" in out


def test_time_forms():
    now = 1_800_000_000 * SEC
    assert parse_time_ns("now", now) == now
    assert parse_time_ns("1h", now) == parse_time_ns("-1h", now) == parse_time_ns("1h ago", now) == now - 3600 * SEC
    assert parse_time_ns("2026-01-01T00:00:00Z", now) == T0
    assert parse_time_ns("2026-01-01T08:00:00+08:00", now) == T0
    assert parse_time_ns("@1767225600.5", now) == T0 + SEC // 2
    # Exact to the nanosecond, not through a float (which put .501 64 ns early, so a bound at a
    # sample's millisecond left the sample out).
    assert parse_time_ns("@1796431280.501", now) == 1796431280_501_000_000
    assert parse_time_ns("@1796431280.000000001", now) == 1796431280_000_000_001
    assert parse_time_ns("2026-12-05T00:41:20.501Z", now) == 1796431280_501_000_000
    assert parse_time_ns("2026-12-05T08:41:20.501+08:00", now) == 1796431280_501_000_000
    with pytest.raises(ValueError, match="expected a time"):
        parse_time_ns("tuesday", now)
    # Outside int64 nanoseconds: a clear error, not a crash where the store is asked.
    for far in ("1600-12-31T23:00Z", "3000-01-01", "@1e300", "@inf", "1000000d"):
        with pytest.raises(ValueError, match="expected a time between 1678 and 2262"):
            parse_time_ns(far, now)


def test_second_daemon_on_the_same_data_dir_is_refused(write_config):
    cfg = write_config(
        '[gateway]\nid="g"\ndata_dir="data"\n[[devices]]\nname="x"\nprotocol="simulated"\ntags=[{name="t"}]\n'
    )
    edgeos = str(Path(sys.executable).with_name("edgeos"))
    first = subprocess.Popen([edgeos, "run", "-c", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "gateway g:" not in (line := first.stderr.readline()):
            assert line and time.monotonic() < deadline
        second = subprocess.run([edgeos, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "is in use by another edgeos process (pid" in second.stderr and str(first.pid) in second.stderr
        assert "stopped:" not in second.stderr  # it never started: no "stopped: 0 samples read" first
    finally:
        first.terminate()
        first.wait(20)
    assert first.returncode == 0


def test_values_print_without_binary_noise_and_bools_as_words(tmp_path):
    tags = [
        TagMeta(0, "plc", "level"),  # a register scaled by 0.01
        TagMeta(1, "plc", "flow"),  # a float32 register
        TagMeta(2, "plc", "run", ValueKind.BOOL),
        TagMeta(3, "plc", "exact"),  # a float64 value that needs its digits
    ]
    w = StoreWriter(tmp_path, tags)
    values = [6248 * 0.01, float(np.float32(123.456)), 1.0, 1234567.875]
    assert repr(values[0]) == "62.480000000000004" and repr(values[1]) == "123.45600128173828"
    w.write([Batch("plc", np.arange(4, dtype=np.int32), [T0] * 4, values, np.zeros(4, np.uint32))])
    w.close()
    code, out = run("tags", "--data-dir", str(tmp_path))
    assert code == 0, out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    assert lines["plc/level"][1] == "62.48" and lines["plc/flow"][1] == "123.456"
    assert lines["plc/run"][1] == "true" and lines["plc/exact"][1] == "1234567.875"
    code, out = run(
        "query", "plc/run", "--since", "@1767225599", "--until", "@1767225601", "-f", "csv", "--data-dir", str(tmp_path)
    )
    assert out.splitlines()[0].startswith("time,tag,")  # the same column order as export
    assert out.splitlines()[1].split(",")[2] == "true"
    code, out = run(
        "query",
        "plc/run",
        "--since",
        "@1767225599",
        "--until",
        "@1767225601",
        "-f",
        "json",
        "--data-dir",
        str(tmp_path),
    )
    assert json.loads(out.splitlines()[0])["value"] is True


def test_query_says_when_nothing_matched_and_refuses_a_reversed_range(store_dir):
    code, out = run("query", "oven/temp", "--since", "@1000", "--until", "@2000", "--data-dir", str(store_dir))
    assert code == 0 and "no samples of oven/temp" in out
    # Before the oldest sample: said, so the empty answer is not read as a silent machine.
    assert "(the store's oldest sample is from 2026-01-01T00:00:00.000Z;" in out
    code, out = run(
        "query", "oven/temp", "--since", "@1767225600", "--until", "@1767225601.5", "--data-dir", str(store_dir)
    )
    assert code == 0 and "oldest" not in out
    code, out = run(
        "query", "oven/state", "--since", "@1767225900", "--until", "@1767226000", "--data-dir", str(store_dir)
    )
    assert code == 0 and "no samples of oven/state" in out and "oldest" not in out  # after it: nothing to say
    code, out = run("query", "oven/temp", "--since", "@2000", "--until", "@1000", "--data-dir", str(store_dir))
    assert code == 2 and "is before --since" in out


def test_values_are_shown_without_binary_noise_and_whole_numbers_exact() -> None:
    from edgeos.cli.store import clean_float

    assert clean_float(123.45600128173828) == 123.456  # a float32 register's value
    assert clean_float(62.480000000000004) == 62.48  # float64 arithmetic noise, 15 digits
    # Whole numbers exact, though 2**53 is exactly a float32 too (its short form 9.007199e+15
    # would be another number) and the other is longer than 15 digits.
    assert clean_float(2.0**53) == 9007199254740992.0
    assert clean_float(7.262385979038285e16) == 7.262385979038285e16


def test_a_range_ending_at_a_sample_s_millisecond_includes_it(tmp_path):
    """Both ends are included: a sub-second bound is exact (through a float, --until at .501
    was 64 ns early and left the sample stamped .501 out)."""
    t = 1796431280_501_000_000
    w = StoreWriter(tmp_path, TAGS)
    w.write([Batch("press", np.array([0, 0], np.int32), [t - 500 * 10**6, t], [1.0, 2.0], np.zeros(2, np.uint32))])
    w.close()
    for since, until in (("@1796431280.001", "@1796431280.501"), ("2026-12-05T00:41:20.501Z",) * 2):
        code, out = run(
            "query", "press/temp", "--since", since, "--until", until, "--format", "csv", "--data-dir", str(tmp_path)
        )
        rows = list(csv.DictReader(io.StringIO(out)))
        assert code == 0 and rows[-1]["time"] == "2026-12-05T00:41:20.501Z" and float(rows[-1]["value"]) == 2, out
