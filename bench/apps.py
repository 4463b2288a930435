"""Hello-world apps for the benchmark, the same app with and without flysticky.

BENCH_FRAMEWORK=sanic|quart, BENCH_STICKY=1 wires StickySessions in,
BENCH_MODE=prefer_instance|instance. BENCH_ROOMS=1 (with BENCH_STICKY=1) adds
``/rooms/<room>``, routed by its room (``StickyConfig(key=room_key)``), which answers
with the machine that served it, and ``/owner/<room>``, which says who owns a room in
this machine's view.
"""

from __future__ import annotations

import os
from typing import Any

from flysticky import StickyConfig

from .keys import room_key

STICKY = os.environ.get("BENCH_STICKY") == "1"
# Only when asked: the other apps' route tables stay exactly the bare hello world.
ROOMS = STICKY and os.environ.get("BENCH_ROOMS") == "1"
CONFIG = StickyConfig(
    replay_mode=os.environ.get("BENCH_MODE", "prefer_instance"),  # type: ignore[arg-type]
    key=room_key if ROOMS else None,
)
MACHINE = os.environ.get("FLY_MACHINE_ID", "")

app: Any
if os.environ.get("BENCH_FRAMEWORK", "sanic") == "sanic":
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
else:
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
