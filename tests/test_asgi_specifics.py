"""What only the ASGI middleware has: lifespan and other scopes passing through, the
websocket replay with and without the server's denial response, the decision in
``request.state``, and what the skipper gets on each framework.

The conformance suite (tests/test_conformance.py, tests/test_keys_conformance.py) runs
every rule on Starlette in-process, FastAPI on Uvicorn and Litestar on Hypercorn;
tests/test_real_servers.py and the end-to-end suites run them as real machines.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from flysticky import StickyConfig
from flysticky.asgi import RETRY_CLOSE_CODE, StickySessions, current_decision

from .asgi_client import LifespanClient, served
from .harness import MACHINE, OTHER

Message = dict[str, Any]


class Recorder:
    """A bare ASGI app that records what reaches it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.received: list[Message] = []
        self.callables: list[tuple[Any, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.callables.append((receive, send))
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.received.append(message)
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})


async def test_lifespan_messages_pass_through_untouched(on_fly: str) -> None:
    inner = Recorder()
    app = StickySessions(inner)
    async with LifespanClient(app) as client:
        assert app._serving.started  # FLY_MACHINE_ID read at startup, once
        response = await client.get("/", headers={"cookie": f"fly-machine-id={MACHINE}"})
        assert response.status_code == 200
    assert not app._serving.started
    assert [m["type"] for m in inner.received] == ["lifespan.startup", "lifespan.shutdown"]
    assert inner.received == [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]


