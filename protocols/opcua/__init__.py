"""The `opcua` protocol: OPC UA subscriptions and polled reads through asyncua.

asyncua is imported only when a device of this protocol is created (protocols/opcua/client.py):
loading a config, or running a gateway without OPC UA devices, never imports it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeos.protocols.opcua.config import (
    DEPRECATED_POLICIES,
    DEVICE_FIELDS,
    TAG_FIELDS,
    device_options,
    tag_mode,
)

from edgeos.adapter import Adapter, DeviceConfig
from edgeos.config.schema import Problems
from edgeos.config.units import format_duration_ns
from edgeos.model import ValueKind

INSTALL_HINT = "the opcua protocol needs asyncua: pip install 'edgeos[opcua]'"


def asyncua_installed() -> bool:
    """Whether asyncua can be imported, without importing it."""
    try:
        return importlib.util.find_spec("asyncua") is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules["asyncua"] = None
        return False


# Part 4: a percent deadband is a share of the node's EURange.
PERCENT_MAX = 100.0
PERCENT_RANGE = "a percent deadband is 0..100 (of the node's EURange)"


class OpcUaProtocol:
    name = "opcua"
    device_fields = DEVICE_FIELDS
    tag_fields = TAG_FIELDS

    def tag_kind(self, options: Mapping[str, Any]) -> ValueKind:
        return {"bool": ValueKind.BOOL, "string": ValueKind.STRING}.get(options.get("type", "number"), ValueKind.NUMBER)

    def validate(self, device: DeviceConfig, path: str, problems: Problems) -> None:
        o = device_options(device.options)
        if not asyncua_installed():
            problems.add(f"{path}.protocol", INSTALL_HINT)
        mode = o.get("security_mode")
        policy = o.get("security_policy")
        if mode is None:
            problems.add(
                f"{path}.security_mode",
                'missing: say how to connect: "Sign" or "SignAndEncrypt" (with security_policy, certificate, '
                'private_key, trust_dir), or "None" to connect without any security',
            )
        elif mode != "None":
            if not policy:
                problems.add(f"{path}.security_policy", f'missing: required with security_mode = "{mode}"')
            elif policy in DEPRECATED_POLICIES and not o["allow_deprecated"]:
                problems.add(
                    f"{path}.security_policy",
                    f'found "{policy}", a deprecated policy (broken hashing/padding); use Basic256Sha256, '
                    "Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss, or set allow_deprecated = true",
                )
            for key in ("certificate", "private_key", "trust_dir"):
                if not o.get(key):
                    hint = " (edgeos opcua cert makes one)" if key != "trust_dir" else ""
                    problems.add(f"{path}.{key}", f'missing: required with security_mode = "{mode}"{hint}')
            for key in ("certificate", "private_key"):
                if o.get(key) and not Path(o[key]).is_file():
                    problems.add(f"{path}.{key}", f"file {o[key]!r} not found")
        elif policy not in (None, "None"):
            problems.add(f"{path}.security_policy", f'found "{policy}" with security_mode = "None": remove one')
        if o.get("password_file") and o.get("password_env"):
            problems.add(f"{path}.password_file", "give password_file or password_env, not both")
        if (o.get("password_file") or o.get("password_env")) and not o.get("username"):
            problems.add(f"{path}.username", "missing: a password needs a username")
        if o.get("username") and not (o.get("password_file") or o.get("password_env")):
            problems.add(
                f"{path}.password_file", "missing: a username needs password_file or password_env (never in the config)"
            )
        if o.get("password_file") and not Path(o["password_file"]).is_file():
            problems.add(f"{path}.password_file", f"file {o['password_file']!r} not found")
        if o.get("password_env") and o["password_env"] not in os.environ:
            problems.add(f"{path}.password_env", f"environment variable {o['password_env']!r} is not set")
        if bool(o.get("user_certificate")) != bool(o.get("user_private_key")):
            problems.add(f"{path}.user_certificate", "user_certificate and user_private_key must be given together")
        if o.get("username") and o.get("user_certificate"):
            problems.add(f"{path}.user_certificate", "one user identity: username or user_certificate, not both")
        if o["deadband"] == "percent" and o["deadband_value"] > PERCENT_MAX:
            problems.add(f"{path}.deadband_value", f"found {o['deadband_value']:g}, {PERCENT_RANGE}")
        for i, t in enumerate(device.tags):
            topt = t.options
            where = f' (tag "{t.name}")'
            db = topt.get("deadband")
            if db and db != "none" and topt.get("type", "number") != "number":
                problems.add(f"{path}.tags[{i}].deadband", f'found "{db}", a deadband applies to number tags{where}')
            value = topt.get("deadband_value")
            if (db or o["deadband"]) == "percent" and value is not None and value > PERCENT_MAX:
                problems.add(f"{path}.tags[{i}].deadband_value", f"found {value:g}, {PERCENT_RANGE}")
            if tag_mode(o, topt) == "poll":
                for key in ("sampling_interval", "queue_size", "deadband", "deadband_value"):
                    if topt.get(key) is not None:
                        problems.add(
                            f"{path}.tags[{i}].{key}",
                            'applies to subscribed tags; this one is read with mode = "poll"',
                        )

    def create(self, device: DeviceConfig) -> Adapter:
        from edgeos.protocols.opcua.adapter import OpcUaAdapter

        return OpcUaAdapter(device)

    def describe(self, device: DeviceConfig) -> list[str]:
        """What `edgeos check` prints: endpoint, mode, security, certificate expiry, the plan."""
        o = device_options(device.options)
        mode = o.get("security_mode") or "None"
        sec = "no security" if mode == "None" else f"{mode} {o.get('security_policy')}"
        ident = (
            f"user {o['username']}"
            if o.get("username")
            else ("X.509 user" if o.get("user_certificate") else "anonymous")
        )
        lines = [f"opcua {o['endpoint']}: {sec}, {ident}, timestamps from {o['timestamp']}"]
        if mode != "None" and o.get("certificate"):
            try:
                from edgeos.protocols.opcua.client import application_uri_of, certificate_expiry

                lines.append(f"certificate {o['certificate']} expires {certificate_expiry(o['certificate']):%Y-%m-%d}")
                if not application_uri_of(o["certificate"]):
                    lines.append(
                        f"certificate {o['certificate']} names no ApplicationUri (a subjectAltName URI): "
                        "no session until it does (edgeos opcua cert makes one)"
                    )
            except Exception as e:  # unreadable, or asyncua/cryptography missing: say so, don't fail check
                lines.append(f"certificate {o['certificate']}: cannot read ({type(e).__name__})")
        sub = [t for t in device.tags if tag_mode(o, t.options) == "subscribe"]
        poll = [t for t in device.tags if tag_mode(o, t.options) == "poll"]
        if sub:
            pi = o.get("publishing_interval") or device.poll_interval_ns
            db = "" if o["deadband"] == "none" else f", {o['deadband']} deadband {o['deadband_value']:g}"
            lines.append(
                f"subscribe: {len(sub)} monitored item{'s' if len(sub) != 1 else ''}, publishing every "
                f"{format_duration_ns(pi)}, queue {o['queue_size']}{db}, keep-alive x{o['keepalive_count']}"
            )
        by: dict[int, int] = {}
        for t in poll:
            by[t.poll_interval_ns] = by.get(t.poll_interval_ns, 0) + 1
        for iv, n in sorted(by.items()):
            lines.append(
                f"poll every {format_duration_ns(iv)}: {n} node{'s' if n != 1 else ''} in one Read (chunked "
                "to the server's MaxNodesPerRead)"
            )
        if not asyncua_installed():
            lines.append(INSTALL_HINT)
        return lines


plugin = OpcUaProtocol()
