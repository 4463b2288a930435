"""The FastAPI app, served by Uvicorn: its sessions stick to one Fly machine."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.requests import HTTPConnection
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.websockets import WebSocketState
from flysticky import StickyConfig
from flysticky.asgi import StickySessions, current_decision

import page

visits = page.Visits()
rooms = page.Rooms()
open_sockets = page.OpenSockets()


def path(connection: HTTPConnection) -> str:
    """The path as the ASGI server decoded it, which Starlette routes by. Not
    request.url.path: rebuilt from the raw path, it keeps or decodes escapes as the
    Starlette version sees fit, and a room must be read the same way everywhere."""
    decoded: str = connection.scope["path"]
    return decoded


def room_key(connection: HTTPConnection) -> str | None:
    """flysticky's ``key``: the room of a request's path, or None (the visitor's cookie
    decides); page.room_key, for Starlette's requests and websockets."""
    return page.room_of(path(connection))


@contextlib.asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    # flysticky has started by now: it watches the lifespan startup message on its way in.
    rooms.start_rebalancing(app.owner)
    try:
        yield
    finally:
        await rooms.stop_rebalancing()


api = FastAPI(lifespan=lifespan)


def visit(request: Request) -> tuple[dict[str, object], str | None]:
    """Count this visit; returns what to show, and a session id to set if it is new."""
    session, count, fresh = visits.hit(request.cookies.get(page.SESSION_COOKIE))
    info = page.describe(current_decision(request), request.headers.get, count)
    return info, session if fresh else None


def with_session(request: Request, response: Response, session: str | None) -> Response:
    if session is not None:
        options = page.session_cookie_options(request.headers.get)
        response.set_cookie(page.SESSION_COOKIE, session, **options)
    return response


@api.get("/health", response_class=PlainTextResponse)
async def health() -> str:
    return "ok"


@api.get("/", response_class=HTMLResponse)
async def index(request: Request) -> Response:
    info, session = visit(request)
    return with_session(request, HTMLResponse(page.render(info)), session)


@api.get("/api/visit")
async def api_visit(request: Request) -> Response:
    info, session = visit(request)
    return with_session(request, JSONResponse(info), session)


@api.post("/api/upload")
async def upload(request: Request) -> Response:
    # Counted as it arrives: Uvicorn sets no limit on a body, so the app does.
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > page.REQUEST_MAX_BYTES:
            limit = f"A request body is at most {page.REQUEST_MAX_BYTES} bytes."
            return JSONResponse({"error": limit}, status_code=413)
    return JSONResponse({"machine": page.machine_id(), "bytes": size})


# --- Websockets: page.py's handlers over Starlette's WebSocket ------------------------------


async def receive(websocket: WebSocket) -> str | bytes | None:
    """The next message, text or binary; None once the client has gone."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


async def close(websocket: WebSocket, code: int, reason: str) -> None:
    # Starlette refuses a second close; a handler stopped while closing would send one.
    if websocket.application_state == WebSocketState.CONNECTED:
        await websocket.close(code, reason)


async def serve_socket(
    websocket: WebSocket, handler: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Accept the websocket and run its handler among the open sockets. A send to a
    client that has gone raises WebSocketDisconnect: the connection is over, not an error."""
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        await open_sockets.run(handler, partial(close, websocket))


@api.websocket("/ws")
async def feed(websocket: WebSocket) -> None:
    async def echo() -> None:
        await websocket.send_text(page.hello())
        while (message := await receive(websocket)) is not None:
            await websocket.send_text(page.pong(message))

    await serve_socket(websocket, echo)


@api.get("/rooms/{room}")
async def room_info(request: Request, room: str) -> Response:
    # The room as the key function read it from the path: the one flysticky routed by.
    name = page.room_of(path(request))
    status, body = page.room_info(rooms, name, app.owner, current_decision(request))
    return JSONResponse(body, status_code=status)


@api.websocket("/rooms/{room}/ws")
async def room_socket(websocket: WebSocket, room: str) -> None:
    await serve_socket(
        websocket,
        partial(
            page.room_socket,
            rooms,
            page.room_of(path(websocket)),
            app.owner,
            current_decision(websocket),
            websocket.send_text,
            partial(receive, websocket),
            partial(close, websocket),
        ),
    )


# What Uvicorn serves: flysticky in front of every request and websocket, as pure ASGI
# middleware around the FastAPI app, and its owner() at hand for the rooms.
app = StickySessions(
    api,
    StickyConfig(
        cookie_name={{ cookiecutter.cookie_name | tojson }},
        skipper=lambda request: path(request) == "/health",
        # Requests under /rooms/<room>/ go to the machine that owns the room.
        key=room_key,
        # Every deployed machine owns rooms, suspended ones too (fly.toml suspends idle
        # machines): a suspended owner keeps its rooms in memory, and a replay resumes it.
        owners="all",
        # Replays, re-pins and replay-cache hits as Prometheus metrics on a port of their
        # own, where fly.toml's [metrics] has Fly scrape them (grafana/flysticky.json).
        metrics_port=page.METRICS_PORT,
    ),
)


class Server(uvicorn.Server):
    """Uvicorn, stopping the websocket handlers first (page.OpenSockets: 1001, and pages
    reconnect to a live machine); its own shutdown would close the sockets with 1012, which
    the page takes for a room that moved. uvicorn.Server.shutdown is public, and the same
    from Uvicorn 0.30 to 0.54 at least."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await open_sockets.close_all()
        await super().shutdown(sockets)


if __name__ == "__main__":
    # One process, no --workers: the visit counts and the rooms live in this process's
    # memory, and flysticky pins a session to a machine, not to one of its processes.
    config = uvicorn.Config(
        app,
        # flysticky reads FLY_MACHINE_ID and starts its private network at lifespan startup.
        lifespan="on",
        ws_max_size=page.WEBSOCKET_MAX_BYTES,
        timeout_graceful_shutdown=page.STOP_GRACE_SECONDS,
        access_log=False,
    )
    listening = page.listening_socket()
    host, port = listening.getsockname()[:2]
    logging.getLogger("uvicorn.error").info("Uvicorn listening on %s port %d", host, port)
    # On SIGINT (fly.toml's kill_signal) Uvicorn stops gracefully, then raises the signal
    # again: KeyboardInterrupt, the end of a clean stop.
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run(sockets=[listening])
