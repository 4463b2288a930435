"""Hello-world apps for the benchmark, the same app with and without flysticky.

BENCH_FRAMEWORK=sanic|quart, BENCH_STICKY=1 wires StickySessions in,
BENCH_MODE=prefer_instance|instance.
"""

from __future__ import annotations

import os
from typing import Any

from flysticky import StickyConfig

STICKY = os.environ.get("BENCH_STICKY") == "1"
CONFIG = StickyConfig(replay_mode=os.environ.get("BENCH_MODE", "prefer_instance"))  # type: ignore[arg-type]

app: Any
if os.environ.get("BENCH_FRAMEWORK", "sanic") == "sanic":
    from sanic import Request, Sanic, text

    app = Sanic("bench")

    @app.get("/")
    async def sanic_hello(request: Request) -> Any:
        return text("Hello, world!")

    if STICKY:
        from flysticky.sanic import StickySessions

        StickySessions(app, CONFIG)
else:
    from quart import Quart

    app = Quart("bench")

    @app.get("/")
    async def quart_hello() -> str:
        return "Hello, world!"

    if STICKY:
        from flysticky.quart import StickySessions as QuartSticky

        QuartSticky(app, CONFIG)
