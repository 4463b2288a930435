"""One app, built on either framework, driven through the framework's own test client.

The conformance suite runs every rule against both adapters through this harness, so
a rule that holds for one framework and not the other fails a test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from flysticky import StickyConfig

# Imported at collection, before any sanic-testing client replaces Sanic.__call__.
from .asgi_client import LifespanClient, raw_http, sanic_asgi, served

#: A dict, or (name, value) pairs when a header repeats.
Headers = dict[str, str] | list[tuple[str, str]]
MACHINE = "90801679a10038"
OTHER = "148ed193b04d89"


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    ran: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def decision(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Harness(Protocol):
    framework: str
    ran: list[str]

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Reply: ...


def _pairs(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _decision_json(decision: Any) -> dict[str, Any]:
    if decision is None:
        return {"outcome": None}
    shown = {
        "outcome": decision.outcome.value,
        "machine_id": decision.machine_id,
        "pinned_to": decision.pinned_to,
        "arrived_by": decision.arrived_by,
    }
    if decision.routed_by is not None:  # a request routed by key or session id
        shown.update(key=decision.key, routed_by=decision.routed_by)
    return shown


def _sanic_app(ran: list[str], hook_in_handler: bool) -> Any:
    """The conformance app on Sanic. The app's own code before each handler ("hook") is
    an app-wide request middleware, or, with ``hook_in_handler``, a decorator on each
    handler (no request middleware at all: flysticky's fast path)."""
    from sanic import Sanic, text
    from sanic import json as sjson

    from flysticky.sanic import current_decision

    app: Sanic[Any, Any] = Sanic(f"conf_{uuid.uuid4().hex[:8]}")
    app.config.REQUEST_MAX_SIZE = 8 * 1024 * 1024

    def hooked(handler: Any) -> Any:
        if not hook_in_handler:
            return handler

        async def with_hook(request: Any) -> Any:
            ran.append("hook")
            return await handler(request)

        with_hook.__name__ = handler.__name__
        return with_hook

    if not hook_in_handler:

        @app.on_request
        async def app_hook(request: Any) -> None:
            ran.append("hook")

    @app.route("/", methods=["GET", "POST"])
    @hooked
    async def index(request: Any) -> Any:
        ran.append("handler")
        return sjson(_decision_json(current_decision(request)))

    @app.get("/health")
    @hooked
    async def health(request: Any) -> Any:
        ran.append("handler")
        return sjson(_decision_json(current_decision(request)))

    @app.get("/cached")
    @hooked
    async def cached(request: Any) -> Any:
        ran.append("handler")
        return text("x", headers={"cache-control": "public, max-age=60"})

    @app.route("/rooms/<room>", methods=["GET", "POST"])
    async def room(request: Any, room: str) -> Any:  # a route with a parameter
        if hook_in_handler:  # else the app-wide hook ran
            ran.append("hook")
        ran.append("handler")
        return sjson({**_decision_json(current_decision(request)), "bytes": len(request.body)})

    return app


class SanicHarness:
    framework = "sanic"

    def __init__(self, config: StickyConfig | None) -> None:
        from sanic_testing.testing import SanicASGITestClient

        from flysticky.sanic import StickySessions

        self.ran: list[str] = []
        app = _sanic_app(self.ran, hook_in_handler=False)
        StickySessions(app, config)
        self.client = SanicASGITestClient(app)

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Reply:
        self.ran.clear()
        # Latin-1 bytes, so that a header can carry any octet, as on the wire.
        raw = [(k, v.encode("latin-1")) for k, v in _pairs(headers)]
        self.client.cookies.clear()  # each request says its own cookies
        _, response = await self.client.request(
            method, path, headers=raw, content=body, gather_request=False
        )
        return Reply(
            response.status_code,
            list(response.headers.multi_items()),
            response.content,
            list(self.ran),
        )


class SanicFastHarness:
    """The Sanic app with no app request middleware, driven through Sanic's own ASGI
    entry (sanic-testing's client adds a request middleware of its own to every route,
    which takes them all off flysticky's fast path). The app code that runs before each
    handler is a decorator, as many Sanic apps check auth: it runs after flysticky.

    A Sanic app starts once, so every request gets a fresh app, started and stopped
    around it. Every request to a route checks that flysticky's middleware never ran:
    the wrapped handler decided, so every rule of the suite holds on the fast path."""

    framework = "sanic"
    routes: ClassVar[dict[str, tuple[str, ...]]] = {
        "/": ("GET", "POST"),
        "/health": ("GET",),
        "/cached": ("GET",),
        "/rooms/": ("GET", "POST"),
    }

    def __init__(self, config: StickyConfig | None) -> None:
        self.config = config
        self.ran: list[str] = []
        self.middleware_calls = 0

    def _app(self) -> Any:
        from sanic import Sanic

        from flysticky.sanic import StickySessions

        # Sanic rewrites its own request path at each start (TouchUp); in test mode it
        # starts from the original every time, so that many apps can start in one process.
        Sanic.test_mode = True
        harness = self

        class CountingSticky(StickySessions):
            async def _request_middleware(self, request: Any) -> Any:
                harness.middleware_calls += 1
                return await super()._request_middleware(request)

        app = _sanic_app(self.ran, hook_in_handler=True)
        CountingSticky(app, self.config)
        return app

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Reply:
        self.ran.clear()
        before = self.middleware_calls
        raw = [(k, v.encode("latin-1")) for k, v in _pairs(headers)]
        async with LifespanClient(sanic_asgi(self._app())) as client:
            response = await client.request(method, path, headers=raw, content=body)
        route = "/rooms/" if path.startswith("/rooms/") and path.count("/") == 2 else path
        if method in self.routes.get(route, ()):  # a request that matches no route goes
            # through Sanic's error path, where flysticky's middleware is the only way in
            assert self.middleware_calls == before, "flysticky's middleware ran: no fast path"
        return Reply(
            response.status_code,
            list(response.headers.multi_items()),
            response.content,
            list(self.ran),
        )


class QuartHarness:
    framework = "quart"

    def __init__(self, config: StickyConfig | None) -> None:
        from quart import Blueprint, Quart, jsonify, request

        from flysticky.quart import StickySessions, current_decision

        self.ran: list[str] = []
        app = Quart(f"conf_{uuid.uuid4().hex[:8]}")
        app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024

        @app.before_request
        async def app_hook() -> None:
            self.ran.append("hook")

        @app.route("/", methods=["GET", "POST"])
        async def index() -> Any:
            self.ran.append("handler")
            return jsonify(_decision_json(current_decision()))

        @app.get("/health")
        async def health() -> Any:
            self.ran.append("handler")
            return jsonify(_decision_json(current_decision()))

        @app.get("/cached")
        async def cached() -> Any:
            self.ran.append("handler")
            return "x", 200, {"cache-control": "public, max-age=60"}

        @app.route("/rooms/<room>", methods=["GET", "POST"])
        async def room(room: str) -> Any:
            self.ran.append("handler")
            body = await request.get_data()
            return jsonify({**_decision_json(current_decision()), "bytes": len(body)})

        blueprint = Blueprint("bp", __name__)

        @blueprint.before_request
        async def blueprint_hook() -> None:
            self.ran.append("hook")

        @blueprint.get("/bp")
        async def in_blueprint() -> Any:
            self.ran.append("handler")
            return jsonify(_decision_json(current_decision()))

        app.register_blueprint(blueprint)
        StickySessions(app, config)
        self.app = app

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Reply:
        from werkzeug.datastructures import Headers as WerkzeugHeaders

        self.ran.clear()
        sent = WerkzeugHeaders(_pairs(headers))
        if body is not None and "content-length" not in sent:
            # Quart's test client sends no Content-Length; every real HTTP/1.1 client does.
            sent["content-length"] = str(len(body))
        # Started and stopped around each request, as a server would (before_serving
        # starts flysticky's discovery); each request says its own cookies.
        async with self.app.test_app() as started:
            client = started.test_client()
            client.cookie_jar = None
            response = await client.open(path, method=method, headers=sent, data=body)
            data = await response.get_data()
        return Reply(
            response.status_code,
            list(response.headers.items()),
            data,
            list(self.ran),
        )


def request_path(request: Any) -> str:
    """The path a skipper or key function reads: ``request.path`` on Sanic and Quart,
    ``request.url.path`` on Starlette, FastAPI and Litestar."""
    path = getattr(request, "path", None)
    return path if isinstance(path, str) else str(request.url.path)


class AsgiHarness:
    """flysticky.asgi on one ASGI framework: driven in-process (httpx, lifespan run) or
    on a real server started in this process for each request, so that each request's
    app reads FLY_MACHINE_ID as a starting server does."""

    def __init__(self, framework: str, server: str | None, config: StickyConfig | None) -> None:
        self.framework = framework
        self.server = server
        self.config = config
        self.ran: list[str] = []

    def _app(self) -> Any:
        from . import harness_asgi

        return harness_asgi.BUILDERS[self.framework](self.ran, self.config)

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | None = None,
    ) -> Reply:
        self.ran.clear()
        raw = [(k, v.encode("latin-1")) for k, v in _pairs(headers)]
        app = self._app()
        if self.server is None:
            async with LifespanClient(app) as client:
                response = await client.request(method, path, headers=raw, content=body)
        else:
            async with served(app, self.server) as url:
                status, pairs, content = await raw_http(url, method, path, raw, body)
            return Reply(status, pairs, content, list(self.ran))
        return Reply(
            response.status_code,
            list(response.headers.multi_items()),
            response.content,
            list(self.ran),
        )


def _asgi(framework: str, server: str | None = None) -> Any:
    return lambda config: AsgiHarness(framework, server, config)


HARNESSES = {
    "sanic": SanicHarness,
    "sanic-fast": SanicFastHarness,
    "quart": QuartHarness,
    "starlette": _asgi("starlette"),
    "fastapi-uvicorn": _asgi("fastapi", "uvicorn"),
    "litestar-hypercorn": _asgi("litestar", "hypercorn"),
}


def all_header_text(reply: Reply) -> Iterable[str]:
    for name, value in reply.headers:
        yield name
        yield value
