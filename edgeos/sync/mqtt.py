"""MQTT transport for the sync: the only module that imports aiomqtt; its errors end here.

QoS 1 for data (the cursor moves on PUBACK), a list of brokers tried in turn (failover),
subscriptions (the replay topic; the plant-side collector reuses this module for its own),
a retained status topic with a last will so the
central side sees online/offline, TLS with hostname verification on by default, and the
password read from a file or an environment variable, never from the config itself.

A PUBACK is a delivery only when its MQTT 5 reason code is below 0x80: a refusal (ACL denied,
quota, payload invalid...) raises PublishRefused, so the cursor holds and the session is retried.
MQTT 3.1.1 has no reason code: a broker that denies a publish there acknowledges it all the same
(mosquitto does), which no client can tell from a delivery (docs/payload.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from edgeos.errors import SyncError

log = logging.getLogger("edgeos.sync")

PUBLISH_TIMEOUT = 30.0
# A broker that takes the TCP connection but sends no CONNACK (a cluster node electing its
# JetStream leader) counts as refused after this long, so the next broker is tried.
CONNECT_TIMEOUT = 3.0
FIRST_PUBACK_TIMEOUT = 5.0  # the same for the first publish of a session (its status)
_NO_CONNECTION = 4  # paho's MQTT_ERR_NO_CONN, raised by a publish on a lost connection


class PublishRefused(SyncError):
    """The broker answered a publish with a failure reason code (MQTT 5): not delivered."""


def _password(options: dict[str, Any], base: Path) -> str | None:
    if options.get("password_file"):
        path = base / options["password_file"]
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise SyncError(f"cannot read password_file {path}: {e.strerror}") from e
    if options.get("password_env"):
        value = os.environ.get(options["password_env"])
        if value is None:
            raise SyncError(f"environment variable {options['password_env']} (password_env) is not set")
        return value
    return None


def _has_password(options: dict[str, Any]) -> bool:
    return bool(options.get("password_file") or options.get("password_env"))


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: where it resolves can change, so it is not assumed local


_VERIFY_CAUSES = (
    ("expired", ": it has expired"),
    ("not yet valid", ": it is not valid yet (or this clock is behind)"),
    ("mismatch", ": it is not issued for this host name or address"),
    ("self-signed", ": it is not signed by the CA of ca_file"),
    ("local issuer", ": it is not signed by the CA of ca_file"),
)


def _explain(e: BaseException, where: str, *, connecting: bool = True, socket_error: str | None = None) -> str:
    """One clear sentence for the log, from whatever paho/aiomqtt/ssl raised.

    A CONNACK's refusal comes as a paho ReasonCode (4/5 in MQTT 3.1.1, 134/135 in MQTT 5); a
    plain int is paho's own error code (4 is MQTT_ERR_NO_CONN, "not currently connected"), never
    a verdict on the credentials. `socket_error` is what paho logged while the connection was
    being set up: a broker that rejects our client certificate (TLS 1.3) says so only there.
    """
    text = str(e)
    rc = getattr(e, "rc", None)
    code = getattr(rc, "value", rc)
    connack = rc is not None and not isinstance(rc, int)
    if not connecting or (not connack and code == _NO_CONNECTION) or "disconnected" in text.lower():
        # Codes of a publish are paho's own (4: no connection), not CONNACK's (4: bad password).
        if code == _NO_CONNECTION or "not currently connected" in text or "disconnected" in text.lower():
            return f"lost the connection to {where} ({text})"
        return f"{where}: {type(e).__name__}: {text}"
    if (connack and code in (4, 5, 134, 135)) or "not authori" in text.lower() or "bad user name" in text.lower():
        return f"{where} refused the credentials ({text})"
    if isinstance(e, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        detail = getattr(e, "verify_message", "") or text
        low = detail.lower()
        cause = next((c for k, c in _VERIFY_CAUSES if k in low), "")
        return f"TLS: the certificate of {where} failed verification{cause} ({detail})"
    low = (socket_error or "").lower()
    if "certificate required" in low:
        return f"TLS: {where} requires a client certificate (set cert_file and key_file) ({socket_error})"
    if "alert" in low and ("unknown ca" in low or "certificate" in low):
        return f"TLS: {where} rejected this gateway's client certificate ({socket_error})"
    if socket_error:
        return f"{where} closed the connection before accepting it ({socket_error}; a TLS port reached without tls?)"
    if isinstance(e, ssl.SSLError):
        return f"TLS with {where} failed ({text})"
    if isinstance(e, ConnectionRefusedError) or "refused" in text.lower():
        return f"{where} refused the connection (is the broker running?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {where} ({text})"
    return f"{where}: {type(e).__name__}: {text}"


_last_mid: contextvars.ContextVar[int | None] = contextvars.ContextVar("edgeos_last_mid", default=None)


class _Refusals:
    """Keeps the PUBACK reason codes that aiomqtt 2.x drops.

    aiomqtt's publish waits for paho's on_publish, which (callback API VERSION2) receives the
    reason code and the message id, and then only sets an event. This wraps both ends on the
    paho client underneath: `publish` notes the message id in the calling task's context (the
    aiomqtt coroutine runs in it), `on_publish` keeps failures by message id, and the caller
    looks its own id up once aiomqtt's publish returns.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        paho = client._client  # noqa: SLF001 - aiomqtt 2.x keeps the paho client private
        self._publish = paho.publish
        self._on_publish = paho.on_publish
        self.refused: dict[int, Any] = {}
        paho.publish = self._noting_publish  # an instance attribute, seen by aiomqtt's calls
        paho.on_publish = self._noting_on_publish

    def _noting_publish(self, *args: Any, **kwargs: Any) -> Any:
        info = self._publish(*args, **kwargs)
        # A PUBACK is read by the event loop, never inside publish(): an entry under this id is
        # an older message's, whose caller is gone.
        self.refused.pop(info.mid, None)
        _last_mid.set(info.mid)
        return info

    def _noting_on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self.refused[mid] = reason_code
        self._on_publish(client, userdata, mid, reason_code, properties)

    def take(self) -> Any | None:
        """The refusal of the publish this task just awaited, if the broker refused it."""
        mid = _last_mid.get()
        return None if mid is None else self.refused.pop(mid, None)


