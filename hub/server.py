"""Running a node under uvicorn, with the drain of PROTOCOL §7 on SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from hub import fdlimit
from hub.app import create_app
from hub.collector import tune_collector
from hub.deadline import http_protocol
from hub.logs import configure, install_filters
from hub.node import node_of
from hub.proxy_headers import LeanConfig
from hub.settings import Settings
from hub.uvicorn_ws import lean_protocol

log = logging.getLogger("hub.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
EXIT_GRACE_SECONDS = 5.0


class HubServer(uvicorn.Server):
    """First SIGTERM/SIGINT: drain, then exit. A second one, or the deadline: exit now."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        for server in self.servers:
            for listening in server.sockets:
                host, port = listening.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"hub listening on http://{shown}:{port} (ws://{shown}:{port}/ws)",
                      flush=True)
                if host not in ("0.0.0.0", "::"):  # else the first request's local address
                    node_of(self.config.app).address = f"{shown}:{port}"

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or not self.started:
            self.should_exit = True
            self.force_exit = self._drain is not None
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        settings = self.settings
        deadline = settings.drain_delay + settings.drain_seconds + EXIT_GRACE_SECONDS - 1
        try:
            await asyncio.wait_for(node_of(self.config.app).drain(), deadline)
        except TimeoutError:
            log.warning("drain deadline reached; exiting")
        except Exception:
            log.exception("drain failed; exiting")
        self.should_exit = True


def uvicorn_config(
    app: Starlette, settings: Settings, log_config: dict[str, Any] | None = None
) -> uvicorn.Config:
    """uvicorn's configuration for a node's app; it also puts the filter of client noise on
    uvicorn's logger (after uvicorn set up its logging, which this call makes it do)."""
    config = LeanConfig(
        app,
        host=settings.host,
        port=settings.port,
        http=http_protocol(settings.handshake_timeout, node_of(app).metrics.protocol_errors),
        ws=lean_protocol(settings.ping_interval),  # which pings every HUB_PING_INTERVAL
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=log_config,
        log_level=None if log_config else "warning",
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(EXIT_GRACE_SECONDS),
        server_header=False,
        interface="asgi3",  # HubApp.__call__ returns its endpoints' coroutines
    )
    install_filters()
    return config


def serve(settings: Settings) -> int:
    if settings.dev and not is_loopback(settings.host):
        print(f"hub: refusing --dev on non-loopback address {settings.host}", file=sys.stderr)
        return 2
    log_config = configure(settings.log_level, settings.log_format, settings.node_id)
    fdlimit.apply(settings.max_connections)
    config = uvicorn_config(create_app(settings), settings, log_config)
    tune_collector()
    server = HubServer(config, settings)
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit (3) when it cannot bind; ours is 1 (§7)
        return 1
    return 0 if server.started else 1
