"""The peer of the end-to-end bench: ThingsBoard IoT Gateway (`thingsboard-gateway` from PyPI)
in a virtual environment of its own, its Modbus connector on the bench's Modbus devices and its
MQTT client on the bench's broker, as a user would configure it (defaults kept, except what a
bench must set: the broker, no remote configuration, no statistics telemetry).

The gateway asks ThingsBoard for its session limits once at start-up (an RPC
`getSessionLimits` on `v1/devices/me/rpc/request/N`) and sends no telemetry until it gets an
answer: `SESSION_LIMITS` is the answer the bench's subscriber publishes for the server (no rate
limits, ThingsBoard's usual in-flight window and payload size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
VENV = HERE.parent / ".peer-venv"
PACKAGES = ["thingsboard-gateway", "pymodbus==3.9.2", "pyserial", "pyserial-asyncio"]
"""pymodbus 3.9.2 is the version its Modbus connector demands (it pip-installs it at import
otherwise); installing it here keeps downloads out of the measured run."""

RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"
TELEMETRY = "v1/gateway/telemetry"
SESSION_LIMITS = {"rateLimits": {}, "gatewayRateLimits": {}, "maxInflightMessages": 100, "maxPayloadSize": 65536}

# Our register types as the peer's Modbus connector names them (type, registers). Bits and
# bytes of a register are read as the register: one request and one sample per tag either way.
TYPES = {
    "float32": ("32float", 2),
    "int32": ("32int", 2),
    "uint32": ("32uint", 2),
    "int16": ("16int", 1),
    "uint16": ("16uint", 1),
}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(log) -> str | None:
    """Create the venv and install the peer when missing; None when ready, else why not."""
    try:
        if not python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        probe = [str(python()), "-c", "import thingsboard_gateway, pymodbus; assert pymodbus.__version__ == '3.9.2'"]
        if subprocess.run(probe, capture_output=True, timeout=120).returncode != 0:
            log("# e2e: installing thingsboard-gateway into bench/.peer-venv (once)")
            r = subprocess.run(
                [str(python()), "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True, timeout=900
            )
            if r.returncode != 0:
                return f"pip install failed: {r.stderr.strip()[-500:]}"
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def version() -> str:
    r = subprocess.run(
        [str(python()), "-c", "import importlib.metadata as m; print(m.version('thingsboard-gateway'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.stdout.strip() or "?"


def write_config(root: Path, broker_port: int, devices: list[tuple[str, int, int, list[tuple[str, str, int]]]]) -> Path:
    """Config dir for the peer. `devices`: (name, port, poll period ms, [(key, type, register)])."""
    conf = root / "config"
    conf.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    slaves = []
    for name, port, period_ms, tags in devices:
        timeseries = [
            {"tag": key, "type": TYPES[typ][0], "functionCode": 3, "objectsCount": TYPES[typ][1], "address": reg}
            for key, typ, reg in tags
        ]
        slaves.append(
            {
                "host": "127.0.0.1",
                "port": port,
                "type": "tcp",
                "method": "socket",
                "unitId": 1,
                "deviceName": name,
                "deviceType": "default",
                "timeout": 35,
                "byteOrder": "BIG",
                "wordOrder": "BIG",
                "retries": 3,
                "retryOnEmpty": True,
                "retryOnInvalid": True,
                "pollPeriod": period_ms,
                "connectAttemptTimeMs": 5000,
                "connectAttemptCount": 5,
                "waitAfterFailedAttemptsMs": 300000,
                "attributes": [],
                "timeseries": timeseries,
                "attributeUpdates": [],
                "rpc": [],
            }
        )
    (conf / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}))
    gateway = {
        "thingsboard": {
            "host": "127.0.0.1",
            "port": broker_port,
            "remoteShell": False,
            "remoteConfiguration": False,
            "latencyDebugMode": False,
            "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600, "customStatsSendPeriodInSeconds": 3600},
            "deviceFiltering": {"enable": False, "filterFile": "list.json"},
            "maxPayloadSizeBytes": 8196,
            "minPackSendDelayMS": 50,
            "minPackSizeToSend": 500,
            "checkConnectorsConfigurationInSeconds": 60,
            "handleDeviceRenaming": True,
            "security": {"type": "accessToken", "accessToken": "bench"},
            "qos": 1,
            "reportStrategy": {"type": "ON_RECEIVED"},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
        },
        "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 100000},
        "grpc": {"enabled": False},
        "connectors": [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}],
    }
    (conf / "tb_gateway.json").write_text(json.dumps(gateway, indent=1))
    logs = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "f",
                "filename": str(root / "logs" / "gateway.log"),
                "level": "WARNING",
            }
        },
        "loggers": {
            **{
                name: {"handlers": ["file"], "level": "WARNING", "propagate": False}
                for name in ("service", "connector", "converter", "tb_connection", "storage", "extension")
            },
            # Its converter uses pymodbus's BinaryPayloadDecoder, which with the pymodbus it
            # pins logs a three-line deprecation warning per value decoded: silenced, so the
            # peer is measured at its best, not at its log file's speed.
            "pymodbus": {"handlers": ["file"], "level": "ERROR", "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["file"]},
    }
    (conf / "logs.json").write_text(json.dumps(logs))
    return conf


def start(root: Path, conf: Path) -> subprocess.Popen:
    env = {**os.environ, "TB_GW_CONFIG_DIR": str(conf)}
    out = open(root / "logs" / "stdout.log", "wb")  # noqa: SIM115 (the process owns it)
    return subprocess.Popen(
        [str(VENV / "bin" / "thingsboard-gateway")],
        cwd=root,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
