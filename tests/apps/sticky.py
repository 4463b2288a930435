"""The app the end-to-end tests run on each machine; framework and mode come from the env.

STICKY_FRAMEWORK=sanic|quart|starlette|fastapi|litestar (the last three in
tests/apps/sticky_asgi.py), STICKY_MODE=prefer_instance|instance, STICKY_APP_HOOK=1 adds an
app request hook (Sanic). Rooms (``/rooms/<room>``) are routed by key and
``mcp-session-id`` by session id; discovery refreshes every STICKY_REFRESH seconds;
STICKY_FORWARD=0 serves big bodies where they land instead of forwarding them;
STICKY_METRICS_PORT serves flysticky's metrics on that port.
"""

from __future__ import annotations

import os
from typing import Any

from flysticky import StickyConfig, new_session_id

MACHINE = os.environ["FLY_MACHINE_ID"]


def path_of(request: Any) -> str:
    """Sanic's and Quart's ``request.path``; Starlette's and Litestar's ``request.url.path``."""
    path = getattr(request, "path", None)
    return path if isinstance(path, str) else str(request.url.path)


def room_key(request: Any) -> str | None:
    parts = path_of(request).split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "rooms" else None


CONFIG = StickyConfig(
    replay_mode=os.environ.get("STICKY_MODE", "prefer_instance"),  # type: ignore[arg-type]
    skipper=lambda request: path_of(request) == "/health",
    key=room_key,
    session_header="mcp-session-id",
    refresh_seconds=float(os.environ.get("STICKY_REFRESH", "5")),
    forward_large_bodies=os.environ.get("STICKY_FORWARD", "1") == "1",
    metrics_port=int(os.environ["STICKY_METRICS_PORT"])
    if "STICKY_METRICS_PORT" in os.environ
    else None,
)


def whoami(decision: Any, header: Any) -> dict[str, Any]:
    return {
        "machine": MACHINE,
        "outcome": decision.outcome.value if decision else None,
        "arrived_by": decision.arrived_by if decision else None,
        "pinned_to": decision.pinned_to if decision else None,
        "routed_by": decision.routed_by if decision else None,
        "key": decision.key if decision else None,
        "cache": header("fly-replay-cache-status"),
        "replay_src": header("fly-replay-src"),
        "forwarded_from": header("flysticky-forwarded-from"),
    }


app: Any
if os.environ["STICKY_FRAMEWORK"] in ("starlette", "fastapi", "litestar"):
    from .sticky_asgi import app
elif os.environ["STICKY_FRAMEWORK"] == "sanic":
    from sanic import Request, Sanic, Websocket, json

    from flysticky.sanic import StickySessions, current_decision

    app = Sanic("sticky_e2e")
    app.config.REQUEST_MAX_SIZE = 16 * 1024 * 1024
    sticky = StickySessions(app, CONFIG)

    if os.environ.get("STICKY_APP_HOOK"):
        # An app request hook puts flysticky's decision in a request middleware
        # (placed first) instead of the wrapped handler: both paths get tested.
        @app.on_request
        async def app_hook(request: Request) -> None:
            request.ctx.hook_ran = True

    @app.get("/whoami")
    async def sanic_whoami(request: Request) -> Any:
        return json(whoami(current_decision(request), request.headers.get))

    @app.post("/upload")
    async def sanic_upload(request: Request) -> Any:
        body = whoami(current_decision(request), request.headers.get)
        return json({**body, "bytes": len(request.body)})

    @app.websocket("/ws")
    async def sanic_ws(request: Request, ws: Websocket) -> None:
        await ws.send(MACHINE)
        while True:  # ws.recv(): under ASGI Sanic's websocket is not async-iterable
            await ws.send(f"{MACHINE}:{await ws.recv()}")

    @app.route("/rooms/<room>", methods=["GET", "POST"])
    async def sanic_room(request: Request, room: str) -> Any:
        body = whoami(current_decision(request), request.headers.get)
        return json({**body, "owner": sticky.owner(room), "bytes": len(request.body)})

    @app.websocket("/rooms/<room>/ws")
    async def sanic_room_ws(request: Request, ws: Websocket, room: str) -> None:
        await ws.send(MACHINE)
        await ws.recv()

    @app.post("/mcp")
    async def sanic_mcp(request: Request) -> Any:
        body = whoami(current_decision(request), request.headers.get)
        session = request.headers.get("mcp-session-id") or new_session_id()
        return json(body, headers={"mcp-session-id": session})

else:
    from quart import Quart, jsonify, request, websocket

    from flysticky.quart import StickySessions as QuartSticky
    from flysticky.quart import current_decision as quart_decision

    app = Quart("sticky_e2e")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    quart_sticky = QuartSticky(app, CONFIG)

    @app.get("/whoami")
    async def quart_whoami() -> Any:
        return jsonify(whoami(quart_decision(), request.headers.get))

    @app.post("/upload")
    async def quart_upload() -> Any:
        body = await request.get_data()
        return jsonify({**whoami(quart_decision(), request.headers.get), "bytes": len(body)})

    @app.websocket("/ws")
    async def quart_ws() -> None:
        await websocket.send(MACHINE)
        while True:
            await websocket.send(f"{MACHINE}:{await websocket.receive()}")

    @app.route("/rooms/<room>", methods=["GET", "POST"])
    async def quart_room(room: str) -> Any:
        data = await request.get_data()
        body = whoami(quart_decision(), request.headers.get)
        return jsonify({**body, "owner": quart_sticky.owner(room), "bytes": len(data)})

    @app.websocket("/rooms/<room>/ws")
    async def quart_room_ws(room: str) -> None:
        await websocket.send(MACHINE)
        await websocket.receive()

    @app.post("/mcp")
    async def quart_mcp() -> Any:
        body = whoami(quart_decision(), request.headers.get)
        session = request.headers.get("mcp-session-id") or new_session_id()
        return jsonify(body), 200, {"mcp-session-id": session}
