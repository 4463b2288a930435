"""The Sanic app: its sessions stick to one Fly machine."""

from __future__ import annotations

from flysticky import StickyConfig
from flysticky.sanic import StickySessions, current_decision
from sanic import Request, Sanic, Websocket, html, json, text
from sanic.response import HTTPResponse

import page

app = Sanic({{ cookiecutter.project_slug | tojson }})
app.config.REQUEST_MAX_SIZE = page.REQUEST_MAX_BYTES
app.config.WEBSOCKET_MAX_SIZE = page.WEBSOCKET_MAX_BYTES
# On SIGINT (fly.toml's kill_signal) Sanic closes open websockets with 1000, so pages
# reconnect, and gives requests in flight this long: well within fly.toml's kill_timeout.
app.config.GRACEFUL_SHUTDOWN_TIMEOUT = page.STOP_GRACE_SECONDS
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


def visit(request: Request) -> tuple[dict[str, object], str | None]:
    """Count this visit; returns what to show, and a session id to set if it is new."""
    session, count, fresh = visits.hit(request.cookies.get(page.SESSION_COOKIE))
    info = page.describe(current_decision(request), request.headers.get, count)
    return info, session if fresh else None


def with_session(request: Request, response: HTTPResponse, session: str | None) -> HTTPResponse:
    if session is not None:
        options = page.session_cookie_options(request.headers.get)
        response.add_cookie(page.SESSION_COOKIE, session, **options)
    return response


@app.get("/health")
async def health(request: Request) -> HTTPResponse:
    return text("ok")


@app.get("/")
async def index(request: Request) -> HTTPResponse:
    info, session = visit(request)
    return with_session(request, html(page.render(info)), session)


@app.get("/api/visit")
async def api_visit(request: Request) -> HTTPResponse:
    info, session = visit(request)
    return with_session(request, json(info), session)


@app.post("/api/upload")
async def upload(request: Request) -> HTTPResponse:
    return json({"machine": page.machine_id(), "bytes": len(request.body)})


@app.websocket("/ws")
async def feed(request: Request, ws: Websocket) -> None:
    await ws.send(page.hello())
    while True:  # ws.recv(), not async for: under ASGI Sanic's websocket is not iterable
        message = await ws.recv()
        if message is None:
            return
        await ws.send(page.pong(message))


@app.get("/rooms/<room>")
async def room_info(request: Request, room: str) -> HTTPResponse:
    # The room as the key function read it from the path: the one flysticky routed by.
    name = page.room_of(request.path)
    status, body = page.room_info(rooms, name, sticky.owner, current_decision(request))
    return json(body, status=status)


@app.websocket("/rooms/<room>/ws")
async def room_socket(request: Request, ws: Websocket, room: str) -> None:
    await page.room_socket(
        rooms,
        page.room_of(request.path),
        sticky.owner,
        current_decision(request),
        ws.send,
        ws.recv,
        ws.close,
    )


@app.after_server_start
async def watch_rooms(app: Sanic) -> None:
    rooms.start_rebalancing(sticky.owner)


@app.before_server_stop
async def stop_watching_rooms(app: Sanic) -> None:
    await rooms.stop_rebalancing()


if __name__ == "__main__":
    # One process: the visit counts and the rooms live in this machine's memory.
    app.run(
        sock=page.listening_socket(),
        single_process=True,
        access_log=False,
        motd=False,
    )
