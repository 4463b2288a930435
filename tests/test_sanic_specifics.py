"""Sanic-only behaviour: how flysticky hooks in, and what it leaves alone."""

from __future__ import annotations

import pathlib
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sanic import Request, Sanic, json
from sanic.response import ResponseStream, file_stream
from sanic_testing.testing import SanicASGITestClient

from flysticky import Decider, StickyConfig
from flysticky.core import join_cookie_headers
from flysticky.sanic import StickySessions, current_decision

from .asgi_client import LifespanClient, sanic_asgi
from .harness import MACHINE, OTHER


class Context(SimpleNamespace):
    """An app's own request context type."""


class OwnContextRequest(Request):
    @staticmethod
    def make_context() -> Any:
        return Context(made_by="app")


@pytest.mark.parametrize("request_class", [None, OwnContextRequest])
async def test_decision_lands_in_the_apps_own_context(on_fly: str, request_class: Any) -> None:
    app: Sanic[Any, Any] = Sanic(f"ctx_{uuid.uuid4().hex[:8]}", request_class=request_class)

    @app.get("/")
    async def index(request: Request) -> Any:
        return json(
            {
                "plain_namespace": isinstance(request.ctx, SimpleNamespace),
                "ctx_type": type(request.ctx).__name__,
                "made_by": getattr(request.ctx, "made_by", None),
                "outcome": current_decision(request).outcome.value,  # type: ignore[union-attr]
            }
        )

    StickySessions(app)
    _, response = await SanicASGITestClient(app).get(
        "/", headers={"cookie": f"fly-machine-id={MACHINE}"}
    )
    body = response.json
    assert body["outcome"] == "pinned"
    if request_class is None:
        assert body["plain_namespace"]
    else:
        assert (body["ctx_type"], body["made_by"]) == ("Context", "app")


async def test_installing_twice_is_refused(on_fly: str) -> None:
    app: Sanic[Any, Any] = Sanic(f"twice_{uuid.uuid4().hex[:8]}")
    StickySessions(app)
    with pytest.raises(RuntimeError, match="already installed"):
        StickySessions(app)


async def test_app_factory_style(on_fly: str) -> None:
    sticky = StickySessions()
    app: Sanic[Any, Any] = Sanic(f"factory_{uuid.uuid4().hex[:8]}")

    @app.get("/")
    async def index(request: Request) -> Any:
        return json({})

    sticky.init_app(app)
    _, response = await SanicASGITestClient(app).get(
        "/", headers={"cookie": f"fly-machine-id={OTHER}"}
    )
    assert response.status_code == 307


def test_streamed_responses_are_stamped_on_a_real_server(
    on_fly: str, tmp_path: pathlib.Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 300_000)
    app: Sanic[Any, Any] = Sanic(f"stream_{uuid.uuid4().hex[:8]}")
    app.static("/static", str(tmp_path), stream_large_files=1000)

    @app.get("/stream")
    async def stream(request: Request) -> ResponseStream:
        async def body(response: Any) -> None:
            await response.write("a")
            await response.write("b")

        return ResponseStream(body, content_type="text/plain")

    @app.get("/file")
    async def file(request: Request) -> Any:
        return await file_stream(big, chunk_size=4096)

    @app.get("/respond")
    async def respond(request: Request) -> None:
        response = await request.respond(content_type="text/plain")
        await response.send("streamed")
        await response.eof()

    StickySessions(app)
    stamp = f"fly-machine-id={MACHINE}; Max-Age=518400; Path=/; HttpOnly; SameSite=Lax"
    for path, size in (("/stream", 2), ("/file", 300_000), ("/static/big.bin", 300_000)):
        _, response = app.test_client.get(path)
        assert (response.status_code, len(response.content)) == (200, size), path
        assert response.headers.get_list("set-cookie") == [stamp], path
        assert response.headers["cache-control"] == "private", path
        _, replayed = app.test_client.get(path, headers={"cookie": f"fly-machine-id={OTHER}"})
        assert replayed.status_code == 307, path
    # The one shape left unstamped (README): headers sent by request.respond() inside
    # the handler are gone before flysticky sees anything. Served, never replayed late.
    _, response = app.test_client.get("/respond")
    assert (response.status_code, response.text) == (200, "streamed")
    assert "set-cookie" not in response.headers


