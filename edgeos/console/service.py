"""The console as one of the daemon's tasks: its routes on a local HTTP server, until cancelled."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edgeos.console.app import Console
from edgeos.console.auth import Authenticator
from edgeos.service.http import HttpServer, HttpSettings

if TYPE_CHECKING:
    from edgeos.runtime import Runtime

log = logging.getLogger("edgeos.console")


def make_console(rt: Runtime) -> Console:
    s = rt.config.console
    return Console(rt, Authenticator(s.password_file) if s.password_file is not None else None)


async def serve(rt: Runtime) -> None:
    """Listen on [console]'s address and serve until cancelled. A console that cannot listen
    (a port taken) is logged and given up: it must never stop the daemon from collecting."""
    s = rt.config.console
    console = make_console(rt)
    server = HttpServer(HttpSettings(address=s.address, port=s.port, tls_cert=s.cert_file, tls_key=s.key_file))
    console.mount(server)
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve(), name="console-http")
            started = tg.create_task(server.started.wait(), name="console-started")
            await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
            if server.started.is_set():
                rt.console_url = s.url(server.port)
                log.info("console: %s%s", rt.console_url, " (password required)" if console.auth else "")
    except* OSError as eg:
        log.warning(
            "console: cannot listen on %s:%d: %s; the daemon runs without it", s.address, s.port, eg.exceptions[0]
        )
    finally:
        rt.console_url = None
        console.close()
