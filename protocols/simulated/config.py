"""Options of the simulated protocol (device and tag keys)."""

from __future__ import annotations

from edgeos.config.schema import Field

SIGNALS = ("sine", "ramp", "random_walk", "step", "square", "counter", "bool", "text")

DEVICE_FIELDS = {
    "seed": Field("int", 0, help="random seed, so runs are repeatable"),
    "fail_after": Field(
        "duration", None, min=1_000_000, help="raise a device error after running this long (fault drills)"
    ),
    "fail_connect": Field("bool", False, help="refuse every connection (fault drills)"),
    "connect_delay": Field("duration", "0s", help="time a connection takes"),
}

TAG_FIELDS = {
    "signal": Field("choice", "sine", choices=SIGNALS),
    "amplitude": Field("float", 1.0),
    "offset": Field("float", 0.0),
    "period": Field("duration", "60s", min=1_000_000),
    "noise": Field("float", 0.0, min=0),
    "resolution": Field("float", 0.0, min=0, help="quantise values to this step, as registers do"),
    "states": Field("list", ["RUN", "IDLE", "ALARM"], item="str", help="values of a text signal"),
}
