"""Sanic plugin: ``StickySessions(app)``.

Any Sanic middleware takes every request off Sanic's fastest path, so the pinned
path does not use it. At server start each route handler is wrapped to decide
first; only where the app already runs request middleware on a route (or for a
request that matches no route) does flysticky add a request middleware, placed
first, so that no app hook runs before a due replay.

The pinned path stores nothing: creating ``request.ctx`` was its largest cost. The
app's request class is swapped at start for a subclass whose context class carries
the pinned decision as a class attribute, so ``request.ctx.flysticky`` reads it when
the handler asks; every other decision is stored on the request as before.

Framework internals touched (the one place; checked on Sanic 23.12 to 25.12 by the
version matrix): ``route.handler`` is replaced by a wrapper and flysticky's middleware
is placed in ``route.extra.request_middleware`` and ``app.request_middleware``; the
request context is created through the ``_ctx`` slot; ``app.request_class`` is
replaced by a subclass when the app uses Sanic's own ``make_context``; a request whose
method is ``"NONE"`` is Sanic's stand-in for one it could not parse, and left alone.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterator, Callable
from inspect import isawaitable
from types import SimpleNamespace
from typing import Any

from multidict import CIMultiDict, istr
from sanic import Request, Sanic
from sanic.middleware import Middleware, MiddlewareLocation
from sanic.response import BaseHTTPResponse, HTTPResponse, ResponseStream

from .asgi import websocket_replay
from .config import StickyConfig
from .core import (
    CACHE_STATUS_HEADER,
    REPLAY_HEADER,
    REPLAY_STATUS,
    Decider,
    Decision,
    Outcome,
    apply_stamp,
    join_cookie_headers,
    log,
)
from .serving import Serving

__all__ = ["StickySessions", "current_decision"]

_WRAPPED = "__flysticky_wrapped__"
#: Sanic's Header class defines __getattr__, which makes every method lookup on it
#: slow; the multidict method called directly, with a ready-folded key, is not.
_COOKIE = istr("cookie")
_CACHE_STATUS = istr(CACHE_STATUS_HEADER)
_getall = CIMultiDict.getall
_getone = CIMultiDict.get


def _decided(decider: Decider, request: Request, is_websocket: bool) -> Decision:
    """The decision for ``request``. A Cookie header that surely pins it here is
    ``pinned`` without ``decide``."""
    headers = request.headers
    values = _getall(headers, _COOKIE, None)
    cookie = values[0] if values is not None and len(values) == 1 else join_cookie_headers(values)
    if decider.surely_pinned(cookie):
        tally = decider.tally
        if tally is not None:
            tally.count_pinned(_getone(headers, _CACHE_STATUS, None))
        return decider.pinned
    return decider.decide(request, cookie, headers, is_websocket)


async def _stamped(response: Any, decision: Decision) -> Any:
    if isawaitable(response):
        response = await response
    # ResponseStream (file_stream, large static files) sends its headers only once
    # Sanic streams it, after the handler returns: still time to stamp.
    if isinstance(response, BaseHTTPResponse | ResponseStream):
        apply_stamp(decision, response.headers)
    return response


class _Wrapped:
    """What a wrapper knows of the handler it wraps, kept on the wrapper itself."""

    __slots__ = ("handler", "has_params", "hooked")

    def __init__(self, handler: Callable[..., Any], has_params: bool) -> None:
        self.handler = handler
        self.has_params = has_params
        # Whether a route it serves runs app request hooks, so that flysticky's
        # first-placed middleware has already decided.
        self.hooked = False


#: The method of the stand-in request Sanic's error path makes for a request it could
#: not parse: nothing to decide (its headers are empty, so any decision would be wrong).
_UNPARSED = "NONE"
#: What ``_apply`` answers for a body that goes home over the private network.
_FORWARD = object()


def current_decision(request: Request) -> Decision | None:
    """The decision flysticky made for ``request``; None off Fly."""
    return getattr(request.ctx, "flysticky", None)


class _ImplicitDecision:
    """``flysticky`` on the context class: the plugin's implicit (pinned) decision. A
    non-data descriptor, so a decision stored on a context overrides it."""

    def __init__(self, plugin: StickySessions) -> None:
        self._plugin = plugin

    def __get__(self, context: object, owner: type | None = None) -> Decision | None:
        return self._plugin._implicit


def _pinned_request_class(base: type[Request], plugin: StickySessions) -> type[Request]:
    """``base`` whose lazily made context already knows the pinned decision."""

    class PinnedContext(SimpleNamespace):
        flysticky = _ImplicitDecision(plugin)

    class StickyRequest(base):  # type: ignore[valid-type,misc]
        __slots__ = ()

        @staticmethod
        def make_context() -> Any:
            return PinnedContext()

    # Sanic's logs and reprs name the request class: keep the app's name there.
    StickyRequest.__name__ = StickyRequest.__qualname__ = base.__name__
    return StickyRequest


async def _streamed_body(request: Request) -> AsyncIterator[bytes]:
    """A streaming route's body, read as it arrives (Sanic has not read it)."""
    stream: Any = request.stream
    while (chunk := await stream.read()) is not None:
        yield chunk


