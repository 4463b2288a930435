"""Hello-world apps for the benchmark, the same app with and without flysticky.

BENCH_FRAMEWORK=sanic|quart|starlette|fastapi, BENCH_STICKY=1 wires StickySessions in,
each framework's own way (Starlette: ``Middleware(StickySessions)`` in the app's middleware
list; FastAPI: ``app.add_middleware(StickySessions)``), BENCH_STICKY=peer (Starlette and
FastAPI) wires in the peer instead: bench/peer.py, echofly's way written by hand on
``BaseHTTPMiddleware``. BENCH_MODE=prefer_instance|instance. BENCH_ROOMS=1 (with
BENCH_STICKY=1, Sanic and Quart) adds
``/rooms/<room>``, routed by its room (``StickyConfig(key=room_key)``), which answers
with the machine that served it, and ``/owner/<room>``, which says who owns a room in
this machine's view. BENCH_METRICS_PORT (with BENCH_STICKY=1) serves flysticky's metrics
on that port, so counting them is in the measured path.
"""

from __future__ import annotations

import os
from typing import Any

from flysticky import StickyConfig

from .keys import room_key

STICKY = os.environ.get("BENCH_STICKY") == "1"
PEER = os.environ.get("BENCH_STICKY") == "peer"
FRAMEWORK = os.environ.get("BENCH_FRAMEWORK", "sanic")
# Only when asked: the other apps' route tables stay exactly the bare hello world.
ROOMS = STICKY and os.environ.get("BENCH_ROOMS") == "1"
CONFIG = StickyConfig(
    replay_mode=os.environ.get("BENCH_MODE", "prefer_instance"),  # type: ignore[arg-type]
    key=room_key if ROOMS else None,
    metrics_port=int(os.environ["BENCH_METRICS_PORT"])
    if "BENCH_METRICS_PORT" in os.environ
    else None,
)
MACHINE = os.environ.get("FLY_MACHINE_ID", "")

app: Any
if PEER and FRAMEWORK not in ("starlette", "fastapi"):
    raise SystemExit(f"BENCH_STICKY=peer: the peer is a Starlette middleware, not for {FRAMEWORK}")
if FRAMEWORK == "sanic":
    from sanic import Request, Sanic, text

    app = Sanic("bench")

    @app.get("/")
    async def sanic_hello(request: Request) -> Any:
        return text("Hello, world!")

    if STICKY:
        from flysticky.sanic import StickySessions

        sanic_sticky = StickySessions(app, CONFIG)

    if ROOMS:

        @app.get("/rooms/<room>")
        async def sanic_room(request: Request, room: str) -> Any:
            return text(MACHINE)

        @app.get("/owner/<room>")
        async def sanic_owner(request: Request, room: str) -> Any:
            return text(sanic_sticky.owner(room) or "")
elif FRAMEWORK == "quart":
    from quart import Quart

    app = Quart("bench")

    @app.get("/")
    async def quart_hello() -> str:
        return "Hello, world!"

    if STICKY:
        from flysticky.quart import StickySessions as QuartSticky

        quart_sticky = QuartSticky(app, CONFIG)

    if ROOMS:

        @app.get("/rooms/<room>")
        async def quart_room(room: str) -> str:
            return MACHINE

        @app.get("/owner/<room>")
        async def quart_owner(room: str) -> str:
            return quart_sticky.owner(room) or ""
elif FRAMEWORK == "starlette":
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def starlette_hello(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse("Hello, world!")

    middleware = []
    if STICKY:
        from flysticky.asgi import StickySessions as AsgiSticky

        middleware.append(Middleware(AsgiSticky, config=CONFIG))
    elif PEER:
        from .peer import FlyStickySessions

        middleware.append(Middleware(FlyStickySessions))
    app = Starlette(routes=[Route("/", starlette_hello)], middleware=middleware)
elif FRAMEWORK == "fastapi":
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse as FastAPIText

    app = api = FastAPI()

    @api.get("/")
    async def fastapi_hello() -> FastAPIText:
        return FastAPIText("Hello, world!")

    if STICKY:
        from flysticky.asgi import StickySessions as AsgiSticky

        api.add_middleware(AsgiSticky, config=CONFIG)
    elif PEER:
        from .peer import FlyStickySessions

        api.add_middleware(FlyStickySessions)
else:
    raise SystemExit(f"BENCH_FRAMEWORK={FRAMEWORK}: sanic, quart, starlette or fastapi")