class _Session:
    def __init__(self, client: aiomqtt.Client, where: str) -> None:
        self.client = client
        self.where = where
        self.refusals = _Refusals(client)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        try:
            await self.client.subscribe(topic, qos=qos, timeout=PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as e:
            raise SyncError(_explain(e, self.where, connecting=False)) from e

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """(topic, payload) of each message on this session's subscriptions; raises SyncError
        when the connection is lost."""
        try:
            async for msg in self.client.messages:
                payload = msg.payload
                if isinstance(payload, str):
                    payload = payload.encode()
                elif not isinstance(payload, (bytes, bytearray)):
                    payload = b""
                yield str(msg.topic), bytes(payload)
        except aiomqtt.MqttError as e:
            raise SyncError(_explain(e, self.where, connecting=False)) from e

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, ack_within: float = PUBLISH_TIMEOUT
    ) -> None:
        _last_mid.set(None)
        try:
            await self.client.publish(topic, payload, qos=1, retain=retain, timeout=ack_within)
        except aiomqtt.MqttError as e:
            raise SyncError(_explain(e, self.where, connecting=False)) from e
        refused = self.refusals.take()
        if refused is not None:
            raise PublishRefused(
                f"{self.where} refused the publish to {topic}: {refused} "
                f"(reason code {refused.value:#04x} = {refused.value}); kept, retrying"
            )


def servers(options: dict[str, Any]) -> list[tuple[str, int]]:
    """(host, port) of each broker to try, in order: `servers` ("host:port", "[v6]:port" or a
    bare host with the default port), else `host`/`port`."""
    default = options.get("port") or (8883 if options.get("tls") else 1883)
    out = []
    for entry in options.get("servers") or [str(options.get("host") or "127.0.0.1")]:
        host, port = entry, default
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default
        elif entry.count(":") == 1:
            host, _, p = entry.partition(":")
            port = int(p)
        out.append((host, port))
    return out


