"""Sanic plugin: ``StickySessions(app)``.

Any Sanic middleware takes every request off Sanic's fastest path, so the pinned
path does not use it. At server start each route handler is wrapped to decide
first; only where the app already runs request middleware on a route (or for a
request that matches no route) does flysticky add a request middleware, placed
first, so that no app hook runs before a due replay.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable
from inspect import isawaitable
from types import SimpleNamespace
from typing import Any

from sanic import Request, Sanic
from sanic.middleware import Middleware, MiddlewareLocation
from sanic.response import BaseHTTPResponse, HTTPResponse, ResponseStream

from .config import StickyConfig
from .core import (
    REPLAY_HEADER,
    REPLAY_STATUS,
    Decider,
    Decision,
    apply_stamp,
    decider_for,
    join_cookie_headers,
    log,
)

__all__ = ["StickySessions", "current_decision"]

_WRAPPED = "__flysticky_wrapped__"


async def _stamped(response: Any, decision: Decision) -> Any:
    if isawaitable(response):
        response = await response
    # ResponseStream (file_stream, large static files) sends its headers only once
    # Sanic streams it, after the handler returns: still time to stamp.
    if isinstance(response, BaseHTTPResponse | ResponseStream):
        apply_stamp(decision, response.headers)
    return response


class _RouteHooks:
    """Whether a wrapped handler serves a route where app request hooks run, so that
    flysticky's first-placed middleware has already decided."""

    present = False


def current_decision(request: Request) -> Decision | None:
    """The decision flysticky made for ``request``; None off Fly."""
    return getattr(request.ctx, "flysticky", None)


class _AsgiWebsocketReplay(HTTPResponse):
    """Under an ASGI server Sanic cannot answer a websocket handshake with an HTTP
    response; the ASGI websocket denial response carries the 307 instead."""

    async def send(self, data: Any = None, end_stream: bool | None = None) -> None:
        transport: Any = self.stream.transport  # type: ignore[union-attr]
        if "websocket.http.response" not in transport.scope.get("extensions", {}):
            log.warning("this ASGI server cannot send a fly-replay for a websocket; closing")
            await transport.send({"type": "websocket.close", "code": 1013})
            return
        headers = [(name.encode(), value.encode()) for name, value in self.headers.items()]
        await transport.send(
            {"type": "websocket.http.response.start", "status": self.status, "headers": headers}
        )
        await transport.send({"type": "websocket.http.response.body", "body": b""})


def _replay_response(request: Request, replay: str, is_websocket: bool) -> HTTPResponse:
    kind = _AsgiWebsocketReplay if is_websocket and request.app.asgi else HTTPResponse
    # An explicit content type: left unset, Sanic's ASGI path sends "content-type: None".
    return kind(
        b"", REPLAY_STATUS, {REPLAY_HEADER: replay}, content_type="text/plain; charset=utf-8"
    )


class StickySessions:
    """Pins each session to the Fly machine that first served it."""

    def __init__(
        self, app: Sanic[Any, Any] | None = None, config: StickyConfig | None = None
    ) -> None:
        self.config = config if config is not None else StickyConfig()
        self._decider: Decider | None = None
        # Sanic creates request.ctx lazily, through a property, make_context() and a
        # cast: about a microsecond a request on a loaded server, a third of what
        # flysticky costs. When the app's request class makes Sanic's own
        # SimpleNamespace context, flysticky creates it directly (see _wire).
        self._own_context = False
        self._middleware = Middleware(self._request_middleware, MiddlewareLocation.REQUEST)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Sanic[Any, Any]) -> None:
        if getattr(app.ctx, "flysticky", None) is not None:
            raise RuntimeError(f"flysticky is already installed on Sanic app {app.name!r}")
        app.ctx.flysticky = self
        app.register_listener(self._wire, "before_server_start")

    def _decide(self, decider: Decider, request: Request, is_websocket: bool) -> Decision:
        """Decide ``request`` and keep the decision in ``request.ctx.flysticky``."""
        headers = request.headers
        cookie = join_cookie_headers(headers.getall("cookie", None))
        decision = decider.decide(request, cookie, headers, is_websocket)
        if self._own_context and request._ctx is None:
            request._ctx = SimpleNamespace(flysticky=decision)
        else:
            request.ctx.flysticky = decision
        return decision

    async def _request_middleware(self, request: Request) -> HTTPResponse | None:
        decider = self._decider
        if decider is None or current_decision(request) is not None:
            return None
        handler = request.route.handler if request.route is not None else None
        is_websocket = hasattr(handler, "is_websocket")
        decision = self._decide(decider, request, is_websocket)
        if decision.replay is None:
            return None
        return _replay_response(request, decision.replay, is_websocket)

    def _wrap(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """The route handler, deciding first. Runs on every request: kept lean.

        It is a plain function: Sanic awaits whatever it returns, so the pinned path
        hands back the handler's own coroutine, with no extra frame around it.
        """
        if hasattr(handler, _WRAPPED):
            return handler
        plugin = self
        is_websocket = hasattr(handler, "is_websocket")
        route_hooks = _RouteHooks()

        @functools.wraps(handler)
        def sticky_handler(request: Request, *args: Any, **kwargs: Any) -> Any:
            decider = plugin._decider
            if decider is None:
                return handler(request, *args, **kwargs)
            # On a route with app request hooks, flysticky's middleware decided first.
            decision = getattr(request.ctx, "flysticky", None) if route_hooks.present else None
            if decision is None:
                decision = plugin._decide(decider, request, is_websocket)
                if decision.replay is not None:
                    return _replay_response(request, decision.replay, is_websocket)
            if decision.set_cookie is None:
                return handler(request, *args, **kwargs)
            return _stamped(handler(request, *args, **kwargs), decision)

        setattr(sticky_handler, _WRAPPED, route_hooks)
        return sticky_handler

    def _place_middleware(self, chain: deque[Any], wanted: bool) -> None:
        while self._middleware in chain:
            chain.remove(self._middleware)
        if wanted:
            chain.appendleft(self._middleware)

    def _wire(self, app: Sanic[Any, Any]) -> None:
        # Runs at every server start (sanic-testing's ASGI client starts the app for
        # each request), after Sanic has finalized routes and middleware.
        decider = self._decider = decider_for(self.config, os.environ.get("FLY_MACHINE_ID"))
        self._own_context = (
            "_ctx" in Request.__slots__ and app.request_class.make_context is Request.make_context
        )
        on_fly = decider is not None
        for route in app.router.routes:
            chain = route.extra.request_middleware
            app_hooks = any(m is not self._middleware for m in chain)
            if on_fly:
                route.handler = self._wrap(route.handler)
                hooks: _RouteHooks = getattr(route.handler, _WRAPPED)
                hooks.present = hooks.present or app_hooks
            self._place_middleware(chain, on_fly and app_hooks)
        # Used only for requests that match no route and errors raised before routing
        # finished; the pinned path never sees it.
        self._place_middleware(app.request_middleware, on_fly)
        if decider is not None:
            log.debug("flysticky on for Sanic app %s as machine %s", app.name, decider.machine_id)
        else:
            log.debug("FLY_MACHINE_ID unset: flysticky does nothing on Sanic app %s", app.name)
