"""The collector's MQTT subscription: persistent session, QoS 1, acknowledged only after commit.

Interim: edgeos/sync/mqtt.py is meant to be the only aiomqtt importer, and gains a subscribe
capability on branch wip-upstream (issue 25); until that lands this module wraps aiomqtt for the
collector alone, with the same options (servers with failover, TLS, credentials, MQTT 3.1.1/5).

Acknowledgements are manual (paho's `manual_ack`): a PUBACK goes out only once the message's
units are committed in PostgreSQL, so a collector killed mid-batch leaves them with the broker,
which delivers them again. While PostgreSQL is down no PUBACK goes out, and the broker stops
sending once its in-flight window for this client is full: backpressure, and bounded memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("edgeos.collector")


class BrokerError(Exception):
    """No broker of the list accepted a connection, or the session was lost."""


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int


def _password(o: dict[str, Any], base: Path) -> str | None:
    if o.get("password_file"):
        return (base / o["password_file"]).read_text(encoding="utf-8").strip()
    if o.get("password_env"):
        value = os.environ.get(o["password_env"])
        if value is None:
            raise BrokerError(f"environment variable {o['password_env']} (password_env) is not set")
        return value
    return None


class Session:
    def __init__(self, client: aiomqtt.Client, where: str) -> None:
        self.client = client
        self.where = where

    async def subscribe(self, topics: list[str]) -> None:
        try:
            for t in topics:
                await self.client.subscribe(t, qos=1)
        except aiomqtt.MqttError as e:
            raise BrokerError(f"{self.where}: subscribe failed: {e}") from e

    async def messages(self) -> AsyncIterator[Incoming]:
        try:
            async for m in self.client.messages:
                payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
                yield Incoming(str(m.topic), bytes(payload), m.mid, m.qos)
        except aiomqtt.MqttError as e:
            raise BrokerError(f"lost the connection to {self.where}: {e}") from e

    def ack(self, msg: Incoming) -> None:
        """PUBACK now: the message's effect is committed (or parked)."""
        if msg.qos > 0:
            self.client._client.ack(msg.mid, msg.qos)  # noqa: SLF001 - aiomqtt 2.x does not expose manual acks

    async def publish(self, topic: str, payload: bytes) -> None:
        try:
            await self.client.publish(topic, payload, qos=1, timeout=10)
        except aiomqtt.MqttError as e:
            raise BrokerError(f"{self.where}: publish failed: {e}") from e


class Subscriber:
    """Connects to the first server of the list that accepts, the next one on each failure."""

    def __init__(self, options: dict[str, Any], base: Path) -> None:
        self.o = options
        self.base = base
        self.servers: list[tuple[str, int]] = options["servers"]
        self._next = 0

    def _tls(self) -> aiomqtt.TLSParameters | None:
        o = self.o
        if not o.get("tls"):
            return None
        return aiomqtt.TLSParameters(
            ca_certs=str(self.base / o["ca_file"]) if o.get("ca_file") else None,
            certfile=str(self.base / o["cert_file"]) if o.get("cert_file") else None,
            keyfile=str(self.base / o["key_file"]) if o.get("key_file") else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        o = self.o
        host, port = self.servers[self._next % len(self.servers)]
        self._next += 1
        where = f"broker {host}:{port}"
        v5 = o["mqtt_version"] == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0xFFFFFFFF  # the session (and its queue) outlives a disconnect
            props.ReceiveMaximum = o["receive_maximum"]
        client = aiomqtt.Client(
            host,
            port,
            username=o.get("username"),
            password=_password(o, self.base),
            identifier=o["client_id"],
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else aiomqtt.client.mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=o["keepalive"],
            tls_params=self._tls(),
            tls_insecure=bool(o.get("tls_insecure")) if o.get("tls") else None,
            timeout=10,
        )
        client._client.manual_ack_set(True)  # noqa: SLF001 - see the module docstring
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as e:
            raise BrokerError(f"{where}: {e}") from e
        try:
            yield Session(client, where)
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
