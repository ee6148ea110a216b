"""Serve the app: the runner and its connections, the metrics listener, stop.

The connections (``gateway.edge.connection``) answer fresh hits inline,
render what aiohttp cannot parse in the contract's JSON shape and keep a
deadline on each request head; reload and signals are the composition
root's (``gateway.runtime``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway._aiohttp import ServingRunner
from gateway.api.app import build_app, build_metrics_app
from gateway.api.keys import STATE
from gateway.api.state import GatewayState
from gateway.edge.connection import GatewayServer


class GatewayRunner(ServingRunner):
    """AppRunner whose connections are ``GatewayConnection``: head deadlines, JSON errors, inline hits.

    ``inline_hits``: answer fresh hits below the app; off for the metrics
    listener, whose app has no batch route.
    """

    server_class = GatewayServer

    def __init__(
        self, app: web.Application, header_timeout_s: float, *, inline_hits: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._inline_hits = inline_hits

    def server_made(self, server: web.Server) -> None:
        assert isinstance(server, GatewayServer)
        server.header_timeout_s = self._header_timeout_s
        server.state = self.app[STATE]
        server.inline_hits = self._inline_hits


@dataclass
class RunningGateway:
    runner: GatewayRunner
    state: GatewayState
    host: str
    port: int
    # The listener of /metrics alone (server.metrics_port), if it has one.
    metrics_runner: GatewayRunner | None = None
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where ``/metrics`` is served: its own listener, else the API's."""
        return self.url if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace period, close.

        The metrics listener closes last: a stop is still scraped while it drains.
        """
        await self.runner.cleanup()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        self.state.access_log.flush()
        self.state.metrics.tally.flush()


async def start_gateway(
    state: GatewayState,
    host: str | None = None,
    port: int | None = None,
    *,
    reuse_port: bool = False,
) -> RunningGateway:
    """Start serving ``state`` (built by ``gateway.runtime.build_state``); ``host``/``port`` override
    its config (port 0 picks one).

    ``reuse_port``: listen with SO_REUSEPORT, beside the other workers on the port (gateway/ops/workers.py).
    """
    config = state.snapshot.config
    server = config.server
    runner = GatewayRunner(
        build_app(state),
        header_timeout_s=server.header_timeout_s,
        access_log=None,  # the middleware writes the access log, as JSON
        shutdown_timeout=server.shutdown_grace_s,
        keepalive_timeout=server.keepalive_timeout_s,
        max_line_size=server.max_line_size,
        max_field_size=server.max_field_size,
        max_headers=server.max_headers,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host or server.host,
        server.port if port is None else port,
        backlog=server.backlog,
        reuse_port=reuse_port,
    )
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    running = RunningGateway(runner, state, bound_host, bound_port)
    if server.metrics_port:
        try:
            await _start_metrics_listener(running, host or server.host, reuse_port=reuse_port)
        except BaseException:
            await runner.cleanup()
            raise
    return running


# A scrape is one quick answer: the metrics listener does not hold a stop for long.
METRICS_SHUTDOWN_S = 1.0


async def _start_metrics_listener(running: RunningGateway, host: str, *, reuse_port: bool) -> None:
    """``/metrics`` on ``server.metrics_port``; with workers each one listens there (SO_REUSEPORT)."""
    server = running.state.snapshot.config.server
    if server.metrics_port == running.port:
        # With SO_REUSEPORT (workers) both would bind, and the kernel would split the connections between them.
        raise OSError(errno.EADDRINUSE, f"server.metrics_port {server.metrics_port} is the API port")
    runner = GatewayRunner(
        build_metrics_app(running.state),
        header_timeout_s=server.header_timeout_s,
        inline_hits=False,
        access_log=None,
        shutdown_timeout=METRICS_SHUTDOWN_S,
        keepalive_timeout=server.keepalive_timeout_s,
        max_line_size=server.max_line_size,
        max_field_size=server.max_field_size,
        max_headers=server.max_headers,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, server.metrics_port, backlog=server.backlog, reuse_port=reuse_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    running.metrics_runner = runner
    running.metrics_port = runner.addresses[0][1]