async def test_the_fast_path_serves_routes_with_and_without_parameters(
    on_fly: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    middleware_calls: list[str] = []
    original = StickySessions._request_middleware

    async def counted(self: StickySessions, request: Request) -> Any:
        middleware_calls.append(request.path)
        return await original(self, request)

    monkeypatch.setattr(StickySessions, "_request_middleware", counted)
    app: Sanic[Any, Any] = Sanic(f"params_{uuid.uuid4().hex[:8]}")

    async def show(request: Request, name: str = "-") -> Any:
        request.ctx.seen = name  # the context takes the handler's own attributes
        decision = current_decision(request)
        assert decision is request.ctx.flysticky
        return json({"name": request.ctx.seen, "outcome": decision.outcome.value})

    app.add_route(show, "/plain", name="plain")
    app.add_route(show, "/named/<name>", name="named")
    StickySessions(app)
    async with LifespanClient(sanic_asgi(app)) as client:
        for path, name in (("/plain", "-"), ("/named/x", "x")) * 3:
            response = await client.get(path, headers={"cookie": f"fly-machine-id={MACHINE}"})
            assert response.json() == {"name": name, "outcome": "pinned"}, path
            response = await client.get(path, headers={"cookie": f"fly-machine-id={OTHER}"})
            assert (response.status_code, response.headers["fly-replay"]) == (
                307,
                f"prefer_instance={OTHER}",
            ), path
            client.cookies.clear()
            response = await client.get(path)
            assert response.json() == {"name": name, "outcome": "stamped"}, path
            assert response.headers["set-cookie"].startswith(f"fly-machine-id={MACHINE};")
        response = await client.get("/nowhere", headers={"cookie": f"fly-machine-id={OTHER}"})
        assert response.status_code == 307  # no route: the app-wide middleware decides
    # Every routed request was decided by the wrapper: the middleware saw only /nowhere.
    assert middleware_calls == ["/nowhere"]


async def test_the_inline_pinned_test_agrees_with_decide_on_every_cookie_shape(
    on_fly: str,
) -> None:
    """The route wrapper tests the Cookie header itself (the pinned path, inline) and
    hands the rest to decide(): for every shape, on both wrapper signatures, the answer
    is decide()'s, with one Cookie line or several."""
    app: Sanic[Any, Any] = Sanic(f"inline_{uuid.uuid4().hex[:8]}")

    async def show(request: Request, name: str = "-") -> Any:
        decision = current_decision(request)
        assert decision is not None
        return json({"outcome": decision.outcome.value})

    app.add_route(show, "/plain", name="plain")
    app.add_route(show, "/named/<name>", name="named")
    plugin = StickySessions(app)
    reference = Decider(StickyConfig(), MACHINE)
    shapes = ["", "; ", ";", "a=1; ", "x", "fly-machine-id=", '"']
    values = [MACHINE, OTHER, f"{MACHINE}!", f" {MACHINE}", ""]
    extras = ["", f"; fly-machine-id={OTHER}", f"; fly-machine-id={MACHINE}", "; fly-machine-id"]
    lines: list[list[str]] = [
        [f"{before}fly-machine-id={value}{after}{extra}"]
        for before in shapes
        for value in values
        for after in shapes
        for extra in extras
    ]
    lines += [
        [f"a=1; fly-machine-id={MACHINE}", f"fly-machine-id={OTHER}"],
        [f"fly-machine-id={MACHINE}", "b=2"],
        [f"fly-machine-id={OTHER}", f"fly-machine-id={MACHINE}"],
        ["a=1", f"fly-machine-id={MACHINE}"],
    ]
    taken = decided = 0
    async with LifespanClient(sanic_asgi(app)) as client:
        decider = plugin._decider
        assert decider is not None and plugin._pinned_ending is not None  # the test is armed
        decide = decider.decide

        def counted(*args: Any) -> Any:
            nonlocal decided
            decided += 1
            return decide(*args)

        decider.decide = counted
        for cookie_lines in lines:
            expected = reference.decide(None, join_cookie_headers(cookie_lines), {})
            taken += len(cookie_lines) == 1 and reference.surely_pinned(cookie_lines[0])
            for path in ("/plain", "/named/x"):
                response = await client.get(path, headers=[("cookie", c) for c in cookie_lines])
                if expected.replay is not None:
                    assert response.status_code == 307, (path, cookie_lines)
                    assert response.headers["fly-replay"] == expected.replay
                    continue
                assert response.json() == {"outcome": expected.outcome.value}, (path, cookie_lines)
                assert ("set-cookie" in response.headers) is (expected.set_cookie is not None)
    # The shapes the core's surely_pinned settles never reach decide(); all others do.
    assert taken > 50 and decided == 2 * (len(lines) - taken)
