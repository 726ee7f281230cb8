"""A local control socket in the data directory: commands to the running daemon (write,
status, reload).

Unix socket, one JSON object per line each way; file permissions (0600, the daemon's user)
are the access control, so a write needs the same rights as reading the store. Requests are
handled in the daemon's own loop through `Runtime.write`, so they share the device's
connection: no second master on a serial bus, no second session on a PLC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("edgeos.control")

SOCKET_NAME = "control.sock"
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


async def serve(data_dir: Path, handle: Handler) -> None:
    """Serve until cancelled; removes the socket file on the way out."""
    path = socket_path(data_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a crash (the store lock guarantees we are alone)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                line = await reader.readline()
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("expected a JSON object")
                    request["_peer"] = _peer(writer)  # who asked, for the write audit log
                    reply = await handle(request)
                except Exception as e:  # every failure is an answer, never a dead daemon
                    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                    reply = {"ok": False, "error": text or type(e).__name__}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_unix_server(client, sock=_bind(path))
    except OSError as e:
        # e.g. a data_dir path too long for a Unix socket (108 bytes): the daemon runs on,
        # only writes through it are unavailable.
        log.warning("control socket %s unavailable (%s); edgeos write will connect directly", path, e)
        return
    try:
        async with server:
            await server.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _bind(path: Path) -> socket.socket:
    """A listening Unix socket, 0600 before it listens. No umask change: the umask is
    process-wide, and the store thread creates files meanwhile. (Connecting needs write
    permission on the socket, which the usual umask already withholds from others between
    the bind and the chmod, and the data directory is 0750.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer(writer: asyncio.StreamWriter) -> str:
    """'uid U pid P' of the process on the other end (SO_PEERCRED), or '?'."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return "?"
    return f"uid {uid} pid {pid} (control socket)"


async def request(data_dir: Path, doc: dict[str, Any], within: float = 30.0) -> dict[str, Any] | None:
    """Send one request to the daemon of `data_dir`; None when no daemon listens there."""
    path = socket_path(data_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    try:
        async with asyncio.timeout(within):
            writer.write(json.dumps(doc).encode() + b"\n")
            await writer.drain()
            return json.loads(await reader.readline())
    finally:
        writer.close()
