"""Litestar plugin: ``Litestar(route_handlers=[...], plugins=[StickySessions(config)])``.

Litestar runs an app's ``middleware`` per route, after routing, and never passes the
lifespan through it. The plugin puts flysticky's ASGI middleware first in the app's
middleware (so it decides before any other middleware, guard, dependency or
``before_request`` hook) and starts and stops its private network with the app's
``on_startup``/``on_shutdown``. A request that matches no route never reaches any
middleware in Litestar: it is answered (404/405) where it lands, without a cookie.

The skipper and the key function get Litestar's ``Request`` (``WebSocket`` for a
websocket), with the route already matched (``request.route_handler``). The decision is
``request.state.flysticky`` or ``flysticky.asgi.current_decision(request)``.

No Litestar internals: ``on_app_init`` (any object with it is an init plugin, on every
Litestar 2 release) and ``AppConfig``'s public lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .asgi import ASGIApp
from .asgi import StickySessions as StickyMiddleware
from .config import StickyConfig
from .serving import Serving

if TYPE_CHECKING:
    from litestar.config.app import AppConfig

__all__ = ["StickySessions"]


class StickySessions:
    """Pins each session to the Fly machine that first served it (a Litestar plugin)."""

    def __init__(self, config: StickyConfig | None = None) -> None:
        self.config = config if config is not None else StickyConfig()
        #: Shared by the middleware of every route (Litestar makes one per route).
        self._serving = Serving(self.config)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if any(getattr(m, "__self__", None) is self for m in app_config.middleware):
            raise RuntimeError("this flysticky plugin is already installed")
        app_config.middleware.insert(0, self._middleware)
        app_config.on_startup.append(self._serving.start)
        app_config.on_shutdown.append(self._serving.stop)
        return app_config

    def _middleware(self, app: ASGIApp) -> Any:
        return StickyMiddleware(app, self.config, serving=self._serving)

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        return self._serving.owner(key)
