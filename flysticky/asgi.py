"""ASGI middleware: ``app = StickySessions(app)``, or Starlette's and FastAPI's
``app.add_middleware(StickySessions, config=StickyConfig(...))``.

Pure ASGI: it reads the scope, answers a due replay itself and calls nothing of the
app; otherwise it calls the app with the scope, ``receive`` and ``send`` it was given,
wrapping ``send`` only on a response that must carry the cookie. The decision is
``scope["state"]["flysticky"]`` (``request.state.flysticky`` in Starlette, FastAPI and
Litestar) and ``current_decision(request)``.

Websocket handshakes are decided before the app sees them: a replay is the 307 with
``fly-replay``, sent as the ASGI websocket denial response where the server offers it
(Uvicorn, Hypercorn); elsewhere the handshake is accepted and closed with 1013 (try
again later), which reconnecting clients retry, and a warning says why.

Lifespan scopes pass through with their messages untouched; flysticky watches
``lifespan.startup`` to read ``FLY_MACHINE_ID`` once and start its private network
(discovery for keys, forwarding of big bodies), and ``lifespan.shutdown.complete`` to
stop it. Other scope types pass through untouched. No framework internals are used.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from .config import StickyConfig
from .core import (
    REPLAY_HEADER,
    REPLAY_STATUS,
    Decider,
    Decision,
    HeaderTable,
    apply_stamp,
    log,
)
from .network import PrivateNetwork
from .serving import Serving

__all__ = ["StickySessions", "current_decision", "websocket_replay"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The close code of a websocket handshake that should have been replayed, on a server
#: without the websocket denial response: "try again later" (RFC 6455 7.4.1, 1013).
RETRY_CLOSE_CODE = 1013
_DENIAL = "websocket.http.response"
_STATE_KEY = "flysticky"


def current_decision(connection: Any) -> Decision | None:
    """The decision flysticky made for a request or websocket: pass the framework's
    request (anything with ``.scope``) or the ASGI scope. None off Fly."""
    scope = connection if isinstance(connection, Mapping) else getattr(connection, "scope", None)
    if not isinstance(scope, Mapping):
        raise TypeError(
            f"current_decision() takes a request, a websocket or an ASGI scope, "
            f"not {type(connection).__name__}"
        )
    state = scope.get("state")
    return state.get(_STATE_KEY) if isinstance(state, Mapping) else None


class _ScopeHeaders(HeaderTable):
    """The core's header lookup over an ASGI scope's raw headers, decoded on first use
    (the pinned path reads only the cookie)."""

    __slots__ = ()

    def _lookup(self) -> dict[str, str]:
        table = self._table
        if table is None:
            table = {}
            raw: Any = self._pairs  # (bytes, bytes) pairs, as ASGI gives them
            for name, value in raw:
                table.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            self._table = table
        return table


class _RawHeaders:
    """The core's response-header interface over an ASGI message's header list."""

    __slots__ = ("_headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers

    def get(self, key: str, /) -> str | None:
        """Every line of the header, joined as one (RFC 9110 5.3: a list header may come
        as several lines)."""
        name = key.encode("latin-1")
        values = [v.decode("latin-1") for k, v in self._headers if k.lower() == name]
        return ", ".join(values) if values else None

    def add(self, key: str, value: str, /) -> None:
        self._headers.append((key.encode("latin-1"), value.encode("latin-1")))

    def __setitem__(self, key: str, value: str, /) -> None:
        name = key.encode("latin-1")
        self._headers[:] = [(k, v) for k, v in self._headers if k.lower() != name]
        self.add(key, value)


_warned_no_denial = False
#: Once per process: Litestar without the plugin makes one middleware per route.
_warned_no_lifespan = False


async def websocket_replay(scope: Scope, receive: Receive | None, send: Send, replay: str) -> None:
    """Answer a websocket handshake with a replay, before the upgrade: the 307 and
    ``fly-replay`` as the websocket denial response, or, on a server without it, an
    accepted handshake closed with RETRY_CLOSE_CODE. ``receive`` is None when the
    framework has taken the ``websocket.connect`` message already (Sanic)."""
    if receive is not None and (await receive())["type"] != "websocket.connect":
        return  # the client left already
    if _DENIAL in (scope.get("extensions") or {}):
        return await _send_replay(send, replay, "websocket.http.response")
    global _warned_no_denial
    if not _warned_no_denial:
        _warned_no_denial = True
        log.warning(
            "this ASGI server has no websocket denial response (%s): a websocket handshake "
            "that belongs on another machine cannot carry fly-replay; it is closed with "
            "%d (try again later) instead. Uvicorn and Hypercorn have it.",
            _DENIAL,
            RETRY_CLOSE_CODE,
        )
    else:
        log.info("websocket for %s closed with %d: no fly-replay here", replay, RETRY_CLOSE_CODE)
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": RETRY_CLOSE_CODE, "reason": "replay"})


def _framework_app(app: Any) -> Any:
    """The Starlette or Litestar app inside ``app`` and the ASGI wrappers around it
    (middleware keeps the next app as ``.app``; python-socketio's ASGIApp as
    ``.other_asgi_app``); ``app`` itself when there is none."""
    frameworks = tuple(
        getattr(module, name)
        for module, name in (
            (sys.modules.get("starlette.applications"), "Starlette"),
            (sys.modules.get("litestar.app"), "Litestar"),
        )
        if module is not None
    )
    found, seen = app, 0
    while found is not None and seen < 32:
        if frameworks and isinstance(found, frameworks):
            return found
        found = getattr(found, "app", None) or getattr(found, "other_asgi_app", None)
        seen += 1
    return app


def _connection_for(owner: Any) -> Callable[[Scope, Receive, Send], Any]:
    """What the skipper and the key function get, by the framework of ``owner``:
    Starlette's (and FastAPI's) or Litestar's ``Request``/``WebSocket``, else the scope."""
    owner = _framework_app(owner)
    starlette = sys.modules.get("starlette.applications")
    if starlette is not None and isinstance(owner, starlette.Starlette):
        from starlette.requests import Request
        from starlette.websockets import WebSocket

        return lambda scope, receive, send: (
            WebSocket(scope, receive, send) if scope["type"] == "websocket" else Request(scope)
        )
    litestar = sys.modules.get("litestar.app")
    if litestar is not None and isinstance(owner, litestar.Litestar):
        return _litestar_connection
    return lambda scope, receive, send: scope


