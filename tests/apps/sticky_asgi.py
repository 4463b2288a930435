"""tests/apps/sticky.py's app on Starlette, FastAPI or Litestar: the same routes, each
framework installing flysticky its own way.

Starlette: ``Middleware(StickySessions, ...)`` first in the app's middleware list (the
owner of a room read from the decision). FastAPI: the app wrapped, ``StickySessions(api,
CONFIG)``, which keeps ``owner()`` at hand. Litestar: the plugin.
"""

# No `from __future__ import annotations`: FastAPI and Litestar read the handlers'
# annotations at runtime, and the frameworks are imported inside each builder.
import os
from collections.abc import Callable
from typing import Any

from flysticky import Decision, new_session_id
from flysticky.asgi import StickySessions, current_decision

from ..harness_asgi import litestar_body_limit
from .sticky import CONFIG, MACHINE, whoami

MAX_BODY = 16 * 1024 * 1024
FRAMEWORK = os.environ["STICKY_FRAMEWORK"]


def _owner_from(decision: Decision | None) -> str | None:
    return decision.pinned_to if decision is not None else None


def starlette_app(owner: Callable[[Any], str | None] | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    def facts(request: Request) -> dict[str, Any]:
        return whoami(current_decision(request), request.headers.get)

    async def whoami_route(request: Request) -> JSONResponse:
        return JSONResponse(facts(request))

    async def upload(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({**facts(request), "bytes": len(body)})

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(MACHINE)
        while True:
            await websocket.send_text(f"{MACHINE}:{await websocket.receive_text()}")

    async def room(request: Request) -> JSONResponse:
        body = await request.body()
        found = (owner or (lambda r: _owner_from(current_decision(r))))(request)
        return JSONResponse({**facts(request), "owner": found, "bytes": len(body)})

    async def room_ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(MACHINE)
        await websocket.receive_text()

    async def mcp(request: Request) -> JSONResponse:
        session = request.headers.get("mcp-session-id") or new_session_id()
        return JSONResponse(facts(request), headers={"mcp-session-id": session})

    routes = [
        Route("/whoami", whoami_route),
        Route("/upload", upload, methods=["POST"]),
        WebSocketRoute("/ws", echo),
        Route("/rooms/{room}", room, methods=["GET", "POST"]),
        WebSocketRoute("/rooms/{room}/ws", room_ws),
        Route("/mcp", mcp, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(StickySessions, config=CONFIG)])


def fastapi_app() -> Any:
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import JSONResponse

    api = FastAPI()
    sticky = StickySessions(api, CONFIG)

    def facts(request: Request) -> dict[str, Any]:
        return whoami(current_decision(request), request.headers.get)

    @api.get("/whoami")
    async def whoami_route(request: Request) -> dict[str, Any]:
        return facts(request)

    @api.post("/upload")
    async def upload(request: Request) -> dict[str, Any]:
        return {**facts(request), "bytes": len(await request.body())}

    @api.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(MACHINE)
        while True:
            await websocket.send_text(f"{MACHINE}:{await websocket.receive_text()}")

    @api.api_route("/rooms/{room}", methods=["GET", "POST"])
    async def room(request: Request, room: str) -> dict[str, Any]:
        body = await request.body()
        return {**facts(request), "owner": sticky.owner(room), "bytes": len(body)}

    @api.websocket("/rooms/{room}/ws")
    async def room_ws(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(MACHINE)
        await websocket.receive_text()

    @api.post("/mcp")
    async def mcp(request: Request) -> JSONResponse:
        session = request.headers.get("mcp-session-id") or new_session_id()
        return JSONResponse(facts(request), headers={"mcp-session-id": session})

    return sticky


def litestar_app() -> Any:
    from litestar import Litestar, Request, Response, WebSocket, get, post, route, websocket

    from flysticky.litestar import StickySessions as StickyPlugin

    sticky = StickyPlugin(CONFIG)

    def facts(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return whoami(current_decision(request), request.headers.get)

    @get("/whoami")
    async def whoami_route(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return facts(request)

    @post("/upload", status_code=200)
    async def upload(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {**facts(request), "bytes": len(await request.body())}

    @websocket("/ws")
    async def echo(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        await socket.send_text(MACHINE)
        while True:
            await socket.send_text(f"{MACHINE}:{await socket.receive_text()}")

    @route("/rooms/{room:str}", http_method=["GET", "POST"], status_code=200)
    async def room(request: Request[Any, Any, Any]) -> dict[str, Any]:
        body = await request.body()
        owner = sticky.owner(request.path_params["room"])
        return {**facts(request), "owner": owner, "bytes": len(body)}

    @websocket("/rooms/{room:str}/ws")
    async def room_ws(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        await socket.send_text(MACHINE)
        await socket.receive_text()

    @post("/mcp", status_code=200)
    async def mcp(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        session = request.headers.get("mcp-session-id") or new_session_id()
        return Response(facts(request), headers={"mcp-session-id": session})

    return Litestar(
        route_handlers=[whoami_route, upload, echo, room, room_ws, mcp],
        plugins=[sticky],
        **litestar_body_limit(MAX_BODY),
    )


app = {"starlette": starlette_app, "fastapi": fastapi_app, "litestar": litestar_app}[FRAMEWORK]()
