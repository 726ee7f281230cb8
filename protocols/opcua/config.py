"""Options of the opcua protocol and the NodeId syntax, checked without importing asyncua.

NodeIds are written as in OPC UA Part 6, 5.3.1.10: ``ns=<index>;<type>=<id>`` or
``nsu=<namespace uri>;<type>=<id>``, where type is ``i`` (numeric), ``s`` (string), ``g`` (GUID)
or ``b`` (ByteString, base64); without a namespace part the node is in namespace 0. The ``nsu=``
form is resolved through the server's NamespaceArray at every (re)connect, so it survives a
server that renumbers its namespaces: browse writes every id in that form.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeos.config.schema import Field

MODES = ("subscribe", "poll")
SECURITY_MODES = ("None", "Sign", "SignAndEncrypt")
POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
DEPRECATED_POLICIES = ("Basic128Rsa15", "Basic256")
TIMESTAMPS = ("source", "server", "gateway")
TRIGGERS = ("status", "status_value", "status_value_timestamp")
DEADBANDS = ("none", "absolute", "percent")
TYPES = ("number", "bool", "string", "datetime")
"""What a tag's value becomes: number (every integer width, Float, Double, enumerations), bool,
string, datetime (seconds since 1970 as a number). The node's own DataType, read at connect,
decides how a write is encoded; a node whose type does not fit the tag is held Bad."""

_NODEID = re.compile(r"^(?:ns=(\d+);|nsu=([^;]+);)?([isgb])=(.+)$", re.S)


@dataclass(frozen=True)
class NodeRef:
    """A parsed NodeId: namespace index or URI (exactly one), identifier type and value."""

    ns: int | None
    uri: str | None
    kind: str  # i, s, g, b
    ident: int | str | bytes | uuid.UUID

    def with_index(self, ns: int) -> NodeRef:
        return NodeRef(ns, None, self.kind, self.ident)


def parse_nodeid(text: str) -> NodeRef:
    """Parse a NodeId string; ValueError with a message in the house format."""
    m = _NODEID.match(text.strip())
    if not m:
        raise ValueError(
            f'found "{text}", expected a NodeId such as "ns=2;s=Line1.Speed", "ns=3;i=1001", '
            '"nsu=urn:plant:machines;s=Speed", "ns=2;g=<uuid>" or "ns=2;b=<base64>"'
        )
    ns_s, uri, kind, ident = m.groups()
    ns = int(ns_s) if ns_s is not None else (None if uri else 0)
    if ns is not None and ns > 65535:
        raise ValueError(f'found "{text}", expected a namespace index 0..65535')
    value: int | str | bytes | uuid.UUID
    if kind == "i":
        if not ident.isdigit() or int(ident) > 0xFFFFFFFF:
            raise ValueError(f'found "{text}", expected a numeric identifier 0..4294967295 after i=')
        value = int(ident)
    elif kind == "g":
        try:
            value = uuid.UUID(ident)
        except ValueError:
            raise ValueError(f'found "{text}", expected a GUID such as 09087e75-8e5e-499b-954f-f2a9603db28a') from None
    elif kind == "b":
        try:
            value = base64.b64decode(ident, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f'found "{text}", expected base64 after b=') from None
    else:
        value = ident
    return NodeRef(ns, unquote(uri) if uri else None, kind, value)


def format_nodeid(uri: str, kind: str, ident: Any) -> str:
    """The ``nsu=`` form (';' in the URI percent-encoded, as Part 6 asks)."""
    if kind == "b":
        ident = base64.b64encode(ident).decode()
    return f"nsu={uri.replace('%', '%25').replace(';', '%3B')};{kind}={ident}"


def _check_nodeid(value: str) -> str | None:
    try:
        parse_nodeid(value)
    except ValueError as e:
        return str(e)
    return None


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of an ``opc.tcp://host:port[/path]`` URL; ValueError otherwise."""
    u = urlsplit(text)
    try:
        port = u.port or 4840
    except ValueError:
        raise ValueError(f'found "{text}", the port is not a number 1..65535') from None
    if u.scheme != "opc.tcp" or not u.hostname:
        raise ValueError(f'found "{text}", expected an endpoint URL such as "opc.tcp://192.168.0.10:4840"')
    return u.hostname, port