def _litestar_connection(scope: Scope, receive: Receive, send: Send) -> Any:
    from litestar import Request, WebSocket

    if scope["type"] == "websocket":
        return WebSocket(scope, receive, send)  # type: ignore[arg-type]
    return Request(scope)  # type: ignore[arg-type]


class StickySessions:
    """Pins each session to the Fly machine that first served it: any ASGI app."""

    def __init__(
        self, app: ASGIApp, config: StickyConfig | None = None, *, serving: Serving | None = None
    ) -> None:
        self.app = app
        self.config = config if config is not None else StickyConfig()
        #: Shared when one app wraps many routes in flysticky (the Litestar plugin).
        self._serving = serving if serving is not None else Serving(self.config)
        self._asks = self.config.skipper is not None or self.config.key is not None
        self._connection: Callable[[Scope, Receive, Send], Any] | None = None

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key`` now; None off Fly or while the app's machines
        are not known (then a request with that key is served where it lands)."""
        return self._serving.owner(key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            serving = self._serving
            decider = serving.decider if serving.started else self._unstarted()
            if decider is not None:
                raw = scope["headers"]
                found: bytes | None = None
                more: list[bytes] | None = None  # a second Cookie line and on: joined once
                for name, value in raw:
                    if name == b"cookie":
                        if found is None:
                            found = value
                        elif more is None:
                            more = [found, value]
                        else:
                            more.append(value)
                if more is not None:
                    found = b"; ".join(more)
                ending = decider.pinned_cookie_ending
                if (
                    ending is not None
                    and found is not None
                    and (found.endswith(ending) or found == decider.pinned_cookie)
                ):
                    decision = decider.pinned  # what decide() says, for less
                    if decider.tally is not None:
                        decider.tally.count_pinned_raw(raw)
                else:
                    decision = self._decide(decider, scope, receive, send, found)
                try:
                    scope["state"][_STATE_KEY] = decision
                except (KeyError, TypeError):  # no state from this server (or None)
                    scope["state"] = {_STATE_KEY: decision}
                if decision is not decider.pinned:
                    return await self._act(scope, receive, send, decision, decider)
            return await self.app(scope, receive, send)
        if kind == "lifespan":
            return await self._lifespan(scope, receive, send)
        return await self.app(scope, receive, send)

    def _decide(
        self, decider: Decider, scope: Scope, receive: Receive, send: Send, cookie: bytes | None
    ) -> Decision:
        request = self._request(scope, receive, send) if self._asks else None
        return decider.decide(
            request,
            cookie.decode("latin-1") if cookie is not None else None,
            _ScopeHeaders(scope["headers"]),
            scope["type"] == "websocket",
        )

    def _unstarted(self) -> Decider | None:
        decider = self._serving.current()
        global _warned_no_lifespan
        if decider is not None and not _warned_no_lifespan:
            _warned_no_lifespan = True
            config = self.config
            needs_network = (
                config.key is not None
                or config.session_header is not None
                or config.forward_large_bodies
            )
            log.log(
                logging.WARNING if needs_network else logging.DEBUG,
                "flysticky got a request before any ASGI lifespan startup: FLY_MACHINE_ID "
                "is read per request and the private network is off (keys are served "
                "where they land, bodies over 1 MiB here). Serve the app with lifespan on; "
                "on Litestar use the plugin, flysticky.litestar.StickySessions.",
            )
        return decider

    def _request(self, scope: Scope, receive: Receive, send: Send) -> Any:
        connection = self._connection
        if connection is None:
            connection = self._connection = _connection_for(scope.get("app", self.app))
        return connection(scope, receive, send)

    async def _act(
        self, scope: Scope, receive: Receive, send: Send, decision: Decision, decider: Decider
    ) -> None:
        """Everything but the pinned path: replay, forward, stamp, or just serve."""
        replay = decision.replay
        if replay is not None:
            if scope["type"] == "websocket":
                return await websocket_replay(scope, receive, send, replay)
            await _drain(receive)
            return await _send_replay(send, replay)
        network = self._serving.network
        if (
            network is not None
            and network.takes(decision)
            and await _forwarded(scope, receive, send, decision, network)
        ):
            return None
        if decision.set_cookie is None:
            return await self.app(scope, receive, send)

        async def send_stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                apply_stamp(decision, _RawHeaders(headers))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_stamped)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = self._serving

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await serving.start()
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await serving.stop()
            await send(message)

        await self.app(scope, watched_receive, watched_send)


async def _send_replay(send: Send, replay: str, kind: str = "http.response") -> None:
    """The 307 with fly-replay and an empty body: an HTTP response, or (``kind``
    "websocket.http.response") the websocket denial response."""
    await send(
        {
            "type": f"{kind}.start",
            "status": REPLAY_STATUS,
            "headers": [
                (REPLAY_HEADER.encode(), replay.encode("latin-1")),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": f"{kind}.body", "body": b""})


async def _drain(receive: Receive) -> None:
    """Read a request body nobody will use (at most REPLAY_BODY_LIMIT: a larger one is
    never replayed) before answering: a server that answers while the client still
    sends closes with unread bytes, and the client may get a reset, not the answer."""
    with contextlib.suppress(ClientGone):
        async for _ in _body(receive):
            pass


class ClientGone(ConnectionResetError):
    """The client left before its body ended: a forward must fail, not end the body short
    (the other machine would take a truncated upload for a whole one)."""


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone("the client disconnected before the end of its body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _forwarded(
    scope: Scope, receive: Receive, send: Send, decision: Decision, network: PrivateNetwork
) -> bool:
    """Send the request to its machine over the private network, its body streamed as it
    arrives, and stream the answer back; False when it cannot be (the body is untouched,
    the request is served here)."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string", b"")
    target = (path + b"?" + query if query else path).decode("latin-1")
    try:
        # The forwarder (aiohttp) writes header values as UTF-8: a value that is not UTF-8
        # cannot go byte for byte, so such a request is served here.
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
    except UnicodeDecodeError:
        log.info("off_pin: a request header is not UTF-8; served here, not forwarded")
        return False
    forwarded = await network.forward(decision, scope["method"], target, headers, _body(receive))
    if forwarded is None:
        return False
    scope["state"][_STATE_KEY] = forwarded.decision
    await send(
        {
            "type": "http.response.start",
            "status": forwarded.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in forwarded.headers],
        }
    )
    async for chunk in forwarded.body:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    return True
