"""One app's flysticky across server starts: the Decider for this machine and the private
network it starts with the server. Shared by the adapters whose framework tells them when
the server starts and stops (Quart's serving hooks, ASGI lifespan, Litestar's startup).
"""

from __future__ import annotations

import os

from .config import StickyConfig
from .core import Decider, decider_for, log
from .network import PrivateNetwork


class Serving:
    """A served app reads ``FLY_MACHINE_ID`` once, when its server starts. An app that is
    never started (a test client without lifespan) reads it per request instead, so that
    tests may change it; it then has no private network (keys are served where they
    land, big bodies here)."""

    __slots__ = ("_env_value", "config", "decider", "network", "started")

    def __init__(self, config: StickyConfig) -> None:
        self.config = config
        self.decider: Decider | None = None
        self.network: PrivateNetwork | None = None
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
            self.decider = decider_for(self.config, value)
        return self.decider

    async def start(self) -> None:
        """Never raises: a private network that cannot start (a malformed
        FLYSTICKY_RESOLVER, say) is logged and left off, and the app starts without it
        (an error raised into a server's lifespan would skip the app's own startup)."""
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
        self.started = True

    async def stop(self) -> None:
        self.started = False
        network, self.network = self.network, None
        if network is not None:
            await network.stop()

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        decider = self.decider if self.started else None
        return decider.owners.owner(key) if decider is not None else None
