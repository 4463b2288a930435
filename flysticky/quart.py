"""Quart extension: ``StickySessions(app)`` or ``StickySessions().init_app(app)``.

flysticky decides in the app's own preprocessing step, before its
``url_value_preprocessors`` and ``before_request``/``before_websocket`` functions, so
a due replay is answered before any app hook runs. The Set-Cookie is added by a
per-request ``after_this_request``, so the pinned path adds no hook at all.

Framework internals touched (the one place; checked on Quart 0.19.9 to 0.23.1 by the
version matrix): ``Quart.preprocess_request`` and ``Quart.preprocess_websocket`` are
replaced on the app instance. Their argument changed in 0.23 (a RequestContext or
WebsocketContext before, the merged AppContext since); both have ``.request`` /
``.websocket``, and without an argument the public ``request``/``websocket`` proxies
give the same object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Quart, Response, after_this_request, g, request, websocket
from quart.typing import ResponseReturnValue
from werkzeug.datastructures import Headers
from werkzeug.wrappers import Response as WerkzeugResponse

from .config import StickyConfig
from .core import (
    REPLAY_HEADER,
    REPLAY_STATUS,
    Decision,
    HeaderTable,
    apply_stamp,
    join_cookie_headers,
)
from .network import PrivateNetwork
from .serving import Serving

__all__ = ["StickySessions", "current_decision"]


def current_decision() -> Decision | None:
    """The decision flysticky made for the current request or websocket; None off Fly."""
    return cast("Decision | None", g.get("flysticky"))


class StickySessions:
    """Pins each session to the Fly machine that first served it."""

    def __init__(self, app: Quart | None = None, config: StickyConfig | None = None) -> None:
        self.config = config if config is not None else StickyConfig()
        self._serving = Serving(self.config)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        if "flysticky" in app.extensions:
            raise RuntimeError(f"flysticky is already installed on Quart app {app.name!r}")
        app.extensions["flysticky"] = self
        # Deciding inside the app's own preprocessing step puts flysticky before its
        # url_value_preprocessors and before_request/before_websocket functions
        # (blueprints' included), and costs less than one more hook in those lists.
        # Typed as Any: the methods' signatures differ between Quart versions.
        target: Any = app
        target.preprocess_request = self._preprocessor(app.preprocess_request, False)
        target.preprocess_websocket = self._preprocessor(app.preprocess_websocket, True)
        app.before_serving(self._serving.start)
        app.after_serving(self._serving.stop)

    def _preprocessor(
        self,
        preprocess: Callable[..., Awaitable[ResponseReturnValue | None]],
        is_websocket: bool,
    ) -> Callable[..., Awaitable[ResponseReturnValue | None]]:
        kind = "websocket" if is_websocket else "request"
        proxy: Any = websocket if is_websocket else request

        async def sticky_preprocess(
            context: Any = None, /, *args: Any, **kwargs: Any
        ) -> ResponseReturnValue | None:
            target = getattr(context, kind) if context is not None else proxy._get_current_object()
            answer = self._decide(target, is_websocket)
            if answer is not None:
                return await answer if isinstance(answer, Awaitable) else answer
            if context is None:
                return await preprocess(*args, **kwargs)
            return await preprocess(context, *args, **kwargs)

        return sticky_preprocess

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        return self._serving.owner(key)

    def _decide(
        self, target: Any, is_websocket: bool
    ) -> Response | Awaitable[Response | None] | None:
        serving = self._serving
        decider = serving.decider if serving.started else serving.current()
        if decider is None:
            return None
        headers: Headers = target.headers
        cookie = join_cookie_headers(headers.getlist("cookie"))
        if decider.surely_pinned(cookie):  # every request of every session: nothing to add
            tally = decider.tally
            if tally is not None:  # the raw headers: Werkzeug's lookup of a missing one raises
                tally.count_pinned_raw(target.scope["headers"])
            g.flysticky = decider.pinned
            return None
        decision = decider.decide(target, cookie, HeaderTable(headers.items()), is_websocket)
        g.flysticky = decision
        if decision is decider.pinned:
            return None
        if decision.replay is not None:
            return Response(b"", REPLAY_STATUS, {REPLAY_HEADER: decision.replay})
        network = serving.network
        if network is not None and network.takes(decision):
            return self._forwarded(target, decision, network)
        if decision.set_cookie is not None:

            async def stamp(
                response: Response | WerkzeugResponse,
            ) -> Response | WerkzeugResponse:
                apply_stamp(decision, response.headers)
                return response

            after_this_request(stamp)
        return None

    async def _forwarded(
        self, target: Any, decision: Decision, network: PrivateNetwork
    ) -> Response | None:
        """The request sent to its machine over the private network, its body streamed
        as it arrives and the answer streamed back; None when it cannot be (then it is
        served here)."""
        scope = target.scope
        path = scope.get("raw_path") or target.path.encode()
        query = scope.get("query_string", b"")
        forwarded = await network.forward(
            decision,
            target.method,
            (path + b"?" + query if query else path).decode("latin-1"),
            target.headers.items(),
            target.body,
        )
        if forwarded is None:
            return None
        g.flysticky = forwarded.decision
        return Response(forwarded.body, forwarded.status, Headers(forwarded.headers))
