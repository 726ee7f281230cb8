"""MQTT transport, for the gateway's sync and the plant-side collector alike: the only module
that imports aiomqtt (and paho under it); their errors end here.

QoS 1 (the sync's cursor moves on PUBACK; the collector acknowledges what it committed), a
list of brokers tried in turn (failover), subscriptions, a retained status topic with a last
will so the central side sees online/offline, TLS with hostname verification on by default,
and the password read from a file or an environment variable, never from the config itself.

A lost connection fails every wait at once (a publish in flight is not acknowledged: sent
again after the reconnect), and a stall watchdog of its own drops a connection on which
nothing arrived for 1.5 keep-alives (`MqttSession.watch`).

A PUBACK is a delivery only when its MQTT 5 reason code is below 0x80: a refusal (ACL denied,
quota, payload invalid...) raises PublishRefused, so the cursor holds and the session is retried.
MQTT 3.1.1 has no reason code: a broker that denies a publish there acknowledges it all the same
(mosquitto does), which no client can tell from a delivery (docs/payload.md)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeos.aio import within
from edgeos.config.units import split_server
from edgeos.errors import SyncError

log = logging.getLogger("edgeos.sync")

PUBLISH_TIMEOUT = 30.0
# A broker that takes the TCP connection but sends no CONNACK (a cluster node electing its
# JetStream leader) counts as refused after this long, so the next broker is tried.
CONNECT_TIMEOUT = 3.0
FIRST_PUBACK_TIMEOUT = 5.0  # the same for the first publish of a session (its status)
# A refused subscription is asked again for this long (a cluster node electing its JetStream
# leader refuses them for a few seconds) before the session fails and the next broker is tried.
SUBSCRIBE_PATIENCE = 60.0
# The stall watchdog, in keep-alive intervals: a PINGREQ after PING_AFTER of silence (either
# direction), the connection dropped after STALL_AFTER with no packet received: below the
# promised 1.5 (issue 28) by what the timer's wake-up and the drop take on a loaded machine
# (measured 1-18 ms at a 1 s keep-alive).
PING_AFTER = 0.5
STALL_AFTER = 1.4
_NO_CONNECTION = 4  # paho's MQTT_ERR_NO_CONN, raised by a publish on a lost connection
RETAIN_NOT_SUPPORTED = 0x9A  # MQTT 5 reason code: a CONNACK refusing a retained will
QOS_NOT_SUPPORTED = 0x9B  # MQTT 5 reason code: a CONNACK refusing a will of QoS 1


def _qos0_only(where: str) -> str:
    return (
        f"{where} accepts QoS 0 only (MQTT 5 Maximum QoS 0): edgeos publishes with QoS 1, "
        "acknowledged, so that no sample is lost; allow QoS 1 on this broker (or its listener)"
    )


PROTOCOL_ERROR = 0x82  # MQTT 5 reason code: paho's reason when it closes on a packet it cannot read


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


def _explain(
    e: BaseException,
    where: str,
    *,
    connecting: bool = True,
    socket_error: str | None = None,
    tls: bool = False,
    client_cert: bool = False,
) -> str:
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
    if socket_error and tls:
        # TLS 1.3 verifies the client's certificate after the handshake: the broker's alert
        # can be lost in its close, leaving an EOF (seen on a loaded machine).
        why = (
            "it may have rejected this gateway's client certificate"
            if client_cert
            else "it may be that it requires a client certificate (set cert_file and key_file)"
        )
        return f"TLS: {where} closed the connection during the handshake ({socket_error}): {why}; its log says"
    if socket_error:
        return f"{where} closed the connection before accepting it ({socket_error}; a TLS port reached without tls?)"
    if isinstance(e, ssl.SSLError):
        return f"TLS with {where} failed ({text})"
    if isinstance(e, ConnectionRefusedError) or "refused" in text.lower():
        return f"{where} refused the connection (is the broker running?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {where} ({text})"
    return f"{where}: {type(e).__name__}: {text}"


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message on a subscription; `mid`/`qos` are what `Session.ack` needs."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class MqttSession:
    """One connection. Every wait it offers (PUBACK, SUBACK, the next message) ends at once,
    with the reason, when the connection is lost: a publish in flight fails then instead of
    waiting out its timeout, so the sync reconnects and sends it again (the cursor held).

    aiomqtt 2.x neither fails its waits on a disconnect nor passes PUBACK reason codes on, so
    publish and subscribe go to the paho client underneath and wait on futures of their own,
    settled by paho's callbacks (all on the event loop, where aiomqtt drives paho)."""

    def __init__(self, client: aiomqtt.Client, where: str, *, manual_ack: bool = False) -> None:
        self.client = client
        self.where = where
        self.failure: SyncError | None = None  # why the connection ended, once it has
        self.lost = asyncio.Event()
        self.last_in = time.monotonic()  # the last packet received (any kind)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._waits: dict[int, asyncio.Future[Any]] = {}  # message id -> PUBACK/SUBACK outcome
        paho = self._paho = client._client  # noqa: SLF001 - aiomqtt 2.x keeps the paho client private
        if manual_ack:
            paho.manual_ack_set(True)
        self._handle_packet = paho._packet_handle  # noqa: SLF001
        paho._packet_handle = self._noting_packet  # noqa: SLF001 - an instance attribute, seen by paho
        # Keep-alive is the watchdog's alone: paho's own check (once a second, from aiomqtt's
        # misc loop) would race it with looser deadlines, and close a link whose PINGRESP is due.
        paho._check_keepalive = lambda: None  # noqa: SLF001
        self._aiomqtt_on_disconnect = paho.on_disconnect
        self._aiomqtt_on_connect = paho.on_connect
        paho.on_publish = self._on_ack
        paho.on_subscribe = self._on_ack
        paho.on_disconnect = self._on_disconnect
        paho.on_connect = self._on_connect
        # What an MQTT 5 broker said of itself in its CONNACK (None: it set no limit; 3.1.1 has none).
        self.receive_maximum: int | None = None
        self.max_packet: int | None = None
        self.maximum_qos: int | None = None
        self.retain_available: bool | None = None

    # -- paho's side (event loop) --------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        """The CONNACK's limits, taken before aiomqtt lets the session publish. paho 2.x obeys
        neither: a client "MUST NOT send more than Receive Maximum" unacknowledged QoS 1
        PUBLISHes, nor a packet over Maximum Packet Size (MQTT 5.0, 3.3.4 and 3.1.2.11.4); a
        broker may drop the connection for either (mosquitto does for the size). The window
        goes to paho, which holds the rest until acknowledgements come; the size goes to the
        sync, which frames this session's messages within it (`Sync._pump`)."""
        if properties is not None:
            self.receive_maximum = getattr(properties, "ReceiveMaximum", None)
            self.max_packet = getattr(properties, "MaximumPacketSize", None)
            self.maximum_qos = getattr(properties, "MaximumQoS", None)
            retain = getattr(properties, "RetainAvailable", None)
            self.retain_available = None if retain is None else bool(retain)
            paho = self._paho
            if self.receive_maximum and self.receive_maximum < paho._max_inflight_messages:  # noqa: SLF001
                paho._max_inflight_messages = self.receive_maximum  # noqa: SLF001 - the setter refuses once connected
        self._aiomqtt_on_connect(client, userdata, flags, reason, properties)

    def _noting_packet(self) -> Any:
        self.last_in = time.monotonic()
        return self._handle_packet()

    def _on_ack(self, _client: Any, _userdata: Any, mid: int, reason: Any, _properties: Any) -> None:
        fut = self._waits.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._aiomqtt_on_disconnect(client, userdata, flags, reason, properties)
        if getattr(flags, "is_disconnect_packet_from_server", False):
            error = SyncError(f"lost the connection to {self.where} (the broker sent DISCONNECT: {reason})")
        elif getattr(reason, "value", None) == PROTOCOL_ERROR:
            # paho closed it, finding a packet it could not read. Seen with mosquitto refusing
            # a message over its message_size_limit (a PUBACK of reason 0x95 that paho does not
            # parse: an independent tester's finding), which "closed or reset" did not say.
            error = SyncError(
                f"lost the connection to {self.where} (the MQTT client found a protocol error in what the "
                "broker sent; a broker refusing messages as too large, mosquitto's message_size_limit, "
                "does this: set upstream.max_message below its limit)"
            )
        else:  # paho's reason here is otherwise "Unspecified error"
            error = SyncError(f"lost the connection to {self.where} (closed or reset)")
        if threading.get_ident() == self._thread:
            self._fail(error)
        else:  # paho's connect runs in an executor thread
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._fail, error)

    def _fail(self, error: SyncError) -> None:
        """The connection is gone: every wait ends now, with the first reason."""
        if self.failure is None:
            self.failure = error
        for fut in self._waits.values():
            if not fut.done():
                fut.set_result(self.failure)  # a result, not an exception: never "not retrieved"
        self.lost.set()

    # -- the stall watchdog --------------------------------------------------------------------

    async def watch(self) -> None:
        """Drop the connection when nothing arrived for STALL_AFTER keep-alives.

        paho pings only after a whole keep-alive without traffic, checks once a second and gives
        up a keep-alive after its ping: a stall took up to 2 keep-alives + 1 s to notice. Its
        check is off (`__init__`). Here a PINGREQ goes out after PING_AFTER keep-alives of
        silence in either direction, so a healthy idle link has its PINGRESP a whole keep-alive
        before STALL_AFTER, and the watchdog wakes when a deadline is due, not once a second
        (docs/reliability.md, "Network faults")."""
        try:
            await self._watch()
        except Exception as e:  # noqa: BLE001 - a watchdog that fails must not leave the link unwatched
            log.error("mqtt: the stall watchdog failed (%s: %s); dropping the connection", type(e).__name__, e)
            self._drop(SyncError(f"{self.where}: the stall watchdog failed ({type(e).__name__}: {e})"))

    async def _watch(self) -> None:
        paho = self._paho
        keepalive = float(paho._keepalive)  # noqa: SLF001 - after CONNACK: an MQTT 5 server keep-alive applies
        if keepalive <= 0:  # keep-alive off (0, or a server's Server Keep Alive of 0): nothing to watch
            await self.lost.wait()
            return
        ping, stall = PING_AFTER * keepalive, STALL_AFTER * keepalive
        pinged = 0.0
        while self.failure is None:
            now = time.monotonic()
            silent = now - self.last_in
            if silent >= stall:
                self._drop(
                    SyncError(
                        f"{self.where} sent nothing for {silent:.1f} s ({STALL_AFTER:g} keep-alives of "
                        f"{keepalive:g} s): the link is stalled; dropped the connection"
                    )
                )
                return
            quiet = min(self.last_in, paho._last_msg_out)  # noqa: SLF001 - paho's own, on the same clock
            if now - quiet >= ping and now - pinged >= ping:
                with contextlib.suppress(Exception):
                    paho._send_pingreq()  # noqa: SLF001
                paho._ping_t = 0  # noqa: SLF001 - answered or not, the watchdog decides (not loop_misc)
                pinged = now
            due = min(self.last_in + stall, max(quiet, pinged) + ping)
            await asyncio.sleep(max(0.01, due - time.monotonic()))

    def _drop(self, error: SyncError) -> None:
        """Close the socket as paho does when its own keep-alive check fails."""
        self._fail(error)
        with contextlib.suppress(Exception):
            self._paho._loop_rc_handle(MQTTErrorCode.MQTT_ERR_KEEPALIVE)  # noqa: SLF001

    # -- the caller's side ---------------------------------------------------------------------

    async def _wait(self, mid: int, timeout_s: float, what: str) -> Any:
        """The PUBACK/SUBACK reason for `mid`; SyncError when lost or not within `timeout_s`."""
        fut = self._loop.create_future()
        self._waits[mid] = fut
        try:
            async with asyncio.timeout(timeout_s):
                outcome = await fut
        except TimeoutError:
            raise SyncError(f"{self.where}: no acknowledgement of {what} within {timeout_s:g} s") from None
        finally:
            if self._waits.get(mid) is fut:
                del self._waits[mid]
        if isinstance(outcome, SyncError):
            raise outcome
        return outcome

    def _check(self, what: str, rc: int = MQTTErrorCode.MQTT_ERR_SUCCESS) -> None:
        """Raise the connection's failure, or what paho's return code `rc` says."""
        if self.failure is not None:
            raise self.failure
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SyncError(_explain(aiomqtt.MqttCodeError(rc, f"Could not {what}"), self.where, connecting=False))

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe; a refusal (SUBACK 0x80 or more) is asked again, backing off, while the
        connection lasts and for SUBSCRIBE_PATIENCE s at most, then raises SyncError."""
        delay, give_up = 0.5, time.monotonic() + SUBSCRIBE_PATIENCE
        while True:
            self._check("subscribe")
            rc, mid = self._paho.subscribe(topic, qos)
            self._check("subscribe", rc)
            reasons = await self._wait(mid, PUBLISH_TIMEOUT, f"the subscription to {topic}")
            refused = next((r for r in reasons if getattr(r, "is_failure", False)), None)
            if refused is None:
                return
            what = f"{self.where} refused the subscription to {topic} ({refused})"
            if time.monotonic() + delay > give_up:
                raise SyncError(f"{what} for {SUBSCRIBE_PATIENCE:g} s")
            log.warning("mqtt: %s; asking again in %.1f s", what, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.lost.wait()
            delay = min(2 * delay, 5.0)

    async def incoming(self) -> AsyncIterator[Incoming]:
        """Each message on this session's subscriptions; raises SyncError when the connection
        is lost. With `manual_ack`, a QoS 1 message is acknowledged only by `ack`."""
        try:
            async for msg in self.client.messages:
                payload = msg.payload
                if isinstance(payload, str):
                    payload = payload.encode()
                elif not isinstance(payload, (bytes, bytearray)):
                    payload = b""
                yield Incoming(str(msg.topic), bytes(payload), msg.mid, msg.qos)
        except aiomqtt.MqttError as e:
            raise self.failure or SyncError(_explain(e, self.where, connecting=False)) from e

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """(topic, payload) of each message (acknowledged on receipt unless `manual_ack`)."""
        async for msg in self.incoming():
            yield msg.topic, msg.payload

    def ack(self, msg: Incoming) -> None:
        """PUBACK now (`manual_ack`); on a lost connection nothing: the broker sends it again."""
        if msg.qos > 0 and self.failure is None:
            self._paho.ack(msg.mid, msg.qos)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, ack_within: float = PUBLISH_TIMEOUT
    ) -> None:
        """QoS 1: returns on a PUBACK that is a delivery; raises PublishRefused on a refusal and
        SyncError at once when the connection is lost (or no PUBACK within `ack_within` s)."""
        self._check("publish")
        # A broker without retained messages drops the connection at a retained PUBLISH.
        retain = retain and self.retain_available is not False
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        self._check("publish message", info.rc)
        reason = await self._wait(info.mid, ack_within, f"a publish to {topic}")
        if getattr(reason, "is_failure", False):
            raise PublishRefused(
                f"{self.where} refused the publish to {topic}: {reason} "
                f"(reason code {reason.value:#04x} = {reason.value}); kept, retrying"
            )


def _host_port(host: str, port: int) -> str:
    """host:port as `servers` writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def servers(options: dict[str, Any]) -> list[tuple[str, int]]:
    """(host, port) of each broker to try, in order: `servers` ("host:port", "[v6]:port", a
    bare host with the default port, or a (host, port) pair), else `host`/`port` (`host` is a
    name or address, an IPv6 one without brackets)."""
    default = options.get("port") or (8883 if options.get("tls") else 1883)
    if not options.get("servers"):
        return [(str(options.get("host") or "127.0.0.1"), int(default))]
    out = []
    for entry in options["servers"]:
        if isinstance(entry, (tuple, list)):
            out.append((str(entry[0]), int(entry[1])))
        else:
            out.append(split_server(entry, default))
    return out


