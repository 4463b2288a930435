"""Quart-only behaviour: app factories, installing twice, serving snapshots."""

from __future__ import annotations

from typing import Any

import pytest
from quart import Quart

from flysticky.quart import StickySessions, current_decision

from .harness import MACHINE, OTHER


def make_app() -> Quart:
    app = Quart(__name__)

    @app.get("/")
    async def index() -> Any:
        decision = current_decision()
        return {"outcome": decision.outcome.value if decision else None}

    return app


async def test_app_factory_style(on_fly: str) -> None:
    sticky = StickySessions()
    app = make_app()
    sticky.init_app(app)
    response = await app.test_client().get("/", headers={"cookie": f"fly-machine-id={OTHER}"})
    assert response.status_code == 307


async def test_installing_twice_is_refused(on_fly: str) -> None:
    app = make_app()
    StickySessions(app)
    with pytest.raises(RuntimeError, match="already installed"):
        StickySessions(app)


async def test_a_serving_app_reads_the_machine_id_once_at_start(
    on_fly: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    StickySessions(app)
    async with app.test_app() as test_app:  # runs before_serving, as a server does
        monkeypatch.setenv("FLY_MACHINE_ID", OTHER)
        response = await test_app.test_client().get(
            "/", headers={"cookie": f"fly-machine-id={MACHINE}"}
        )
        assert (await response.get_json())["outcome"] == "pinned"


async def test_websocket_replay_through_the_test_client(on_fly: str) -> None:
    from quart import websocket
    from quart.testing import WebsocketResponseError

    app = make_app()
    ran: list[str] = []

    @app.before_websocket
    async def app_hook() -> None:
        ran.append("hook")

    @app.websocket("/ws")
    async def ws() -> None:
        ran.append("handler")
        await websocket.send("hello")

    StickySessions(app)
    client = app.test_client()
    with pytest.raises(WebsocketResponseError) as refused:
        async with client.websocket("/ws", headers={"cookie": f"fly-machine-id={OTHER}"}) as sock:
            await sock.receive()
    assert refused.value.response.status_code == 307
    assert refused.value.response.headers["fly-replay"] == f"prefer_instance={OTHER}"
    assert ran == []
    async with client.websocket("/ws", headers={"cookie": f"fly-machine-id={MACHINE}"}) as sock:
        assert await sock.receive() == "hello"
    assert ran == ["hook", "handler"]
