"""One app's flysticky across server starts: the Decider for this machine, the private
network and the metrics endpoint it starts with the server. Shared by every adapter
(Sanic's server listeners, Quart's serving hooks, ASGI lifespan, Litestar's startup).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import StickyConfig
from .core import Decider, Tally, decider_for, log
from .network import PrivateNetwork

if TYPE_CHECKING:
    from .metrics import MetricsServer


class Serving:
    """A served app reads ``FLY_MACHINE_ID`` once, when its server starts. An app that is
    never started (a test client without lifespan) reads it per request instead, so that
    tests may change it; it then has no private network (keys are served where they
    land, big bodies here) and serves no metrics (it still counts them)."""

    __slots__ = ("_env_value", "config", "decider", "metrics", "network", "started", "tally")

    def __init__(self, config: StickyConfig) -> None:
        self.config = config
        self.decider: Decider | None = None
        self.network: PrivateNetwork | None = None
        self.metrics: MetricsServer | None = None
        #: The app's counts (metrics on), kept across server starts and deciders.
        self.tally = Tally() if config.metrics_port is not None else None
        #: Between start() and stop(): ``decider`` is the one to use, as it is.
        self.started = False
        self._env_value: str | None = None  # the FLY_MACHINE_ID ``decider`` was made for

    def current(self) -> Decider | None:
        """The Decider for this request; None off Fly."""
        if self.started:
            return self.decider
        value = os.environ.get("FLY_MACHINE_ID")
        if value != self._env_value:
            self._env_value = value
            self.decider = decider_for(self.config, value, self.tally)
        return self.decider

    async def start(self) -> None:
        """Never raises: a private network or a metrics endpoint that cannot start (a
        malformed FLYSTICKY_RESOLVER, a port taken) is logged and left off, and the app
        starts without it (an error raised into a server's lifespan would skip the app's
        own startup)."""
        self.started = False
        decider = self.current()  # the machine id, read once for the server's life
        try:
            network = PrivateNetwork.for_decider(self.config, decider)
            if network is not None:
                await network.start()
        except Exception:
            log.exception("flysticky's private network did not start; serving without it")
            network = None
        self.network = network
        port = self.config.metrics_port
        if port is not None and str(port) == os.environ.get("PORT"):
            # Bound first, it would take the app's own port from the app.
            log.error(
                "StickyConfig.metrics_port=%d is the app's own port ($PORT): metrics not "
                "served. Give them a port of their own, and the same in fly.toml's [metrics].",
                port,
            )
        elif port is not None and decider is not None and self.tally is not None:
            from .metrics import MetricsServer, TallyCollector

            try:
                self.metrics = await MetricsServer.start(
                    TallyCollector(self.tally, lambda: self.decider),
                    port,
                    self.config.metrics_path,
                )
            except Exception:
                log.exception("flysticky's metrics endpoint did not start; serving without it")
        self.started = True

    async def stop(self) -> None:
        self.started = False
        network, self.network = self.network, None
        metrics, self.metrics = self.metrics, None
        if network is not None:
            await network.stop()
        if metrics is not None:
            await metrics.stop()

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        decider = self.decider if self.started else None
        return decider.owners.owner(key) if decider is not None else None
