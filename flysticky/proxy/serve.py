"""Serve ``module:attr`` on $PORT with the app's own production server.

``python -m flysticky.proxy.serve app:app`` is what ``flysticky proxy app:app`` runs
on each machine: a Sanic app on Sanic's server (one process, so that in-memory
state is the machine's), anything else as ASGI on Hypercorn, on $HOST (the machine's
own loopback address) and $PORT.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any


def load(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"app {spec!r}: expected module:attribute, such as app:app")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"app {spec!r}: cannot import {module_name!r}: {error}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"app {spec!r}: module {module_name!r} has no {attr!r}") from None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m flysticky.proxy.serve module:app")
    app = load(args[0])
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8080"))
    if type(app).__module__.startswith("sanic"):
        app.run(host=host, port=port, single_process=True, access_log=False, motd=False)
        return
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
