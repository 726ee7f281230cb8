"""The console as one of the daemon's tasks: its routes on the daemon's HTTP server until cancelled."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeos.console.app import Console
from edgeos.console.auth import Authenticator
from edgeos.console.settings import url

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

log = logging.getLogger("edgeos.console")


def make_console(rt: Runtime) -> Console:
    s = rt.config.console
    return Console(rt, Authenticator(s.password_file) if s.password_file is not None else None)


async def serve(rt: Runtime) -> None:
    """Mount the console on `rt.http` (created by the runtime's http task, started before this
    one) and keep it until cancelled. If the server cannot listen, the console waits unseen:
    the http task has logged why, and the daemon collects on."""
    server = rt.http
    if server is None:
        return
    console = make_console(rt)
    console.mount(server)
    try:
        await server.started.wait()
        h = rt.config.http
        rt.console_url = url(h.address, server.port, h.tls_cert is not None)
        log.info("console: %s%s", rt.console_url, " (password required)" if console.auth else "")
        await asyncio.Event().wait()
    finally:
        rt.console_url = None
        console.close()
