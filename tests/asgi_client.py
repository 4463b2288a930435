"""Drive an ASGI app in-process with its lifespan, and nothing added to the app.

sanic-testing's clients add a request middleware of their own to every route, which
takes Sanic's routes off flysticky's fast path; this client adds nothing. Its ASGI
client also replaces ``Sanic.__call__`` for every app, with one that ignores lifespan;
Sanic's own is kept here, as it was when this module was imported (at collection,
before any test made a client).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import httpx
from sanic import Sanic

_SANIC_ASGI = Sanic.__call__


def sanic_asgi(app: Sanic[Any, Any]) -> Any:
    """``app`` as Sanic's own ASGI entry serves it."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        await _SANIC_ASGI(app, scope, receive, send)

    return asgi


class LifespanClient:
    """``async with LifespanClient(app) as client``: an httpx client on a started app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan: asyncio.Task[None] | None = None

    async def _phase(self, name: str) -> None:
        await self._to_app.put({"type": f"lifespan.{name}"})
        message = await asyncio.wait_for(self._from_app.get(), 10)
        if message["type"] != f"lifespan.{name}.complete":
            raise RuntimeError(f"lifespan {name} failed: {message}")

    async def __aenter__(self) -> httpx.AsyncClient:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self._lifespan = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._phase("startup")
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver"
        )
        return self.client

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.client.aclose()
        await self._phase("shutdown")
        assert self._lifespan is not None
        await self._lifespan