def _check_endpoint(value: str) -> str | None:
    try:
        parse_endpoint(value)
    except ValueError as e:
        return str(e)
    return None


_MS = 1_000_000
_H = 3_600_000_000_000

DEVICE_FIELDS: dict[str, Field] = {
    "endpoint": Field("str", help="the server's endpoint URL, opc.tcp://host:port", check=_check_endpoint),
    "mode": Field("choice", "subscribe", choices=MODES, help="subscribe (monitored items) or poll (Read calls)"),
    "publishing_interval": Field(
        "duration", None, min=_MS, max=_H, help="of the subscription (default: the device's poll_interval)"
    ),
    "sampling_interval": Field(
        "duration", None, min=0, max=_H, help="of monitored items (default: the tag's poll_interval)"
    ),
    "keepalive_count": Field(
        "int", 10, min=1, max=65535, help="keep-alive interval in publishing intervals: silent 1.5 of them, tags Bad"
    ),
    "queue_size": Field("int", 1, min=1, max=65535, help="samples the server queues per monitored item"),
    "discard_oldest": Field("bool", True),
    "trigger": Field("choice", "status_value", choices=TRIGGERS, help="what counts as a data change"),
    "deadband": Field("choice", "none", choices=DEADBANDS, help="server-side deadband: none, absolute or percent"),
    "deadband_value": Field("float", 0.0, min=0.0),
    "timestamp": Field("choice", "source", choices=TIMESTAMPS, help="which time a sample carries"),
    "timeout": Field("duration", "5s", min=10 * _MS, max=600_000 * _MS, help="of one request"),
    "session_timeout": Field("duration", "60s", min=_MS * 1000, max=_H),
    "silence_timeout": Field(
        "duration", None, min=10 * _MS, max=_H, help="no publish answer for this long: rebuild (default derived)"
    ),
    "retry_unknown": Field("duration", "30s", min=10 * _MS, max=_H, help="re-try of a node the server does not know"),
    "max_nodes_per_request": Field("int", 0, min=0, help="cap below the server's OperationLimits (0: the server's)"),
    "security_mode": Field("choice", None, choices=SECURITY_MODES, help="None, Sign or SignAndEncrypt (required)"),
    "security_policy": Field("choice", None, choices=(*POLICIES, *DEPRECATED_POLICIES)),
    "allow_deprecated": Field("bool", False, help="accept Basic128Rsa15 and Basic256"),
    "certificate": Field("path", None, help="the gateway's application instance certificate (edgeos opcua cert)"),
    "private_key": Field("path", None, help="its private key (PEM)"),
    "trust_dir": Field("path", None, help="trusted server certificates (trusted/) and rejected ones (rejected/)"),
    "username": Field("str", None),
    "password_file": Field("path", None, secret="file"),
    "password_env": Field("str", None, secret="env"),
    "user_certificate": Field("path", None, help="an X.509 user identity (with user_private_key)"),
    "user_private_key": Field("path", None),
}

TAG_FIELDS: dict[str, Field] = {
    "node": Field("str", help='the node id, e.g. "nsu=urn:plant;s=Speed" or "ns=2;i=1001"', check=_check_nodeid),
    "type": Field("choice", "number", choices=TYPES),
    "mode": Field("choice", None, choices=MODES, help="overrides the device's mode"),
    "sampling_interval": Field("duration", None, min=0, max=_H),
    "queue_size": Field("int", None, min=1, max=65535),
    "deadband": Field("choice", None, choices=DEADBANDS),
    "deadband_value": Field("float", None, min=0.0),
}


def device_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in for those that failed their own check (already reported)."""
    return {k: f.default for k, f in DEVICE_FIELDS.items() if not f.required} | dict(options)


def tag_mode(device_opts: Mapping[str, Any], tag_opts: Mapping[str, Any]) -> str:
    return tag_opts.get("mode") or device_opts.get("mode") or "subscribe"
