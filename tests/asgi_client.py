"""Drive an ASGI app in-process with its lifespan, and nothing added to the app; or on a
real Uvicorn or Hypercorn server in this process (``served``).

sanic-testing's clients add a request middleware of their own to every route, which
takes Sanic's routes off flysticky's fast path; this client adds nothing. Its ASGI
client also replaces ``Sanic.__call__`` for every app, with one that ignores lifespan;
Sanic's own is kept here, as it was when this module was imported (at collection,
before any test made a client).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
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


@contextlib.asynccontextmanager
async def served(app: Any, server: str) -> AsyncIterator[str]:
    """``app`` on a real Uvicorn or Hypercorn server in this process (lifespan on), for
    as long as the block runs; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="error")
        runner = uvicorn.Server(config)
        task = asyncio.create_task(runner.serve())
        while not runner.started:
            if task.done():
                await task  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.002)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            runner.should_exit = True
            await task
        return
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    hypercorn_config = Config()
    hypercorn_config.bind = [f"127.0.0.1:{port}"]
    hypercorn_config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, hypercorn_config, shutdown_trigger=stop.wait))
    while True:  # Hypercorn says nothing when it listens: connect until it does
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if task.done():
                await task
                raise RuntimeError("hypercorn stopped before it started") from None
            await asyncio.sleep(0.002)
            continue
        writer.close()
        break
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await task


async def raw_http(
    url: str, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes | None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 request sent byte for byte as given (a hostile header value included,
    which httpx would refuse to send), the answer read to the connection's close."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = [f"{method} {path} HTTP/1.1".encode(), b"connection: close"]
    if not any(name.lower() == "host" for name, _ in headers):
        head.append(f"host: {host}".encode())
    head += [name.encode("latin-1") + b": " + value for name, value in headers]
    if body is not None:
        head.append(f"content-length: {len(body)}".encode())
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    top, _, content = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    pairs = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in pairs):
        chunks, rest = [], content
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        content = b"".join(chunks)
    return int(lines[0].split(" ")[1]), pairs, content
