"""The Sanic app: its sessions stick to one Fly machine."""

from __future__ import annotations

import os

from flysticky import StickyConfig
from flysticky.sanic import StickySessions, current_decision
from sanic import Request, Sanic, Websocket, html, json, text
from sanic.response import HTTPResponse

import page

app = Sanic({{ cookiecutter.project_slug | tojson }})
app.config.REQUEST_MAX_SIZE = 16 * 1024 * 1024
# On SIGINT (fly.toml's kill_signal) Sanic closes open websockets with 1000, so pages
# reconnect, and gives requests in flight this long: well within fly.toml's kill_timeout.
app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 5
StickySessions(
    app,
    StickyConfig(
        cookie_name={{ cookiecutter.cookie_name | tojson }},
        skipper=lambda request: request.path == "/health",
    ),
)
visits = page.Visits()


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


if __name__ == "__main__":
    # One process: the visit counts live in this machine's memory.
    app.run(
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8080")),
        single_process=True,
        access_log=False,
        motd=False,
    )