class _AsgiWebsocketReplay(HTTPResponse):
    """Under an ASGI server Sanic cannot answer a websocket handshake with an HTTP
    response; the ASGI websocket denial response carries the 307 instead."""

    async def send(self, data: Any = None, end_stream: bool | None = None) -> None:
        transport: Any = self.stream.transport  # type: ignore[union-attr]
        # Sanic has read the handshake's websocket.connect already (as its "body").
        await websocket_replay(transport.scope, None, transport.send, self.headers[REPLAY_HEADER])


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
        # The decision a request carries without storing it (see the module's doc):
        # the pinned one when the app's request class was swapped, else none.
        self._implicit: Decision | None = None
        # What the wrappers test the Cookie header against inline (the core's
        # pinned_cookie_text_ending and pinned_cookie_text): set only when a pinned
        # request needs nothing but its handler (the implicit decision is the pinned one,
        # nothing to count); else None, and every request goes through decide.
        self._pinned_ending: str | None = None
        self._pinned_text: str | None = None
        self._app_request_class: type[Request] | None = None
        self._request_classes: dict[type[Request], type[Request]] = {}
        self._middleware = Middleware(self._request_middleware, MiddlewareLocation.REQUEST)
        self._serving = Serving(self.config)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Sanic[Any, Any]) -> None:
        if getattr(app.ctx, "flysticky", None) is not None:
            raise RuntimeError(f"flysticky is already installed on Sanic app {app.name!r}")
        app.ctx.flysticky = self
        app.register_listener(self._start, "before_server_start")
        app.register_listener(self._stop, "after_server_stop")

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        return self._serving.owner(key)

    async def _start(self, app: Sanic[Any, Any]) -> None:
        # Runs at every server start (sanic-testing's ASGI client starts the app for
        # each request), after Sanic has finalized routes and middleware.
        await self._serving.start()
        self._wire(app, self._serving.decider)

    async def _stop(self, app: Sanic[Any, Any]) -> None:
        await self._serving.stop()

    def _apply(
        self, request: Request, decision: Decision, is_websocket: bool
    ) -> HTTPResponse | Decision | object | None:
        """Store a decision that is not the implicit one; then what the wrapper does:
        answer with the replay, stamp the handler's response, forward the request
        (_FORWARD), or (None) just serve."""
        request.ctx.flysticky = decision
        if decision.replay is not None:
            return _replay_response(request, decision.replay, is_websocket)
        network = self._serving.network
        if network is not None and network.takes(decision):
            return _FORWARD
        return decision if decision.set_cookie is not None else None

    async def _forwarded(self, request: Request, decision: Decision) -> ResponseStream | None:
        """The request sent to its machine over the private network, that machine's
        answer streamed back; None when it cannot be (then it is served here)."""
        network = self._serving.network
        if network is None:
            return None
        body: bytes | AsyncIterator[bytes] = request.body
        route = request.route
        if route is not None and hasattr(route.handler, "is_stream"):
            body = _streamed_body(request)
        forwarded = await network.forward(
            decision,
            request.method,
            request.raw_url.decode("latin-1"),
            request.headers.items(),
            body,
        )
        if forwarded is None:
            return None
        request.ctx.flysticky = forwarded.decision
        answer = forwarded.body

        async def relay(stream: Any) -> None:
            async for chunk in answer:
                await stream.write(chunk)

        # A list keeps repeated headers (Set-Cookie); Sanic makes its Header of it.
        headers: Any = forwarded.headers
        return ResponseStream(relay, forwarded.status, headers=headers)

    async def _forward_or_serve(
        self, request: Request, decision: Decision, serve: Callable[[], Any]
    ) -> Any:
        response = await self._forwarded(request, decision)
        if response is not None:
            return response
        served = serve()
        return await served if isawaitable(served) else served

    async def _request_middleware(self, request: Request) -> HTTPResponse | None:
        decider = self._decider
        if decider is None or request.method == _UNPARSED:
            return None
        decided = current_decision(request)
        if decided is not None and decided.outcome is not Outcome.PINNED:
            return None  # decided already, by this middleware in another chain
        handler = request.route.handler if request.route is not None else None
        is_websocket = hasattr(handler, "is_websocket")
        decision = _decided(decider, request, is_websocket)
        verdict = self._apply(request, decision, is_websocket)
        if verdict is _FORWARD:
            # Sanic sends a ResponseStream a middleware returns, as it sends a handler's;
            # its Middleware type names HTTPResponse only.
            forwarded: Any = await self._forwarded(request, decision)
            return forwarded  # type: ignore[no-any-return]
        return verdict if isinstance(verdict, HTTPResponse) else None

    def _hooked_verdict(self, request: Request) -> Decision | None:
        """On a route with app request hooks flysticky's middleware decided first (and
        answered any replay): the decision whose cookie the response must carry."""
        decision: Decision = request.ctx.flysticky
        return decision if decision.set_cookie is not None else None

    def _wrap(self, handler: Callable[..., Any], has_params: bool) -> Callable[..., Any]:
        """The route handler, deciding first. Runs on every request: kept lean.

        It is a plain function: Sanic awaits whatever it returns, so the pinned path
        hands back the handler's own coroutine, with no extra frame around it. The pinned
        path is tested inline, against the core's ``pinned_cookie_text_ending`` (as the
        ASGI adapter does on raw bytes), before anything else. A route without path
        parameters gets a wrapper that takes the request alone, sparing the packing of
        empty arguments on every request. The same handler keeps the same wrapper across
        server starts: Sanic's router caches it.
        """
        wrapped: _Wrapped | None = getattr(handler, _WRAPPED, None)
        if wrapped is not None:
            if has_params and not wrapped.has_params:
                return self._wrap(wrapped.handler, True)
            return handler
        plugin = self
        is_websocket = hasattr(handler, "is_websocket")
        info = _Wrapped(handler, has_params)
        sticky_handler: Callable[..., Any]

        # Two copies of the same lines, one per signature: every path runs inline in
        # either, without a call to a shared helper (which would cost the pinned path
        # more than its whole test, and the other paths the packing of arguments).
        if has_params:

            def sticky_handler(request: Request, *args: Any, **kwargs: Any) -> Any:
                decider = plugin._decider
                if decider is not None:
                    verdict: HTTPResponse | Decision | object | None
                    if info.hooked:
                        verdict = plugin._hooked_verdict(request)
                    else:
                        ending = plugin._pinned_ending
                        if ending is None:
                            decision = _decided(decider, request, is_websocket)
                        else:  # the pinned path's test, inline; then decide() for the rest
                            headers = request.headers
                            values = _getall(headers, _COOKIE, None)
                            cookie: str | None
                            if values is not None and len(values) == 1:
                                cookie = one = values[0]
                                if one.endswith(ending) or one == plugin._pinned_text:
                                    return handler(request, *args, **kwargs)
                            else:
                                cookie = join_cookie_headers(values)
                            decision = decider.decide(request, cookie, headers, is_websocket)
                        if decision is plugin._implicit:
                            return handler(request, *args, **kwargs)
                        verdict = plugin._apply(request, decision, is_websocket)
                    if verdict.__class__ is Decision:
                        return _stamped(handler(request, *args, **kwargs), verdict)
                    if verdict is not None:
                        if verdict is _FORWARD:
                            return plugin._forward_or_serve(
                                request, decision, lambda: handler(request, *args, **kwargs)
                            )
                        return verdict
                return handler(request, *args, **kwargs)

        else:

            def sticky_handler(request: Request) -> Any:
                decider = plugin._decider
                if decider is not None:
                    verdict: HTTPResponse | Decision | object | None
                    if info.hooked:
                        verdict = plugin._hooked_verdict(request)
                    else:
                        ending = plugin._pinned_ending
                        if ending is None:
                            decision = _decided(decider, request, is_websocket)
                        else:  # the pinned path's test, inline; then decide() for the rest
                            headers = request.headers
                            values = _getall(headers, _COOKIE, None)
                            cookie: str | None
                            if values is not None and len(values) == 1:
                                cookie = one = values[0]
                                if one.endswith(ending) or one == plugin._pinned_text:
                                    return handler(request)
                            else:
                                cookie = join_cookie_headers(values)
                            decision = decider.decide(request, cookie, headers, is_websocket)
                        if decision is plugin._implicit:
                            return handler(request)
                        verdict = plugin._apply(request, decision, is_websocket)
                    if verdict.__class__ is Decision:
                        return _stamped(handler(request), verdict)
                    if verdict is not None:
                        if verdict is _FORWARD:
                            return plugin._forward_or_serve(
                                request, decision, lambda: handler(request)
                            )
                        return verdict
                return handler(request)

        functools.update_wrapper(sticky_handler, handler)
        setattr(sticky_handler, _WRAPPED, info)
        return sticky_handler

    def _place_middleware(self, chain: deque[Any], wanted: bool) -> None:
        while self._middleware in chain:
            chain.remove(self._middleware)
        if wanted:
            chain.appendleft(self._middleware)

    def _request_class(self, app: Sanic[Any, Any], decider: Decider | None) -> type[Request]:
        """The request class to serve with: the app's own, or (on Fly, when the app
        makes Sanic's plain context) one whose context carries the pinned decision."""
        base = self._app_request_class
        if base is None or app.request_class not in (base, *self._request_classes.values()):
            base = self._app_request_class = app.request_class or Request
        if decider is None or base.make_context is not Request.make_context:
            self._implicit = None
            return base
        self._implicit = decider.pinned
        made = self._request_classes.get(base)
        if made is None:
            made = self._request_classes[base] = _pinned_request_class(base, self)
        return made

    def _wire(self, app: Sanic[Any, Any], decider: Decider | None) -> None:
        self._pinned_ending = self._pinned_text = None  # armed below, for this decider only
        self._decider = decider
        app.request_class = self._request_class(app, decider)
        if decider is not None and decider.tally is None and self._implicit is decider.pinned:
            self._pinned_ending = decider.pinned_cookie_text_ending
            self._pinned_text = decider.pinned_cookie_text
        on_fly = decider is not None
        for route in app.router.routes:
            chain = route.extra.request_middleware
            app_hooks = any(m is not self._middleware for m in chain)
            if on_fly:
                route.handler = self._wrap(route.handler, bool(route.params))
                wrapped: _Wrapped = getattr(route.handler, _WRAPPED)
                wrapped.hooked = wrapped.hooked or app_hooks
            self._place_middleware(chain, on_fly and app_hooks)
        # Used only for requests that match no route and errors raised before routing
        # finished; the pinned path never sees it.
        self._place_middleware(app.request_middleware, on_fly)
        if decider is not None:
            log.debug("flysticky on for Sanic app %s as machine %s", app.name, decider.machine_id)
        else:
            log.debug("FLY_MACHINE_ID unset: flysticky does nothing on Sanic app %s", app.name)
