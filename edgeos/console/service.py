"""The console as one of the daemon's tasks: listen, serve until cancelled, then close."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeos.console import server
from edgeos.console.app import Console
from edgeos.console.auth import Authenticator

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

log = logging.getLogger("edgeos.console")


async def serve(rt: Runtime) -> None:
    """Run the console for `rt` until cancelled. A console that cannot listen (port taken) is
    logged and given up: it must never stop the daemon from collecting."""
    s = rt.config.console
    auth = Authenticator(s.password_file) if s.password_file is not None else None
    console = Console(rt, auth)
    try:
        tls = server.tls_context(str(s.cert_file), str(s.key_file)) if s.cert_file and s.key_file else None
        srv = await server.start(console.handle, s.address, s.port, tls)
    except OSError as e:
        log.error("console: cannot listen on %s:%d: %s; the daemon runs without it", s.address, s.port, e)
        console.close()
        return
    port = srv.sockets[0].getsockname()[1]
    rt.console_url = s.url(port)
    log.info("console: %s%s", rt.console_url, " (password required)" if auth else "")
    try:
        await asyncio.Event().wait()
    finally:
        rt.console_url = None
        await server.stop(srv)
        console.close()