class MqttTransport:
    """Sessions with the first broker of `servers` that takes the connection. A session that
    fails (refused, lost, timed out) moves on to the next broker for the following attempt,
    which the sync paces with its jittered backoff; TLS and credentials apply to every one.

    `status_topic` None (in `options`) sends no status and no last will: a plain client (the
    collector's) for subscriptions; `clean_start` False with `session_expiry` keeps its session."""

    def __init__(self, gateway: str, options: dict[str, Any], base: Path) -> None:
        self.gateway = gateway
        self.options = options
        self.base = base
        self.servers = servers(options)
        self._index = 0
        self.host, self.port = self.servers[0]
        self.where = f"broker {self.host}:{self.port}"
        topic = options.get("status_topic")
        self.status_topic = topic.format(gateway=gateway) if topic else None
        self._warned_cleartext = False

    def _next_server(self) -> None:
        if len(self.servers) > 1:
            self._index = (self._index + 1) % len(self.servers)
            log.info("upstream: trying the next broker, %s:%d", *self.servers[self._index])

    def _warn_cleartext(self) -> None:
        """Once per run: credentials without TLS cross the network readable, unless on loopback."""
        o = self.options
        if self._warned_cleartext or o.get("tls") or not (o.get("username") or _has_password(o)):
            return
        self._warned_cleartext = True
        if not all(_is_loopback(host) for host, _ in self.servers):
            log.warning(
                "upstream: credentials for %s are sent in cleartext (tls = false); enable tls for a "
                "broker that is not on this machine",
                self.where,
            )

    def _status(self, state: str) -> bytes:
        return json.dumps({"gateway": self.gateway, "state": state, "ts": time.time()}).encode()

    def _tls(self) -> aiomqtt.TLSParameters | None:
        o = self.options
        if not o.get("tls"):
            return None
        return aiomqtt.TLSParameters(
            ca_certs=str(self.base / o["ca_file"]) if o.get("ca_file") else None,
            certfile=str(self.base / o["cert_file"]) if o.get("cert_file") else None,
            keyfile=str(self.base / o["key_file"]) if o.get("key_file") else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[_Session]:
        o = self.options
        self._warn_cleartext()
        self.host, self.port = self.servers[self._index]
        self.where = f"broker {self.host}:{self.port}"
        v5 = o.get("mqtt_version", "5") == "5"
        extra: dict[str, Any] = {}
        if o.get("clean_start") is False:
            if v5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(o.get("session_expiry") or 7 * 86400)
                extra = {"clean_start": False, "properties": props}
            else:
                extra = {"clean_session": False}
        will = None
        if self.status_topic:
            will = aiomqtt.Will(self.status_topic, self._status("offline"), qos=1, retain=True)
        inflight = o.get("max_inflight", 16)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=o.get("username"),
            password=_password(o, self.base),
            identifier=o.get("client_id") or f"edgeos-{self.gateway}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            keepalive=max(1, o.get("keepalive", 30_000_000_000) // 1_000_000_000),
            tls_params=self._tls(),
            tls_insecure=bool(o.get("tls_insecure")) if o.get("tls") else None,
            max_inflight_messages=inflight * 2,
            timeout=CONNECT_TIMEOUT,  # connect and disconnect; publish and subscribe pass their own
            **extra,
        )
        # Our own window bounds what is in flight; aiomqtt would warn from 10 on.
        client.pending_calls_threshold = 4 * inflight
        socket_errors: list[str] = []  # paho's own log of the setup, for _explain
        client._client.on_log = lambda _c, _u, level, buf: level == 8 and socket_errors.append(buf)  # noqa: SLF001
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as e:
            self._next_server()  # refused, unreachable, or a cluster node electing a leader
            with contextlib.suppress(Exception):
                client._client.disconnect()  # noqa: SLF001 - a half-open connection left by a timeout
            last = socket_errors[-1] if socket_errors else None
            raise SyncError(_explain(e.__cause__ or e, self.where, socket_error=last)) from e
        client._client.on_log = None  # noqa: SLF001
        session = _Session(client, self.where)
        failed = False
        try:
            if self.status_topic:
                # A node that took the connection but cannot store (a cluster without its
                # JetStream leader yet) acknowledges nothing: soon the next broker instead.
                await session.publish(
                    self.status_topic, self._status("online"), retain=True, ack_within=FIRST_PUBACK_TIMEOUT
                )
            yield session
        except Exception:
            failed = True
            raise
        finally:
            if failed:
                self._next_server()  # a lost connection: the next attempt goes to the next broker
            # A clean DISCONNECT suppresses the last will, so an orderly stop (cancellation
            # included) says "offline" itself; a crash or a lost link leaves it to the will.
            if self.status_topic:
                with contextlib.suppress(Exception):
                    await client.publish(self.status_topic, self._status("offline"), qos=1, retain=True, timeout=2)
            with contextlib.suppress(Exception):
                # Bounded: a broker that stopped answering must not hold up the daemon's stop.
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)