async def test_other_scope_types_reach_the_app_as_they_came(on_fly: str) -> None:
    inner = Recorder()
    app = StickySessions(inner)
    scope = {"type": "custom.thing", "headers": [(b"cookie", f"fly-machine-id={OTHER}".encode())]}

    async def receive() -> Message:
        return {"type": "custom.message"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing to send")

    await app(scope, receive, send)
    assert inner.scopes == [scope] and inner.scopes[0] is scope
    assert inner.callables == [(receive, send)]
    assert "state" not in scope


def websocket_scope(extensions: dict[str, Any] | None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [(b"cookie", f"fly-machine-id={OTHER}".encode())],
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


async def drive(app: StickySessions, scope: dict[str, Any]) -> list[Message]:
    sent: list[Message] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


async def test_websocket_replay_is_the_denial_response_where_the_server_has_it(
    on_fly: str,
) -> None:
    inner = Recorder()
    sent = await drive(StickySessions(inner), websocket_scope({"websocket.http.response": {}}))
    assert sent[0]["type"] == "websocket.http.response.start"
    assert sent[0]["status"] == 307
    assert (b"fly-replay", f"prefer_instance={OTHER}".encode()) in sent[0]["headers"]
    assert sent[1] == {"type": "websocket.http.response.body", "body": b""}
    assert inner.scopes == []  # the app never saw the handshake


@pytest.mark.parametrize("extensions", [None, {}])
async def test_websocket_replay_without_the_denial_response_closes_with_retry(
    on_fly: str, extensions: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    inner = Recorder()
    with caplog.at_level(logging.INFO, logger="flysticky"):
        sent = await drive(StickySessions(inner), websocket_scope(extensions))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == RETRY_CLOSE_CODE == 1013
    assert inner.scopes == []
    assert any(
        "websocket denial response" in r.getMessage() or "closed with 1013" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_the_real_servers_send_the_websocket_replay_as_a_307(
    on_fly: str, server: str
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        decision = current_decision(websocket)
        assert decision is not None and decision is websocket.state.flysticky
        await websocket.send_text(decision.outcome.value)
        await websocket.receive_text()  # Hypercorn 0.16 closes with 1011 on an app's return

    app = StickySessions(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    async with served(app, server) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(
                ws_url, additional_headers={"cookie": f"fly-machine-id={OTHER}"}
            ):
                pass
        assert refused.value.response.status_code == 307
        assert refused.value.response.headers["fly-replay"] == f"prefer_instance={OTHER}"
        async with websockets.connect(
            ws_url, additional_headers={"cookie": f"fly-machine-id={MACHINE}"}
        ) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "pinned"
            await ws.send("bye")


async def test_decision_is_request_state_flysticky_on_starlette(on_fly: str) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def page(request: Request) -> PlainTextResponse:
        decision = request.state.flysticky
        assert decision is current_decision(request) is current_decision(request.scope)
        return PlainTextResponse(decision.outcome.value)

    app = StickySessions(Starlette(routes=[Route("/", page)]))
    async with LifespanClient(app) as client:
        assert (await client.get("/")).text == "stamped"
        pinned = await client.get("/", headers={"cookie": f"fly-machine-id={MACHINE}"})
        assert pinned.text == "pinned"


async def test_not_on_fly_the_decision_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_MACHINE_ID", raising=False)
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(current_decision(scope))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=StickySessions(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        response = await client.get("/", headers={"cookie": f"fly-machine-id={OTHER}"})
    assert response.status_code == 204 and seen == [None]


async def test_without_lifespan_a_warning_says_what_is_off(
    on_fly: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flysticky.asgi._warned_no_lifespan", False)
    app = StickySessions(Recorder(), StickyConfig(key=lambda scope: None))
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.WARNING, logger="flysticky"):
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
    warnings = [r for r in caplog.records if "lifespan" in r.getMessage()]
    assert len(warnings) == 1


async def test_plain_asgi_skipper_gets_the_scope(on_fly: str) -> None:
    seen: list[Any] = []

    def skip(scope: Any) -> bool:
        seen.append(scope)
        return bool(scope["path"] == "/health")

    app = StickySessions(Recorder(), StickyConfig(skipper=skip))
    async with LifespanClient(app) as client:
        health = await client.get("/health", headers={"cookie": f"fly-machine-id={OTHER}"})
        assert health.status_code == 200
        assert (
            await client.get("/", headers={"cookie": f"fly-machine-id={OTHER}"})
        ).status_code == 307
    assert all(isinstance(s, dict) for s in seen) and len(seen) == 2


async def test_starlette_skipper_gets_a_websocket_for_a_websocket(on_fly: str) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.websockets import WebSocket

    seen: list[Any] = []

    def skip(connection: Any) -> bool:
        seen.append(connection)
        return False

    app = Starlette(middleware=[Middleware(StickySessions, config=StickyConfig(skipper=skip))])
    sent = await drive(app, websocket_scope({"websocket.http.response": {}}))  # type: ignore[arg-type]
    assert sent[0]["status"] == 307
    async with LifespanClient(app) as client:
        await client.get("/nowhere")
    assert [type(c) for c in seen] == [WebSocket, Request]


async def test_litestar_plugin_installs_once(on_fly: str) -> None:
    from litestar import Litestar

    from flysticky.litestar import StickySessions as Plugin

    plugin = Plugin()
    Litestar(route_handlers=[], plugins=[plugin])
    with pytest.raises(RuntimeError, match="already installed"):
        Litestar(route_handlers=[], plugins=[plugin, plugin])


@pytest.mark.parametrize("wrapper", ["socketio", "cors"])
async def test_the_skipper_finds_starlette_inside_asgi_wrappers(on_fly: str, wrapper: str) -> None:
    import socketio
    from starlette.applications import Starlette
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    seen: list[Any] = []

    def skip(request: Any) -> bool:
        seen.append(request)
        return bool(request.url.path == "/health")

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    api = Starlette(routes=[Route("/health", health)])
    inner: Any = (
        socketio.ASGIApp(socketio.AsyncServer(async_mode="asgi"), other_asgi_app=api)
        if wrapper == "socketio"
        else CORSMiddleware(api, allow_origins=["*"])
    )
    app = StickySessions(inner, StickyConfig(skipper=skip))
    async with LifespanClient(app) as client:
        reply = await client.get("/health", headers={"cookie": f"fly-machine-id={OTHER}"})
    assert (reply.status_code, reply.text) == (200, "ok")
    assert [type(r) for r in seen] == [Request]


@pytest.mark.parametrize("thing", [None, object(), {"state": None}])
async def test_current_decision_of_something_else(thing: Any) -> None:
    if isinstance(thing, dict):
        assert current_decision(thing) is None
        return
    with pytest.raises(TypeError, match="a request, a websocket or an ASGI scope"):
        current_decision(thing)


async def test_a_network_that_cannot_start_leaves_the_app_s_startup_alone(
    on_fly: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    monkeypatch.setenv("FLY_APP_NAME", "conf-app")
    monkeypatch.setenv("FLYSTICKY_RESOLVER", "127.0.0.1:53x")  # a typo
    started: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        started.append("app")
        yield

    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse(current_decision(request).outcome.value)  # type: ignore[union-attr]

    app = StickySessions(
        Starlette(routes=[Route("/", page)], lifespan=lifespan),
        StickyConfig(key=lambda request: None),
    )
    with caplog.at_level(logging.ERROR, logger="flysticky"):
        async with LifespanClient(app) as client:
            assert (await client.get("/")).text == "stamped"
    assert started == ["app"]
    assert any("private network did not start" in r.getMessage() for r in caplog.records)
