"""{{ cookiecutter.project_name }}: a Quart app whose sessions stick to one Fly machine."""

from __future__ import annotations

import asyncio
import os

from flysticky import StickyConfig
from flysticky.quart import StickySessions, current_decision
from quart import Quart, Response, jsonify, request, websocket

import page

app = Quart(__name__)
app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
StickySessions(
    app,
    StickyConfig(
        cookie_name="{{ cookiecutter.cookie_name }}",
        skipper=lambda request: request.path == "/health",
    ),
)
visits = page.Visits()


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
    await websocket.send(page.hello())
    while True:
        await websocket.send(page.pong(await websocket.receive()))


if __name__ == "__main__":
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    # Hypercorn, one process: the visit counts live in this machine's memory.
    config = Config()
    config.bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8080')}"]
    config.accesslog = None
    asyncio.run(serve(app, config))  # type: ignore[arg-type]
