"""The conformance app on Starlette, FastAPI and Litestar (tests/harness.py drives them).

No ``from __future__ import annotations`` here: FastAPI and Litestar read the handlers'
annotations at runtime, and the frameworks are imported inside each builder.
"""

from typing import Any

from flysticky import StickyConfig

from .harness import _decision_json


class Hook:
    """The app's own ASGI middleware, placed after flysticky: it must never run for a
    request flysticky answers."""

    def __init__(self, app: Any, ran: list[str]) -> None:
        self.app = app
        self.ran = ran

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            self.ran.append("hook")
        await self.app(scope, receive, send)


def _starlette_app(ran: list[str], config: StickyConfig | None) -> Any:
    """Starlette, flysticky first in the app's middleware list, the app's own after it."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from flysticky.asgi import StickySessions, current_decision

    async def index(request: Request) -> JSONResponse:
        ran.append("handler")
        await request.body()  # read, as a real handler would, before a real server answers
        return JSONResponse(_decision_json(current_decision(request)))

    async def cached(request: Request) -> PlainTextResponse:
        ran.append("handler")
        return PlainTextResponse("x", headers={"cache-control": "public, max-age=60"})

    async def room(request: Request) -> JSONResponse:
        ran.append("handler")
        body = await request.body()
        return JSONResponse({**_decision_json(current_decision(request)), "bytes": len(body)})

    routes = [
        Route("/", index, methods=["GET", "POST"]),
        Route("/health", index),
        Route("/cached", cached),
        Route("/rooms/{room}", room, methods=["GET", "POST"]),
    ]
    middleware = [Middleware(StickySessions, config=config), Middleware(Hook, ran=ran)]
    return Starlette(routes=routes, middleware=middleware)


def _fastapi_app(ran: list[str], config: StickyConfig | None) -> Any:
    """FastAPI: the app's own middleware (``@app.middleware``) added first, flysticky
    added last (``add_middleware`` puts the last added outermost)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    from flysticky.asgi import StickySessions, current_decision

    app = FastAPI()

    @app.middleware("http")
    async def hook(request: Request, call_next: Any) -> Any:
        ran.append("hook")
        return await call_next(request)

    @app.api_route("/", methods=["GET", "POST"])
    @app.get("/health")
    async def index(request: Request) -> dict[str, Any]:
        ran.append("handler")
        await request.body()
        return _decision_json(current_decision(request))

    @app.get("/cached")
    async def cached() -> PlainTextResponse:
        ran.append("handler")
        return PlainTextResponse("x", headers={"cache-control": "public, max-age=60"})

    @app.api_route("/rooms/{room}", methods=["GET", "POST"])
    async def room(request: Request, room: str) -> dict[str, Any]:
        ran.append("handler")
        body = await request.body()
        return {**_decision_json(current_decision(request)), "bytes": len(body)}

    app.add_middleware(StickySessions, config=config)
    return app


def _litestar_app(ran: list[str], config: StickyConfig | None) -> Any:
    """Litestar with flysticky's plugin, and the app's own ``before_request`` hook."""
    from litestar import Litestar, Request, Response, get, route

    from flysticky.asgi import current_decision
    from flysticky.litestar import StickySessions

    def hook(request: Request[Any, Any, Any]) -> None:
        ran.append("hook")

    # Every method the suite sends to "/": Litestar answers a method a route does not
    # have (405) before any middleware runs.
    @route(["/", "/health"], http_method=["GET", "POST", "PUT", "DELETE"], status_code=200)
    async def index(request: Request[Any, Any, Any]) -> dict[str, Any]:
        ran.append("handler")
        await request.body()
        return _decision_json(current_decision(request))

    @get("/cached")
    async def cached() -> Response[str]:
        ran.append("handler")
        return Response("x", headers={"cache-control": "public, max-age=60"})

    @route("/rooms/{room:str}", http_method=["GET", "POST"], status_code=200)
    async def room(request: Request[Any, Any, Any]) -> dict[str, Any]:
        ran.append("handler")
        body = await request.body()
        return {**_decision_json(current_decision(request)), "bytes": len(body)}

    return Litestar(
        route_handlers=[index, cached, room],
        plugins=[StickySessions(config)],
        before_request=hook,
        logging_config=None,  # Litestar's default replaces the root logger's handlers
        **litestar_body_limit(8 * 1024 * 1024),
    )


def litestar_body_limit(size: int) -> dict[str, int]:
    """Litestar's body limit, where it has one (2.14 added it, 10 MB by default; 2.12 and
    2.13 take any size)."""
    import inspect

    from litestar import Litestar

    known = inspect.signature(Litestar).parameters
    return {"request_max_body_size": size} if "request_max_body_size" in known else {}


BUILDERS = {"starlette": _starlette_app, "fastapi": _fastapi_app, "litestar": _litestar_app}
