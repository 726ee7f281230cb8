"""Latency per stage (EDGEOS_E2E_TRACE=1): the daemon's trace (edgeos/trace.py) joined with
the subscriber's arrivals. Per batch read: sample time -> emitted by the adapter -> taken by the
pipeline -> out of the pipeline -> commit started -> commit returned -> first sync read that
covers its unit -> arrival at the subscriber. Printed as `# e2e stage ...` lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STAGES = ("adapter", "to_pipeline", "pipeline", "to_commit", "commit", "to_sync_read", "to_arrival", "total")


def _kind(device: str) -> str:
    k = device.rstrip("0123456789")
    return {"m": "modbus_1s", "fast": "modbus_100ms", "line": "serial", "opc": "opcua"}.get(k, k)


def breakdown(trace_path: Path, units: list[tuple[str, int, int]], t0: float, t1: float) -> list[str]:
    doc = json.loads(trace_path.read_text())
    rows = np.array(doc["rows"], np.int64).reshape(-1, len(doc["cols"]))
    dev = np.array(doc["device"], np.int64)
    names = doc["devices"]
    out = []
    reads = np.array(doc["reads"], np.int64).reshape(-1, 2)
    reads = reads[np.argsort(reads[:, 0], kind="stable")]
    covered = np.maximum.accumulate(reads[:, 1]) if len(reads) else np.zeros(0, np.int64)
    # Arrivals per device, by newest sample time.
    per_dev: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for d in {u[0] for u in units}:
        a = np.array([(u[1], u[2]) for u in units if u[0] == d], np.int64)
        a = a[np.argsort(a[:, 0], kind="stable")]
        per_dev[d] = (a[:, 0], a[:, 1])
    stage_rows: dict[str, list[np.ndarray]] = {}
    for i, name in enumerate(names):
        r = rows[(dev == i) & (rows[:, 5] > 0) & (rows[:, 1] >= t0 * 1e9) & (rows[:, 1] < t1 * 1e9)]
        if not len(r) or name not in per_dev:
            continue
        k = np.searchsorted(covered, r[:, 6]) if len(covered) else np.zeros(len(r), np.intp)
        ok = k < len(covered)
        read_t = np.where(ok, reads[np.minimum(k, len(reads) - 1), 0], 0) if len(reads) else np.zeros(len(r))
        ts_u, arr_u = per_dev[name]
        j = np.searchsorted(ts_u, r[:, 0] - 1_000_000)  # units' times are rounded to the store's resolution
        ok &= j < len(ts_u)
        arrival = np.where(j < len(ts_u), arr_u[np.minimum(j, len(ts_u) - 1)], 0)
        r, read_t, arrival = r[ok], read_t[ok], arrival[ok]
        st = np.stack(
            [
                r[:, 1] - r[:, 0],
                r[:, 2] - r[:, 1],
                r[:, 3] - r[:, 2],
                r[:, 4] - r[:, 3],
                r[:, 5] - r[:, 4],
                read_t - r[:, 5],
                arrival - read_t,
                arrival - r[:, 0],
            ],
            1,
        )
        stage_rows.setdefault(_kind(name), []).append(st / 1e6)
    for kind, parts in sorted(stage_rows.items()):
        st = np.concatenate(parts)
        cells = [
            f"{s} {np.percentile(st[:, c], 50):.1f}/{np.percentile(st[:, c], 99):.1f}" for c, s in enumerate(STAGES)
        ]
        out.append(f"# e2e stage {kind} (batches {len(st)}, p50/p99 ms): " + ", ".join(cells))
    ev: dict[str, list[float]] = {}
    for kind, a, b in doc["events"]:
        if t0 * 1e9 <= a < t1 * 1e9:
            ev.setdefault(kind, []).append((b - a) / 1e6)
    for kind, d in sorted(ev.items()):
        x = np.array(d)
        out.append(
            f"# e2e stage {kind}: {len(x)} x, p50 {np.percentile(x, 50):.1f} ms, max {x.max():.1f} ms, "
            f"sum {x.sum():.0f} ms"
        )
    return out
