"""Sanic-only behaviour: how flysticky hooks in, and what it leaves alone."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sanic import Request, Sanic, json
from sanic_testing.testing import SanicASGITestClient

from flysticky.sanic import StickySessions, current_decision

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
        assert body["ctx_type"] == "SimpleNamespace"
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