class MqttTransport:
    """Sessions with the first broker of `servers` that takes the connection. A session that
    fails (refused, lost, stalled, timed out) moves on to the next broker for the following
    attempt, which the caller paces with its jittered backoff; TLS and credentials apply to
    every one.

    The gateway's sync uses it with a status topic and a last will. The plant-side collector
    uses it as a plain subscriber (`status_topic` None: no status, no will) with
    `manual_ack` True (a PUBACK only once its units are committed: `Session.ack`),
    `clean_start` False with `session_expiry` (a persistent session; clean_session False in
    MQTT 3.1.1) and `receive_maximum` (MQTT 5: how many unacknowledged messages the broker
    may send this client; 3.1.1 brokers apply their own per-client limit)."""

    def __init__(self, gateway: str, options: dict[str, Any], base: Path) -> None:
        self.gateway = gateway
        self.options = options
        self.base = base
        self.servers = servers(options)
        self._index = 0
        self.host, self.port = self.servers[0]
        self.where = f"broker {_host_port(self.host, self.port)}"
        topic = options.get("status_topic")
        self.status_topic = topic.format(gateway=gateway) if topic else None
        self._warned_cleartext = False
        self._will_retain = True  # False once a broker refused a retained will (MQTT 5: 0x9A)

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

    def _client(self) -> aiomqtt.Client:
        o = self.options
        v5 = str(o.get("mqtt_version", "5")) == "5"
        extra: dict[str, Any] = {}
        props = Properties(PacketTypes.CONNECT) if v5 else None
        if o.get("clean_start") is False:
            if v5:
                props.SessionExpiryInterval = int(o.get("session_expiry") or 7 * 86400)
                extra["clean_start"] = False
            else:
                extra["clean_session"] = False
        if v5 and o.get("receive_maximum"):
            props.ReceiveMaximum = int(o["receive_maximum"])
        if props is not None and props.json():
            extra["properties"] = props
        will = None
        if self.status_topic:
            will = aiomqtt.Will(self.status_topic, self._status("offline"), qos=1, retain=self._will_retain)
        return aiomqtt.Client(
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
            max_inflight_messages=o.get("max_inflight", 16) * 2,  # the caller's window bounds it
            timeout=o.get("connect_timeout") or CONNECT_TIMEOUT,  # connect and disconnect only
            **extra,
        )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MqttSession]:
        self._warn_cleartext()
        self.host, self.port = self.servers[self._index]
        self.where = f"broker {_host_port(self.host, self.port)}"
        client = self._client()
        session = MqttSession(client, self.where, manual_ack=bool(self.options.get("manual_ack")))
        socket_errors: list[str] = []  # paho's own log of the setup, for _explain
        client._client.on_log = lambda _c, _u, level, buf: level == 8 and socket_errors.append(buf)  # noqa: SLF001
        will_retained = self._will_retain  # the will this connection carries
        try:
            await within(client.__aenter__(), None)  # aiomqtt's wait_for may drop a cancellation
        except BaseException as e:
            with contextlib.suppress(Exception):
                client._client.disconnect()  # noqa: SLF001 - connected or half-way: not left open
            if not isinstance(e, (aiomqtt.MqttError, OSError, ssl.SSLError)):
                raise  # a cancellation, or a bug
            refused = getattr(getattr(e, "rc", None), "value", None)  # an MQTT 5 CONNACK reason code
            if refused == RETAIN_NOT_SUPPORTED and self._will_retain:
                # The will is what it refused: the next attempt (any broker) sends it unretained.
                self._will_retain = False
                log.warning(
                    "upstream: %s does not support retained messages: the status and the tag dictionary "
                    "are published without retain from now on (a consumer that connects later gets the "
                    "dictionary when it is next published)",
                    self.where,
                )
            self._next_server()  # refused, unreachable, or a cluster node electing a leader
            if refused == QOS_NOT_SUPPORTED:  # the will's QoS 1
                raise SyncError(_qos0_only(self.where)) from e
            last = socket_errors[-1] if socket_errors else None
            tls, cert = bool(self.options.get("tls")), bool(self.options.get("cert_file"))
            raise SyncError(_explain(e.__cause__ or e, self.where, socket_error=last, tls=tls, client_cert=cert)) from e
        client._client.on_log = None  # noqa: SLF001
        if session.retain_available is False:
            self._will_retain = False
        session.last_in = time.monotonic()
        watchdog = asyncio.get_running_loop().create_task(session.watch(), name="mqtt:watchdog")
        failed = False
        try:
            if session.maximum_qos == 0:
                session.failure = SyncError(_qos0_only(self.where))  # set: no "offline" status either
                raise session.failure
            if self.status_topic:
                # A node that took the connection but cannot store (a cluster without its
                # JetStream leader yet) acknowledges nothing: soon the next broker instead.
                # Retained as the will is, or a retained "online" would outlive a crash.
                await session.publish(
                    self.status_topic, self._status("online"), retain=will_retained, ack_within=FIRST_PUBACK_TIMEOUT
                )
            yield session
        except Exception:
            failed = True
            raise
        finally:
            watchdog.cancel()
            await asyncio.wait([watchdog])  # not awaited itself: a cancellation of ours is not swallowed
            if failed or session.failure is not None:
                self._next_server()  # a lost connection: the next attempt goes to the next broker
            # A clean DISCONNECT suppresses the last will, so an orderly stop (cancellation
            # included) says "offline" itself; a crash or a lost link leaves it to the will.
            if self.status_topic and session.failure is None:
                with contextlib.suppress(Exception):
                    await session.publish(
                        self.status_topic, self._status("offline"), retain=will_retained, ack_within=2
                    )
            with contextlib.suppress(Exception):
                # Bounded: a broker that stopped answering must not hold up the daemon's stop.
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)
            if client._disconnected.done() and not client._disconnected.cancelled():  # noqa: SLF001
                client._disconnected.exception()  # noqa: SLF001 - retrieved: asyncio logs it otherwise
