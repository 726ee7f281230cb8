"""MQTT transport for the sync: the only module that imports aiomqtt; its errors end here.

QoS 1 for data (the cursor moves on PUBACK), a retained status topic with a last will so the
central side sees online/offline, TLS with hostname verification on by default, and the
password read from a file or an environment variable, never from the config itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from edgeos.errors import SyncError

PUBLISH_TIMEOUT = 30.0


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


def _explain(e: BaseException, where: str) -> str:
    """One clear sentence for the log, from whatever paho/aiomqtt/ssl raised."""
    text = str(e)
    rc = getattr(e, "rc", None)
    code = getattr(rc, "value", rc)
    if code in (4, 5, 134, 135) or "not authori" in text.lower() or "bad user name" in text.lower():
        return f"{where} refused the credentials ({text})"
    if isinstance(e, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return f"TLS: the certificate of {where} failed verification ({getattr(e, 'verify_message', '') or text})"
    if isinstance(e, ssl.SSLError):
        return f"TLS with {where} failed ({text})"
    if isinstance(e, ConnectionRefusedError) or "refused" in text.lower():
        return f"{where} refused the connection (is the broker running?)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {where} ({text})"
    return f"{where}: {type(e).__name__}: {text}"


class _Session:
    def __init__(self, client: aiomqtt.Client, where: str) -> None:
        self.client = client
        self.where = where

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            await self.client.publish(topic, payload, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as e:
            raise SyncError(_explain(e, self.where)) from e


class MqttTransport:
    def __init__(self, gateway: str, options: dict[str, Any], base: Path) -> None:
        self.gateway = gateway
        self.options = options
        self.base = base
        port = options.get("port") or (8883 if options.get("tls") else 1883)
        self.where = f"broker {options['host']}:{port}"
        self.port = port
        self.status_topic = options["status_topic"].format(gateway=gateway)

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
        client = aiomqtt.Client(
            o["host"],
            self.port,
            username=o.get("username"),
            password=_password(o, self.base),
            identifier=o.get("client_id") or f"edgeos-{self.gateway}",
            protocol=aiomqtt.ProtocolVersion.V5 if o["mqtt_version"] == "5" else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.status_topic, self._status("offline"), qos=1, retain=True),
            keepalive=max(1, o["keepalive"] // 1_000_000_000),
            tls_params=self._tls(),
            tls_insecure=bool(o.get("tls_insecure")) if o.get("tls") else None,
            max_inflight_messages=o["max_inflight"] * 2,
            timeout=PUBLISH_TIMEOUT,
        )
        # Our own window bounds what is in flight; aiomqtt would warn from 10 on.
        client.pending_calls_threshold = 4 * o["max_inflight"]
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as e:
            raise SyncError(_explain(e.__cause__ or e, self.where)) from e
        session = _Session(client, self.where)
        try:
            await session.publish(self.status_topic, self._status("online"), retain=True)
            yield session
        finally:
            # A clean DISCONNECT suppresses the last will, so an orderly stop (cancellation
            # included) says "offline" itself; a crash or a lost link leaves it to the will.
            with contextlib.suppress(Exception):
                await client.publish(self.status_topic, self._status("offline"), qos=1, retain=True, timeout=2)
            with contextlib.suppress(Exception):
                # Bounded: a broker that stopped answering must not hold up the daemon's stop.
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)
