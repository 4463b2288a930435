"""The Quart app: its sessions stick to one Fly machine."""

from __future__ import annotations

import asyncio
import signal

from flysticky import StickyConfig
from flysticky.quart import StickySessions, current_decision
from quart import Quart, Response, jsonify, request, websocket

import page

app = Quart(__name__)
app.config["MAX_CONTENT_LENGTH"] = page.REQUEST_MAX_BYTES
sticky = StickySessions(
    app,
    StickyConfig(
        cookie_name={{ cookiecutter.cookie_name | tojson }},
        skipper=lambda request: request.path == "/health",
        # Requests under /rooms/<room>/ go to the machine that owns the room.
        key=page.room_key,
        # Every deployed machine owns rooms, suspended ones too (fly.toml suspends idle
        # machines): a suspended owner keeps its rooms in memory, and a replay resumes it.
        owners="all",
        # Replays, re-pins and replay-cache hits as Prometheus metrics on a port of their
        # own, where fly.toml's [metrics] has Fly scrape them (grafana/flysticky.json).
        metrics_port=page.METRICS_PORT,
    ),
)
visits = page.Visits()
rooms = page.Rooms()
open_sockets = page.OpenSockets()


def visit() -> tuple[dict[str, object], str | None]:
    """Count this visit; returns what to show, and a session id to set if it is new."""
    session, count, fresh = visits.hit(request.cookies.get(page.SESSION_COOKIE))
    info = page.describe(current_decision(), request.headers.get, count)
    return info, session if fresh else None


def with_session(response: Response, session: str | None) -> Response:
    if session is not None:
        options = page.session_cookie_options(request.headers.get)
        response.set_cookie(page.SESSION_COOKIE, session, **options)
    return response


@app.get("/health")
async def health() -> str:
    return "ok"


@app.get("/")
async def index() -> Response:
    info, session = visit()
    response = Response(page.render(info), content_type="text/html; charset=utf-8")
    return with_session(response, session)


@app.get("/api/visit")
async def api_visit() -> Response:
    info, session = visit()
    return with_session(jsonify(info), session)


@app.post("/api/upload")
async def upload() -> Response:
    body = await request.get_data()
    return jsonify({"machine": page.machine_id(), "bytes": len(body)})


@app.websocket("/ws")
async def feed() -> None:
    async def echo() -> None:
        await websocket.send(page.hello())
        while True:
            await websocket.send(page.pong(await websocket.receive()))

    await open_sockets.run(echo, websocket.close)


@app.get("/rooms/<room>")
async def room_info(room: str) -> tuple[Response, int]:
    # The room as the key function read it from the path: the one flysticky routed by.
    name = page.room_of(request.path)
    status, body = page.room_info(rooms, name, sticky.owner, current_decision())
    return jsonify(body), status


@app.websocket("/rooms/<room>/ws")
async def room_socket(room: str) -> None:
    await open_sockets.run(
        lambda: page.room_socket(
            rooms,
            page.room_of(websocket.path),
            sticky.owner,
            current_decision(),
            websocket.send,
            websocket.receive,
            websocket.close,
        ),
        websocket.close,
    )


@app.before_serving
async def watch_rooms() -> None:
    rooms.start_rebalancing(sticky.owner)


@app.after_serving
async def stop_watching_rooms() -> None:
    await rooms.stop_rebalancing()


async def until_stopped() -> None:
    """Hypercorn's shutdown trigger: Fly's kill_signal (SIGINT) or SIGTERM, then the
    websockets are closed before Hypercorn stops serving."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()
    await open_sockets.close_all()


if __name__ == "__main__":
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    # Hypercorn, one process: the visit counts and the rooms live in this machine's memory.
    config = Config()
    # Hypercorn takes the socket by its file descriptor; detach() hands it over.
    config.bind = [f"fd://{page.listening_socket().detach()}"]
    config.websocket_max_message_size = page.WEBSOCKET_MAX_BYTES
    config.accesslog = None
    config.graceful_timeout = page.STOP_GRACE_SECONDS
    asyncio.run(serve(app, config, shutdown_trigger=until_stopped))  # type: ignore[arg-type]
